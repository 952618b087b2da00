"""The RRef applications hold: torch's ``PyRRef`` API over a protocol record.

An :class:`RRef` wraps one record of the core (an ``OwnerRRef`` on its owner,
a ``UserRRef`` elsewhere) and, for a user, owns exactly one of its holds: when
Python drops the RRef, ``__del__`` hands the record to the agent, which tells
the core from its housekeeping thread (never from ``__del__`` itself, which
may run in any thread, at any allocation).
"""

from __future__ import annotations

import functools
import types

import torch
from torch.distributed.rpc import WorkerInfo

from . import constants, functions, handover
from .agent import current
from .agent.autograd_pass import engine_backward
from .agent.futures import Failed, collected, expose, fail, raise_copy, wait
from .errors import WorkerClosedError

__all__ = ["RRef", "worker_info"]


def worker_info(agent, rank: int) -> WorkerInfo:
    """torch's ``WorkerInfo`` of ``rank`` in ``agent``'s world."""
    return WorkerInfo(agent.peer(rank).name, rank)


class RRef:
    """A reference to a value that lives on one worker (its owner).

    ``RRef(value)`` makes a local RRef owned by this worker; ``remote()``
    returns RRefs owned elsewhere; RRefs passed in calls, return values and
    RRef values arrive as new forks.
    """

    __slots__ = ("_agent", "_record", "_creation", "_type", "_type_future", "__weakref__")

    # torch's RRef is Generic: annotations such as ``RRef[torch.Tensor]``
    # (torch's own RemoteModule template has them) must evaluate.
    __class_getitem__ = classmethod(types.GenericAlias)

    def __new__(cls, value=None, type_hint=None):
        torch_rpc = handover.active()
        if torch_rpc is not None:  # this world runs on torch: its RRef, not ours
            return torch_rpc.RRef(value, type_hint)
        return object.__new__(cls)

    def __init__(self, value, type_hint=None) -> None:
        agent = current.require()
        self._agent = agent
        self._record = agent.calls.create_local(value)
        self._creation = None
        self._type = None
        self._type_future = None

    @classmethod
    def _adopt(cls, agent, record, creation=None) -> "RRef":
        rref = object.__new__(cls)
        rref._agent = agent
        rref._record = record
        rref._creation = creation
        rref._type = None
        rref._type_future = None
        return rref

    def __del__(self) -> None:
        record = getattr(self, "_record", None)
        if record is not None and not record.is_owner:
            self._agent.housekeeper.defer_release(record)

    def _record_for(self, agent):
        if agent is not self._agent or self._agent.closed:
            raise WorkerClosedError(self._after_shutdown("fork an UserRRef"))
        return self._record

    def _live_agent(self, use: str = "to_here()"):
        if self._agent.closed:
            raise WorkerClosedError(self._after_shutdown(use))
        return self._agent

    def _after_shutdown(self, use: str) -> str:
        # torch's words first ("Cannot call to_here() on it after deletion."),
        # as programs match them.
        return (f"{self!r} has been deleted. Cannot call {use} on it after deletion: it "
                f"belongs to an RPC session that was shut down, and RRefs cannot be used after "
                f"shutdown() (create new ones after init_rpc)")

    # ------------------------------------------------------------ identity

    def is_owner(self) -> bool:
        """Whether this worker owns the value."""
        return self._record.is_owner

    def owner(self):
        """The owner's ``WorkerInfo``."""
        return worker_info(self._agent, self._record.owner)

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
        record = self._record
        if not record.is_owner:
            # torch's words (programs match them), then the fix.
            raise RuntimeError(
                f"For UserRRef(rref_id={record.rref_id}, fork_id={record.fork_id}), can't call "
                f"localValue() on user {worker_info(self._agent, self._agent.rank)}. Call it on "
                f"owner {self.owner()}; to_here() fetches a copy here")
        if record.has_value:
            # A lookup, as on torch: the value is set once and never changes.
            self._live_agent("local_value()")
            error = record.error
            if error is None:
                return record.value
            raise_copy(self._agent.calls.owner_error(record))
        return wait(self._live_agent("local_value()").calls.fetch(self._record, 0))

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
        return agent.reader.wait_reply(agent.calls.fetch(self._record, timeout, will_wait=True))

    def _get_future(self) -> torch.futures.Future:
        """A future that completes when the ``remote()`` creating this RRef finishes."""
        if self._creation is None:
            done = torch.futures.Future()
            done.set_result(True)
            return done
        # The application may hang callbacks on it: they must not run on a
        # thread that reads the inbox while it waits (see Reader._split_for).
        self._agent.calls.expose_creation(self._record)
        return expose(self._creation)

    def _get_type(self, timeout: float = constants.UNSET_RPC_TIMEOUT, blocking: bool = True):
        """The type of the value (torch's ``_get_type``), asked of the owner once and cached.

        With ``blocking=False``, a future of it: the same future on every such
        call, as torch caches the first one (its tests check that).
        """
        if not blocking:
            if self._type_future is None:
                if self._type is not None:
                    self._type_future = torch.futures.Future()
                    self._type_future.set_result(self._type)
                else:
                    self._type_future = expose(self._ask_type(timeout))
            return self._type_future
        if self._type is not None:
            return self._type
        return wait(self._ask_type(timeout))

    def _ask_type(self, timeout: float):
        """An internal future (see agent/futures.py) of the value's type, cached once known."""
        agent = self._live_agent()
        if self._record.is_owner or self._record.creation_failed:
            # A user whose remote() failed cannot be shared to ask its owner:
            # the fetch fails at once with the creation's error, as to_here().
            source = agent.calls.fetch(self._record, 0)
        else:
            source = agent.calls.rpc_async(self._record.owner, _rref_typeof_on_owner, (self,),
                                           {}, timeout)
        return source.then(functools.partial(_cache_type, self, self._record.is_owner))

    # ------------------------------------------------------------ autograd

    def backward(self, dist_autograd_ctx_id: int = -1, retain_graph: bool = False) -> None:
        """Run backward from the value (a tensor) as the root, on its owner (torch's API).

        With a distributed autograd context id, a distributed backward pass
        in that context starts on the owner (the gradients go to the
        context: ``get_gradients``); without one, a local ``backward()``,
        which only the owner may run.

        Raises:
            RuntimeError: a user RRef without a context id, a value that is
                not a tensor, or what the backward itself raised (on the owner).
        """
        agent = self._live_agent()
        if self._record.is_owner:
            _backward_on_owner(self, dist_autograd_ctx_id, retain_graph)
            return
        if dist_autograd_ctx_id == -1:
            raise RuntimeError("User RRefs require 'dist_autograd_ctx_id' to be specified")
        agent.reader.wait_reply(agent.calls.rpc_async(
            self._record.owner, _backward_on_owner, (self, dist_autograd_ctx_id, retain_graph),
            {}, constants.UNSET_RPC_TIMEOUT, will_wait=True))

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


