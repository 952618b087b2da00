"""The application's requests: calls, ``remote()``, ``to_here()``, and their futures.

Every request has an *internal* future (see ``futures.py``): the caller
waits on it (``rpc_sync``, ``to_here``) or gets a child of it
(``rpc_async``). This part keeps the futures of requests in flight, by
request id (:attr:`Calls.pending`), the creation futures of ``remote()``
RRefs, and the futures waiting for a value this worker owns but has not
computed yet (``local_value()`` / ``to_here()`` on the owner before its
``remote()`` job is done).

Which thread touches what: any application thread (or user code in a job)
makes requests. The thread that carries out a ``Complete``/``Fail``/
``CreationSettled`` effect (the inbox's reader, or a pool thread) completes
their futures, and so runs the futures' callbacks. The tables are guarded by
the agent's lock; a future is completed with no lock held. A request leaves
:attr:`pending` only after its future's callbacks have run, so that the
shutdown drain counts it as work until then (a callback may start a call).
"""

from __future__ import annotations

import enum
import os
import sys
from dataclasses import dataclass

import torch

from ..codec.pickler import loads_exception
from ..core import effects as fx
from ..core.rref_context import creation_error_for
from . import profiling
from .faults import SCRIPT_KINDS
from .futures import fail

__all__ = ["Calls", "Pending", "RequestKind"]


class RequestKind(enum.Enum):
    CALL = "call"    # rpc_sync / rpc_async
    FETCH = "fetch"  # to_here() on a user


@dataclass(slots=True)
class Pending:
    future: torch.futures.Future
    kind: RequestKind
    dst: int


