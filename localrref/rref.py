"""The RRef applications hold: torch's ``PyRRef`` API over a protocol record.

An :class:`RRef` wraps one record of the core (an ``OwnerRRef`` on its owner,
a ``UserRRef`` elsewhere) and, for a user, owns exactly one of its holds: when
Python drops the RRef, ``__del__`` hands the record to the agent, which tells
the core from its housekeeping thread (never from ``__del__`` itself, which
may run in any thread, at any allocation).
"""

from __future__ import annotations

import functools

import torch

from . import constants
from .agent import current
from .agent.agent import wait
from .errors import WorkerClosedError

__all__ = ["RRef"]


class RRef:
    """A reference to a value that lives on one worker (its owner).

    ``RRef(value)`` makes a local RRef owned by this worker; ``remote()``
    returns RRefs owned elsewhere; RRefs passed in calls, return values and
    RRef values arrive as new forks.
    """

    __slots__ = ("_agent", "_record", "_creation", "__weakref__")

    def __init__(self, value, type_hint=None) -> None:
        agent = current.require()
        self._agent = agent
        self._record = agent.create_local(value)
        self._creation = None

    @classmethod
    def _adopt(cls, agent, record, creation=None) -> "RRef":
        rref = cls.__new__(cls)
        rref._agent = agent
        rref._record = record
        rref._creation = creation
        return rref

    def __del__(self) -> None:
        record = getattr(self, "_record", None)
        if record is not None and not record.is_owner:
            self._agent.defer_release(record)

    def _record_for(self, agent):
        if agent is not self._agent or self._agent.closed:
            raise WorkerClosedError(
                f"{self!r} belongs to an RPC session that was shut down; RRefs cannot be used "
                f"after shutdown() (create new ones after init_rpc)")
        return self._record

    def _live_agent(self):
        if self._agent.closed or current.get() is not self._agent:
            raise WorkerClosedError(
                f"{self!r} belongs to an RPC session that was shut down; RRefs cannot be used "
                f"after shutdown() (create new ones after init_rpc)")
        return self._agent

    # ------------------------------------------------------------ identity

    def is_owner(self) -> bool:
        """Whether this worker owns the value."""
        return self._record.is_owner

    def owner(self):
        """The owner's ``WorkerInfo``."""
        from .api import _worker_info
        return _worker_info(self._agent, self._record.owner)

    def owner_name(self) -> str:
        """The owner's worker name."""
        return self._agent.peer(self._record.owner).name

    def confirmed_by_owner(self) -> bool:
        """Whether the owner knows about this reference (always True on the owner)."""
        return True if self._record.is_owner else self._record.confirmed

    # ------------------------------------------------------------ values

    def local_value(self):
        """The value, on its owner; blocks until a ``remote()`` creating it finishes.

        Raises:
            RuntimeError: called on a user (use ``to_here()``), or the creation failed.
        """
        if not self._record.is_owner:
            raise RuntimeError(
                f"Cannot call local_value() on a non-owner RRef ({self!r}); it is owned by "
                f"{self.owner_name()!r}. Call to_here() to fetch a copy.")
        return wait(self._live_agent().fetch(self._record, 0))

    def to_here(self, timeout: float = constants.UNSET_RPC_TIMEOUT):
        """Fetch the value from its owner (a copy; the owner's value is untouched).

        Args:
            timeout: seconds; -1 uses the default RPC timeout, 0 waits forever.

        Raises:
            RuntimeError: the creating ``remote()`` failed or timed out (at
                once, even if this call was already waiting), the owner died,
                or the timeout passed.
        """
        agent = self._live_agent()
        return agent.wait_reply(agent.fetch(self._record, timeout, will_wait=True))

    def _get_future(self) -> torch.futures.Future:
        """A future that completes when the ``remote()`` creating this RRef finishes."""
        if self._creation is None:
            done = torch.futures.Future()
            done.set_result(True)
            return done
        # The application may hang callbacks on it: they must not run on a
        # thread that reads the inbox while it waits (see Agent._split_for).
        self._agent.expose_creation(self._record)
        return self._creation

    def _get_type(self, timeout: float = constants.UNSET_RPC_TIMEOUT, blocking: bool = True):
        value_type = type(self.local_value()) if self.is_owner() else type(self.to_here(timeout))
        if blocking:
            return value_type
        future = torch.futures.Future()
        future.set_result(value_type)
        return future

    # ------------------------------------------------------------ proxies

    def rpc_sync(self, timeout: float = constants.UNSET_RPC_TIMEOUT):
        """A proxy: ``rref.rpc_sync().method(*args)`` runs ``method`` on the owner's value."""
        return _Proxy(self, "rpc_sync", timeout)

    def rpc_async(self, timeout: float = constants.UNSET_RPC_TIMEOUT):
        """As :meth:`rpc_sync`, returning a future."""
        return _Proxy(self, "rpc_async", timeout)

    def remote(self, timeout: float = constants.UNSET_RPC_TIMEOUT):
        """As :meth:`rpc_sync`, keeping the result on the owner and returning an RRef to it."""
        return _Proxy(self, "remote", timeout)

    # ------------------------------------------------------------ pickling

    def __reduce__(self):
        raise RuntimeError(
            "Can not pickle rref in python pickler, rref can only be pickled when using RPC "
            "(pass it as an argument or return value of rpc_sync/rpc_async/remote)")

    def __repr__(self) -> str:
        record = self._record
        if record.is_owner:
            return f"OwnerRRef({record.rref_id})"
        return f"UserRRef(RRefId = {record.rref_id}, ForkId = {record.fork_id})"


def _local_invoke(rref: RRef, func_name: str, args, kwargs):
    return getattr(rref.local_value(), func_name)(*args, **kwargs)


class _Proxy:
    """torch's ``RRefProxy``: attribute access makes a call on the owner."""

    __slots__ = ("_rref", "_api", "_timeout")

    def __init__(self, rref: RRef, api: str, timeout: float) -> None:
        self._rref = rref
        self._api = api
        self._timeout = timeout

    def __getattr__(self, func_name: str):
        from . import api
        call = getattr(api, self._api)
        rref = self._rref

        @functools.wraps(_local_invoke)
        def invoke(*args, **kwargs):
            return call(rref._record.owner, _local_invoke, args=(rref, func_name, args, kwargs),
                        timeout=self._timeout)
        return invoke