def _backward_on_owner(rref: RRef, context_id: int, retain_graph: bool) -> None:
    root = rref.local_value()
    if not isinstance(root, torch.Tensor):
        raise RuntimeError("RRef should contain a tensor for .backward()")
    if context_id == -1:
        # torch's local path ignores retain_graph too, and runs the engine
        # from C++ (see engine_backward)
        engine_backward([root], retain_graph=False)
    else:
        rref._live_agent("backward()").autograd_tape().backward(context_id, [root], retain_graph)


def _rref_typeof_on_owner(rref: RRef):
    return type(rref.local_value())


def _cache_type(rref: RRef, is_value: bool, future):
    # The outcome of the owner's value (is_value) or of the type query:
    # a Failed record passes through for the waiter to raise.
    outcome = future.value()
    if type(outcome) is Failed:
        return outcome
    rref._type = type(outcome) if is_value else outcome
    return rref._type


def _local_invoke(rref: RRef, func_name: str, args, kwargs):
    return getattr(rref.local_value(), func_name)(*args, **kwargs)


@functions.async_execution
def _local_invoke_async_execution(rref: RRef, func_name: str, args, kwargs):
    # The method is an @async_execution one: it returns a future, and the
    # call completes when that future does (torch's rref_proxy).
    return getattr(rref.local_value(), func_name)(*args, **kwargs)