class Calls:
    """The requests this worker's application makes (see the module docstring)."""

    def __init__(self, agent) -> None:
        self.agent = agent
        self.pending: dict[int, Pending] = {}
        self.creations: dict[int, torch.futures.Future] = {}  # id(record) -> creation future
        self._exposed_creations: set[int] = set()  # id(record): see expose_creation
        self._owner_waiters: dict[int, list[torch.futures.Future]] = {}
        # id(record) -> "file:line in function", when the world records creation sites.
        self.sites: dict[int, str] = {}

    # -- requests ------------------------------------------------------------

    def rpc_async(self, dst: int, func, args, kwargs, timeout, *,
                  will_wait: bool = False) -> torch.futures.Future:
        """Send a call; return its internal future.

        ``will_wait``: the caller passes the future to ``Reader.wait_reply``.
        """
        agent = self.agent
        agent.check_open()
        agent.reader.before_request(will_wait)
        future = torch.futures.Future()
        profiling.end_when_done(profiling.start("sync" if will_wait else "async", func,
                                                agent, dst), future, waited=will_wait)
        dead = agent.dead.get(dst)
        if dead is not None:
            fail(future, dead)
            return future
        try:
            data, forks = agent.encode_for(dst, (func, args, kwargs), func=func)
        except BaseException as exc:
            fail(future, exc)  # no one sees this future; it ends the profiling event
            raise
        with agent.lock:
            request_id = agent.core.rpc(dst, data, forks, now=agent.clock(),
                                        timeout=agent.timeout_of(timeout))
            self.pending[request_id] = Pending(future, RequestKind.CALL, dst)
            effects = agent.core.take_effects()
            agent.housekeeper.poke_timer_locked()
        if agent.script_sends is not None:
            self._note_script(func, effects)
        agent.run(effects)
        return future

    def remote(self, dst: int, func, args, kwargs, timeout):
        """Send a ``remote()``; return the new RRef at once."""
        agent = self.agent
        agent.check_open()
        # User code run by the reader steps down; remote() from a parked caller is fine.
        agent.reader.before_request(False, parked_keeps=True)
        dead = agent.dead.get(dst)
        if dead is not None:
            raise dead
        creation = torch.futures.Future()
        profiling.end_when_done(profiling.start("remote", func, agent, dst), creation)
        try:
            data, forks = agent.encode_for(dst, (func, args, kwargs), func=func)
        except BaseException as exc:
            fail(creation, exc)  # no one sees this future; it ends the profiling event
            raise
        with agent.lock:
            record = agent.core.remote(dst, data, forks, now=agent.clock(),
                                       timeout=agent.timeout_of(timeout))
            self.creations[id(record)] = creation
            effects = agent.core.take_effects()
            agent.housekeeper.poke_timer_locked()
        if agent.record_sites:
            self.sites[id(record)] = _caller_site()
        rref = agent.rref_type._adopt(agent, record, creation)
        if agent.script_sends is not None:
            self._note_script(func, effects, record)
        agent.run(effects)
        return rref

    def fetch(self, record, timeout, *, will_wait: bool = False) -> torch.futures.Future:
        """The internal future of ``record``'s value (to_here); an owner waits for its job."""
        agent = self.agent
        agent.check_open()
        agent.reader.before_request(will_wait)
        future = torch.futures.Future()
        if record.is_owner:
            self._owner_value(record, future)
            return future
        profiling.end_when_done(profiling.start_fetch(agent, record.owner), future,
                                waited=will_wait)
        dead = agent.dead.get(record.owner)
        if dead is not None:
            fail(future, dead)
            return future
        tape = agent.current_tape()
        context_id = tape.current() if tape is not None else None
        header = None if context_id is None else tape.header(record.owner, context_id)
        with agent.lock:
            request_id = agent.core.fetch(record, now=agent.clock(),
                                          timeout=agent.timeout_of(timeout), payload=header)
            self.pending[request_id] = Pending(future, RequestKind.FETCH, record.owner)
            effects = agent.core.take_effects()
            agent.housekeeper.poke_timer_locked()
        script = agent.script_sends
        if script is not None and script.made_by_script(record):
            script.note_request(request_id)
        agent.run(effects)
        return future

    def _note_script(self, func, effects, record=None) -> None:
        """Fault injection: note the sends torch would make as SCRIPT_* messages
        (``record``: the RRef a ``remote()`` makes); see faults.ScriptSends."""
        script = self.agent.script_sends
        if not script.is_script(func):
            return
        for effect in effects:
            if isinstance(effect, fx.Send) and effect.message.type.value in SCRIPT_KINDS:
                script.note_request(effect.message.request_id)
        if record is not None:
            script.note_rref(record)

    def create_local(self, value):
        """``RRef(value)``: an OwnerRRef on this worker, outside the tables until shared."""
        agent = self.agent
        with agent.lock:
            owner = agent.core.create_owner_rref()
        owner.set_value(value)
        if agent.record_sites:
            self.sites[id(owner)] = _caller_site()
        return owner

    # -- values this worker owns ----------------------------------------------

    def _owner_value(self, owner, future) -> None:
        with self.agent.lock:
            failed = creation_error_for(owner) if owner.timed_out or (
                owner.creation_error is not None and not owner.has_value) else None
            ready = owner.has_value
            if failed is None and not ready:
                self._owner_waiters.setdefault(id(owner), []).append(future)
        # Seed: OwnerRRef::getValue fails a remote() to self that timed out,
        # even once its value came; one whose message was never sent has none.
        if failed is not None:
            _fail_with(future, failed)
        elif ready:
            self._settle_owner_future(owner, future)

    def owner_ready(self, owner) -> None:
        """``owner``'s value (or error) is set: complete whoever waited for it."""
        with self.agent.lock:
            waiters = self._owner_waiters.pop(id(owner), [])
        for future in waiters:
            self._settle_owner_future(owner, future)

    def _settle_owner_future(self, owner, future) -> None:
        if owner.error is not None:
            fail(future, self.owner_error(owner), user=True)
        else:
            future.set_result(owner.value)

    @staticmethod
    def owner_error(owner) -> BaseException:
        """The exception the ``remote()`` creating ``owner`` raised (a new object each time)."""
        return loads_exception(owner.error)

    # -- outcomes (effects) ----------------------------------------------------

    def complete(self, effect: fx.Complete) -> None:
        agent = self.agent
        pending = self.pending.get(effect.request_id)
        wrappers = [agent.rref_type._adopt(agent, record) for record in effect.rrefs]
        if pending is None:
            return
        try:
            value, _ = agent.decode_from(pending.dst, effect.payload, wrappers)
        except BaseException as exc:
            value = None
            fail(pending.future, RuntimeError(
                f"could not unpickle the reply from {agent.describe(pending.dst)}: "
                f"{type(exc).__name__}: {exc}"))
        else:
            del wrappers
            pending.future.set_result(value)
        finally:
            self._settled(effect.request_id)

    def fail(self, effect: fx.Fail) -> None:
        pending = self.pending.get(effect.request_id)
        if pending is None:
            return
        try:
            _fail_with(pending.future, effect.error)
        finally:
            self._settled(effect.request_id)

    def _settled(self, request_id: int) -> None:
        # Only now, with the future's callbacks run: a callback may start a
        # new call, and until it has, this one still counts as work in
        # flight for the shutdown drain (see active).
        with self.agent.lock:
            self.pending.pop(request_id, None)
        self.agent.signal_progress()

    def expose_creation(self, record) -> None:
        """The creation future of ``record`` was handed to the application."""
        self._exposed_creations.add(id(record))

    def is_exposed_creation(self, record) -> bool:
        return id(record) in self._exposed_creations

    def creation_settled(self, effect: fx.CreationSettled) -> None:
        key = id(effect.rref)
        if effect.error is not None and effect.rref.is_owner:
            # A remote() to self failed: a to_here() that waits for its value
            # gets the error (see _owner_value).
            with self.agent.lock:
                waiters = self._owner_waiters.pop(key, [])
            for waiter in waiters:
                _fail_with(waiter, creation_error_for(effect.rref))
        future = self.creations.get(key)
        if future is None:
            return
        try:
            if effect.error is None:
                future.set_result(True)
            else:
                _fail_with(future, effect.error)
        finally:
            # After the callbacks, as in _settled.
            with self.agent.lock:
                self.creations.pop(key, None)
                self._exposed_creations.discard(key)
            self.agent.signal_progress()

    def is_reply_for(self, futures, effect) -> bool:
        """Whether a Complete/Fail ``effect`` completes one of ``futures`` (see
        Reader._split_for)."""
        pending = self.pending.get(effect.request_id)
        if pending is None:
            return False
        for future in futures:
            if pending.future is future:
                return True
        return False

    # -- the drain, close -------------------------------------------------------

    def active(self) -> int:
        """Requests whose outcome this worker has not yet handed over (with the lock held)."""
        return len(self.pending) + len(self.creations)

    def fail_all(self, error: BaseException) -> None:
        """Fail every request still pending (the agent is closing)."""
        with self.agent.lock:
            pending, self.pending = self.pending, {}
        for item in pending.values():
            if not item.future.done():
                fail(item.future, error)


def _fail_with(future: torch.futures.Future, error) -> None:
    """Fail an internal future with a core effect's error: a :class:`fx.RemoteFailure`
    is the user function's exception, rebuilt here; anything else is the RPC layer's."""
    if not isinstance(error, fx.RemoteFailure):
        fail(future, error)
        return
    payload = error.payload
    fail(future, loads_exception(payload) if isinstance(payload, bytes)
         else RuntimeError(str(payload)), user=True)


def _caller_site() -> str:
    """The first frame outside localrref: where the application made the RRef."""
    frame = sys._getframe(1)
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame = frame.f_back
    if frame is None:
        return "?"
    return f"{frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}"