def _invoker_for(value_type: type, func_name: str):
    """How the owner runs ``func_name``; AttributeError here if the type lacks it.

    As torch's proxies: the method is looked up on the value's type, before
    any call goes out (a ScriptModule's methods are not attributes of its type).
    """
    if issubclass(value_type, (torch.jit.ScriptModule, torch._C.ScriptModule)):
        return _local_invoke
    method = getattr(value_type, func_name)
    if getattr(method, "_wrapped_async_rpc_function", None) is not None:
        return _local_invoke_async_execution
    return _local_invoke


class _Proxy:
    """torch's ``RRefProxy``: attribute access makes a call on the owner.

    As in torch, the owner is first asked the value's type (once per RRef
    object; see ``RRef._get_type``), so that a method decorated with
    ``@rpc.functions.async_execution`` runs as one: the call completes when
    the future it returns does.
    """

    __slots__ = ("_rref", "_api", "_timeout")

    def __init__(self, rref: RRef, api: str, timeout: float) -> None:
        self._rref = rref
        self._api = api
        self._timeout = timeout

    def __getattr__(self, func_name: str):
        rref = self._rref
        api_name = self._api
        timeout = self._timeout

        @functools.wraps(_local_invoke)
        def invoke(*args, **kwargs):
            call_args = (rref, func_name, args, kwargs)
            if api_name != "rpc_async":
                invoker = _invoker_for(rref._get_type(timeout), func_name)
                return _call(rref, api_name, invoker, call_args, timeout)
            # rpc_async never blocks, and a method the type lacks fails its
            # future, as in torch; the call goes out once the type is known.
            if rref._type is not None:
                try:
                    invoker = _invoker_for(rref._type, func_name)
                except AttributeError as exc:
                    failed = torch.futures.Future()
                    fail(failed, exc, user=True)
                    return expose(failed)
                return _call(rref, api_name, invoker, call_args, timeout)
            result = torch.futures.Future()

            def on_type(type_future):
                value_type = type_future.value()
                if type(value_type) is Failed:
                    result.set_result(value_type)
                    return
                try:
                    invoker = _invoker_for(value_type, func_name)
                except AttributeError as exc:
                    fail(result, exc, user=True)
                    return
                try:
                    inner = rref._live_agent().calls.rpc_async(
                        rref._record.owner, invoker, call_args, {}, timeout)
                except BaseException as exc:
                    fail(result, exc)
                    return
                inner.add_done_callback(lambda done: result.set_result(done.value()))

            rref._ask_type(timeout).add_done_callback(on_type)
            return expose(result)
        return invoke


def _call(rref: RRef, api_name: str, invoker, call_args: tuple, timeout: float):
    """rpc_sync, rpc_async or remote of ``invoker`` on ``rref``'s owner."""
    agent = rref._live_agent()
    owner = rref._record.owner
    if api_name == "remote":
        return agent.calls.remote(owner, invoker, call_args, {}, timeout)
    if api_name == "rpc_sync":
        return agent.reader.wait_reply(agent.calls.rpc_async(owner, invoker, call_args, {},
                                                             timeout, will_wait=True))
    # Collected by an open _wait_all() block, as torch's proxy does when the
    # value's type is known (otherwise its call goes out later, from the
    # thread that learns the type, as here in _Proxy).
    return collected(expose(agent.calls.rpc_async(owner, invoker, call_args, {}, timeout)))
