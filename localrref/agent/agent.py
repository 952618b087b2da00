"""The RPC agent of one worker process: the shell that drives the protocol core.

Data flow (one worker; every arrow that leaves the box crosses a process)::

    app thread: rpc_async / remote / to_here
      | pickle args in this thread (RRefs -> core.prepare_child_fork under the lock,
      | big tensors -> ShmPool copy), then under the lock: core.rpc/remote/fetch
      v
    effects --Send--> Endpoint.send(dst, frame) ---------------------------> peer inbox
                                                                                 |
    the reader (one thread at a time; see leadership.py and wait_reply):
      an IO thread, or the application thread waiting in rpc_sync/to_here
      Endpoint.recv() <-------------------------------------------------- our inbox
      | decode frame; under the lock: core.handle(src, msg, now)
      v
    effects: Execute  -> an IO reader runs the user function itself (unpickle,
                         call, pickle the result, core.finish_*; Send); an
                         application reader hands it to the ElasticPool
             Complete -> unpickle the reply, Future.set_result
             Fail     -> futures.fail: the caller's future holds the error (futures.py)
    housekeeping thread: timers (core.on_tick at core.next_deadline()) and the
      releases of RRefs that Python dropped, woken through a self-pipe

Which thread touches what: ``self._lock`` guards the core and the futures
tables and nothing else; effects run after it is released (STYLE rule 6), so
no thread ever blocks, sends or runs user code while holding it. Python may
drop an RRef in any thread, at any allocation, even one holding the lock:
``RRef.__del__`` only appends to a deque and writes one byte to the
housekeeping pipe (no lock, no blocking), and the housekeeping thread tells
the core.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import os
import select
import threading
import time
from dataclasses import dataclass

import torch

from ..codec import frames
from ..codec.pickler import dumps, dumps_exception, loads, loads_exception, wrap_exception
from ..core import effects as fx
from ..core.messages import REQUEST_TYPES, USER_LEVEL_TYPES, ExceptionMessage
from ..core.rref_context import RetryPolicy, RRefContext
from ..core.shutdown import DelAllUsersAndUnforkedOwners
from ..errors import AsyncExecutionError, LocalRRefError, WorkerClosedError, WorkerGoneError
from ..transport.mpqueue import Endpoint
from ..transport.shm import ShmMapper, ShmPool
from ..world import (
    PEER_EXITED, SHUTDOWN_AGAIN, SHUTDOWN_ARRIVED, SHUTDOWN_DONE, SHUTDOWN_FAILED,
    SHUTDOWN_FINISHED, SHUTDOWN_PROCEED,
    describe_exitcode, shutdown_drained_message,
)
from .futures import fail, wait
from .handshake import HELLO, HELLO_BACK, Handshake, WorkerDesc
from .leadership import DEPOSED, LEAD, REQUESTED, Leadership
from .pool import ElasticPool

__all__ = ["Agent", "WorkerDesc"]

log = logging.getLogger("localrref")

# Unique in this process: tells this agent's handshake from a previous one's (handshake.py).
_AGENT_SERIALS = itertools.count()
# How often the housekeeper checks, while the world is busy, whether the
# inbox's reader has been inside user code (or parked) too long (see
# leadership.py): every 2 ms at first, twice as long after each check that found
# nothing wrong, up to 16 ms. Each check wakes a thread (tens of us of CPU on
# a VM, and a GIL hand-off): at a fixed 2 ms, four busy workers lost 7 % of
# the main job's throughput to them.
_WATCH_PERIOD_S = 0.002
_WATCH_PERIOD_MAX_S = 0.016
# How long a waiting caller waits for the IO thread to hand it the inbox
# before it waits on its future instead (see wait_reply).
_HANDOFF_WAIT_S = 0.0002


@dataclass(slots=True)
class _Pending:
    future: torch.futures.Future
    kind: str          # "call" | "fetch"
    dst: int


class Agent:
    """One worker's RPC agent. Built by ``init_rpc``; see the module docstring."""

    def __init__(self, spec, name: str, options) -> None:
        self.spec = spec
        self.rank = spec.rank
        self.world_size = spec.world_size
        self.name = name
        self.options = options
        self.shm_pool = ShmPool(spec.world_id, spec.rank, threshold=options.shm_threshold,
                                tracked=True)
        self.mapper = ShmMapper()
        # Frames too big for one atomic pipe write travel through shared memory.
        self.endpoint = Endpoint(spec.rank, spec.inboxes, blob_pool=self.shm_pool,
                                 blob_mapper=self.mapper, spin_s=options.spin_us * 1e-6)
        self.core = RRefContext(spec.rank, retry=RetryPolicy(
            ack_timeout=options.rpc_timeout if options.rpc_timeout > 0 else 60.0))
        self.executor = ElasticPool(options.num_worker_threads)
        self._lock = threading.Lock()
        self._pending: dict[int, _Pending] = {}
        # Calls and replies (USER_LEVEL_TYPES) sent and received, for the
        # shutdown drain; a sent message is counted before it leaves.
        self._count_lock = threading.Lock()
        self._user_sent = 0
        self._user_received = 0
        self._creation: dict[int, torch.futures.Future] = {}
        self._exposed_creations: set[int] = set()  # id(record): see expose_creation
        self._owner_waiters: dict[int, list[torch.futures.Future]] = {}
        self._releases: collections.deque = collections.deque()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._timer_target: float | None = None
        self._closing = False
        self.closed = False
        # Guarded by _peers_ready, as are its peers.
        self._handshake = Handshake(rank=self.rank, name=name, pid=os.getpid(),
                                    world_size=self.world_size, serial=next(_AGENT_SERIALS))
        self._peers_ready = threading.Condition()
        self._dead: dict[int, WorkerGoneError] = {}
        self._control: collections.deque = collections.deque()
        self._control_cv = threading.Condition()
        self._progress = threading.Condition()
        self._progress_waiters = 0
        self._shutdown_machine: DelAllUsersAndUnforkedOwners | None = None
        self.default_timeout = options.rpc_timeout
        # id(record) -> "file:line in function", when the world records creation sites.
        self._sites: dict[int, str] = {}
        self._record_sites = bool(getattr(spec, "record_creation_sites", False))
        # Who reads the inbox (see leadership.py); _io_threads is guarded by its lock.
        self._lead = Leadership(start_reader=self._start_io_thread_locked,
                                wake_watch=lambda: self._wake_housekeeper(b"w"),
                                on_depose=self._inbox_deposed)
        self._io_threads: set[threading.Thread] = set()
        self._housekeeper = threading.Thread(target=self._housekeeping_loop,
                                             name="localrref-housekeeping", daemon=True)
        from ..rref import RRef  # the public RRef imports this module
        self._rref_type = RRef

    # ------------------------------------------------------------------
    # Start: meet every peer
    # ------------------------------------------------------------------

    def start(self, init_timeout: float) -> None:
        with self._lead.lock:
            self._start_io_thread_locked()
        self._housekeeper.start()
        hello = frames.encode_control(self._handshake.hello())
        for rank in range(self.world_size):
            if rank != self.rank:
                self.endpoint.send(rank, hello)
        deadline = time.monotonic() + init_timeout
        with self._peers_ready:
            while not self._handshake.complete and not self._dead and not self._closing:
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = self._handshake.missing()
                    raise RuntimeError(
                        f"init_rpc timed out after {init_timeout:.0f} s waiting for ranks "
                        f"{missing} to call init_rpc (every worker of the world must call it)")
                self._peers_ready.wait(left)
            if self._dead:
                raise next(iter(self._dead.values()))
        names = collections.Counter(p.name for p in self._handshake.peers.values())
        duplicates = sorted(n for n, c in names.items() if c > 1)
        if duplicates:
            name = duplicates[0]
            ranks = sorted(p.rank for p in self._handshake.peers.values() if p.name == name)
            raise RuntimeError(f"worker name {name!r} is not unique: ranks {ranks} all use it; "
                               f"give every worker its own name")

    def _on_hello(self, src: int, message: tuple) -> None:
        with self._peers_ready:
            if self._closing:
                return
            reply = self._handshake.receive(message)
            for rank, text in self._handshake.mismatches.items():
                self._dead.setdefault(rank, RuntimeError(text))
            self._peers_ready.notify_all()
        if reply is not None:
            with contextlib.suppress(WorkerClosedError, WorkerGoneError):
                # Closing, or the peer is gone: then nobody needs the answer.
                self.endpoint.send(src, frames.encode_control(reply))

    # ------------------------------------------------------------------
    # Names
    # ------------------------------------------------------------------

    def peers(self) -> list[WorkerDesc]:
        self._await_peers()
        return [self._handshake.peers[r] for r in sorted(self._handshake.peers)]

    def peer(self, rank: int) -> WorkerDesc:
        if rank not in self._handshake.peers:
            self._await_peers()
        return self._handshake.peers[rank]

    def rank_of(self, name: str) -> int | None:
        for desc in self._handshake.peers.values():
            if desc.name == name:
                return desc.rank
        if self._await_peers():
            return self.rank_of(name)
        return None

    def _await_peers(self) -> bool:
        """Wait until every peer is known; False if that was already so.

        A peer whose own init_rpc has returned may call this worker while it
        is still meeting the others, and the function it runs may name a
        worker this one has not heard from yet: names resolve once the
        handshake is complete (or init_rpc fails, and with it the lookup).
        """
        if self._handshake.complete:
            return False
        with self._peers_ready:
            while not (self._handshake.complete or self._dead or self._closing):
                self._peers_ready.wait(1.0)
        return True

    # ------------------------------------------------------------------
    # Calls the application makes
    # ------------------------------------------------------------------

    def _check_open(self) -> None:
        if self.closed or self._closing:
            raise WorkerClosedError("RPC has been shut down on this worker; call "
                                    "localrref.init_rpc again before making RPCs")

    def _timeout(self, timeout: float | None) -> float:
        if timeout is None or timeout < 0:
            return self.default_timeout
        return float(timeout)

    def encode(self, obj):
        return dumps(obj, fork=self._fork, abandon=self._abandon, pool=self.shm_pool,
                     rref_type=self._rref_type)

    def _fork(self, rref) -> object:
        record = rref._record_for(self)
        with self._lock:
            return self.core.prepare_child_fork(record)

    def _abandon(self, fork_data) -> None:
        with self._lock:
            self.core.abandon_child_fork(fork_data)
            effects = self.core.take_effects()
        self._run(effects)

    def rpc_async(self, dst: int, func, args, kwargs, timeout, *,
                  will_wait: bool = False) -> torch.futures.Future:
        """Send a call; ``will_wait``: the caller passes the future to :meth:`wait_reply`."""
        self._check_open()
        if self._lead.leader == threading.get_ident() and not (will_wait and self._lead.parked):
            self._lead.step_down(threading.get_ident())
        future = torch.futures.Future()
        if dst in self._dead:
            fail(future, self._dead[dst])
            return future
        encoded = self.encode((func, args, kwargs))
        with self._lock:
            request_id = self.core.rpc(dst, encoded.data, encoded.forks, now=time.monotonic(),
                                       timeout=self._timeout(timeout))
            self._pending[request_id] = _Pending(future, "call", dst)
            effects = self.core.take_effects()
            self._poke_timer_locked()
        self._run(effects)
        return future

    def remote(self, dst: int, func, args, kwargs, timeout):
        self._check_open()
        if self._lead.leader == threading.get_ident() and not self._lead.parked:
            # User code run by the reader; remote() from a parked caller is fine.
            self._lead.step_down(threading.get_ident())
        if dst in self._dead:
            raise self._dead[dst]
        encoded = self.encode((func, args, kwargs))
        creation = torch.futures.Future()
        with self._lock:
            record = self.core.remote(dst, encoded.data, encoded.forks, now=time.monotonic(),
                                      timeout=self._timeout(timeout))
            self._creation[id(record)] = creation
            effects = self.core.take_effects()
            self._poke_timer_locked()
        if self._record_sites:
            self._sites[id(record)] = _caller_site()
        rref = self._rref_type._adopt(self, record, creation)
        self._run(effects)
        return rref

    def fetch(self, record, timeout, *, will_wait: bool = False) -> torch.futures.Future:
        """The value of ``record`` (to_here): local owners wait for their job."""
        self._check_open()
        if self._lead.leader == threading.get_ident() and not (will_wait and self._lead.parked):
            self._lead.step_down(threading.get_ident())
        future = torch.futures.Future()
        if record.is_owner:
            self._owner_value(record, future)
            return future
        if record.owner in self._dead:
            fail(future, self._dead[record.owner])
            return future
        with self._lock:
            request_id = self.core.fetch(record, now=time.monotonic(),
                                         timeout=self._timeout(timeout))
            self._pending[request_id] = _Pending(future, "fetch", record.owner)
            effects = self.core.take_effects()
            self._poke_timer_locked()
        self._run(effects)
        return future

    def _owner_value(self, owner, future) -> None:
        with self._lock:
            ready = owner.has_value
            if not ready:
                self._owner_waiters.setdefault(id(owner), []).append(future)
        if ready:
            self._settle_owner_future(owner, future)

    def _settle_owner_future(self, owner, future) -> None:
        if owner.error is not None:
            fail(future, self.owner_error(owner))
        else:
            future.set_result(owner.value)

    def owner_error(self, owner) -> BaseException:
        """The exception the ``remote()`` creating ``owner`` raised (a new object each time)."""
        return loads_exception(owner.error)

    def create_local(self, value):
        """``RRef(value)``: an OwnerRRef on this worker, outside the tables until shared."""
        with self._lock:
            owner = self.core.create_owner_rref()
        owner.set_value(value)
        if self._record_sites:
            self._sites[id(owner)] = _caller_site()
        return owner

    def defer_release(self, record) -> None:
        """Called from ``RRef.__del__`` in any thread: never blocks, never locks."""
        if self.closed:
            return
        self._releases.append(record)
        # The inbox's reader, if it spins, takes the release on its next
        # turn; otherwise the housekeeper is woken for it (a wake-up costs
        # tens of microseconds here, see Endpoint._wait_readable).
        if self._lead.leader == threading.get_ident() or self._lead.parked:
            # The thread holding the inbox (this one, running a job or a
            # callback, or one parked between calls) takes it before its
            # next read; if a parked one stays away, the watch does.
            return
        if self.endpoint.nudge():
            return
        self._wake_housekeeper(b"r")

    # ------------------------------------------------------------------
    # Effects
    # ------------------------------------------------------------------

    def _run(self, effects, *, inline_jobs: bool = False) -> None:
        jobs = []
        for effect in effects:
            match effect:
                case fx.Send():
                    self._send(effect.dst, effect.message)
                case fx.Execute():
                    if inline_jobs:
                        jobs.append(effect)
                        continue
                    try:
                        self.executor.submit(self._run_job, effect)
                    except Exception as exc:
                        self._fail_job(effect, exc)
                case fx.Complete():
                    self._complete(effect)
                case fx.Fail():
                    self._fail(effect)
                case fx.CreationSettled():
                    self._creation_settled(effect)
                case fx.Released():
                    pass
                case fx.Log():
                    log.log(logging.getLevelName(effect.level.upper()), "%s", effect.text)
        for job in jobs:
            # Leader/followers: this thread read the request, so it runs it
            # now, with no hand-off on the call's path (see leadership.py for who
            # reads the inbox meanwhile).
            self._run_job(job)

    def _send(self, dst: int, message) -> None:
        counted = message.type in USER_LEVEL_TYPES
        if counted:
            with self._count_lock:
                self._user_sent += 1
        try:
            if dst in self._dead:
                raise self._dead[dst]
            self.endpoint.send(dst, frames.encode_message(message))
        except Exception as exc:
            if counted:
                with self._count_lock:
                    self._user_sent -= 1  # it never left
            gone = isinstance(exc, (WorkerGoneError, WorkerClosedError))
            if message.type not in REQUEST_TYPES:
                if gone:
                    log.info("could not send %s to rank %d: %s", message.type.value, dst, exc)
                else:
                    self._reply_failed(dst, message, exc)
                return
            with self._lock:
                effects = self.core.on_send_failed(message.request_id, exc, now=time.monotonic())
                self._poke_timer_locked()
            self._run(effects)

    def _reply_failed(self, dst: int, message, exc: BaseException) -> None:
        """A reply could not be sent: undo its forks and tell the caller why."""
        log.warning("could not send %s to rank %d: %s", message.type.value, dst, exc)
        for fork_data in getattr(message, "rrefs", ()):
            self._abandon(fork_data)
        if message.type.value in ("PYTHON_RET", "PYTHON_RREF_FETCH_RET"):
            payload = dumps_exception(wrap_exception(RuntimeError(
                f"the reply could not be sent: {type(exc).__name__}: {exc}"),
                self.worker_info_text()))
            with self._count_lock:
                self._user_sent += 1
            try:
                self.endpoint.send(dst, frames.encode_message(
                    ExceptionMessage(request_id=message.request_id, payload=payload)))
            except Exception:
                with self._count_lock:
                    self._user_sent -= 1
                log.exception("localrref: could not tell rank %d its reply failed", dst)

    def _complete(self, effect: fx.Complete) -> None:
        pending = self._pending.get(effect.request_id)
        wrappers = [self._rref_type._adopt(self, record) for record in effect.rrefs]
        if pending is None:
            return
        try:
            value, _ = loads(effect.payload, rrefs=wrappers, mapper=self.mapper)
        except BaseException as exc:
            value = None
            fail(pending.future, RuntimeError(
                f"could not unpickle the reply from {self._describe(pending.dst)}: "
                f"{type(exc).__name__}: {exc}"))
        else:
            del wrappers
            pending.future.set_result(value)
        finally:
            self._settled(effect.request_id)

    def _fail(self, effect: fx.Fail) -> None:
        pending = self._pending.get(effect.request_id)
        if pending is None:
            return
        error = effect.error
        if isinstance(error, fx.RemoteFailure):
            error = loads_exception(error.payload) if isinstance(error.payload, bytes) \
                else RuntimeError(str(error.payload))
        try:
            fail(pending.future, error)
        finally:
            self._settled(effect.request_id)

    def _settled(self, request_id: int) -> None:
        # Only now, with the future's callbacks run: a callback may start a
        # new call, and until it has, this one still counts as work in
        # flight for the shutdown drain (see active_work).
        with self._lock:
            self._pending.pop(request_id, None)
        self._signal_progress()

    def expose_creation(self, record) -> None:
        """The creation future of ``record`` was handed to the application."""
        self._exposed_creations.add(id(record))

    def _creation_settled(self, effect: fx.CreationSettled) -> None:
        key = id(effect.rref)
        future = self._creation.get(key)
        if future is None:
            return
        error = effect.error
        try:
            if error is None:
                future.set_result(True)
            else:
                if isinstance(error, fx.RemoteFailure):
                    error = loads_exception(error.payload)
                fail(future, error)
        finally:
            # After the callbacks, as in _settled.
            with self._lock:
                self._creation.pop(key, None)
                self._exposed_creations.discard(key)
            self._signal_progress()

    # ------------------------------------------------------------------
    # Jobs (on pool threads)
    # ------------------------------------------------------------------

    def _run_job(self, job: fx.Execute) -> None:
        if job.kind is fx.JobKind.FETCH:
            self._serve_fetch(job)
            return
        wrappers = [self._rref_type._adopt(self, record) for record in job.rrefs]
        load_error = None
        try:
            func, args, kwargs = loads(job.payload, rrefs=wrappers, mapper=self.mapper)[0]
        except BaseException as exc:
            load_error = exc
        del wrappers
        if load_error is not None:
            self._fail_job(job, load_error)
            return
        is_async = getattr(func, "_wrapped_async_rpc_function", None) is not None
        name = getattr(func, "__qualname__", repr(func))
        error = None
        try:
            result = func(*args, **(kwargs or {}))
        except BaseException as exc:
            error, result = exc, None
        # The RRefs among the arguments are dropped before the reply leaves:
        # once the caller has its answer, nothing of this call may still hold
        # them (a shutdown that follows would report them as leaked).
        del func, args, kwargs
        if error is not None:
            self._fail_job(job, error)
            return
        if is_async:
            if not isinstance(result, torch._C.Future):
                self._fail_job(job, AsyncExecutionError(
                    f"Functions decorated with @rpc.async_function must return a "
                    f"torch.futures.Future object, but got {type(result).__module__}."
                    f"{type(result).__qualname__} ({name} is decorated with "
                    f"@rpc.functions.async_execution)"))
                return
            result.add_done_callback(lambda f: self._finish_async(job, f))
            return
        self._finish_job(job, result)

    def _finish_async(self, job, future) -> None:
        try:
            value = future.value()
        except BaseException as exc:
            self._fail_job(job, exc)
            return
        self._finish_job(job, value)

    def _finish_job(self, job, result) -> None:
        if job.kind is fx.JobKind.REMOTE:
            with self._lock:
                effects = self.core.finish_remote(job.job_id, result)
                waiters = self._owner_waiters.pop(id(job.owner), [])
            # Fetches that waited for this value are served right here: the
            # value is hot, and a hand-off would add a wake-up to to_here().
            self._run(effects, inline_jobs=True)
            for future in waiters:
                self._settle_owner_future(job.owner, future)
            self._signal_progress()
            return
        self._reply_with(job, result)

    def _reply_with(self, job, value) -> None:
        """Pickle ``value`` (forking its RRefs) and send it as the job's reply."""
        try:
            encoded = self.encode(value)
        except BaseException as exc:
            self._fail_job(job, exc)
            return
        with self._lock:
            effects = self.core.finish_call(job.job_id, encoded.data, encoded.forks)
        self._run(effects)
        self._signal_progress()

    def _fail_job(self, job, exc: BaseException) -> None:
        payload = dumps_exception(wrap_exception(exc, self.worker_info_text()))
        # The formatted traceback travels; the frames (and the arguments they
        # hold) are let go before the reply is sent.
        exc.__traceback__ = None
        with self._lock:
            effects = self.core.fail_job(job.job_id, payload)
            waiters = self._owner_waiters.pop(id(job.owner), []) if job.owner is not None else []
        self._run(effects, inline_jobs=True)
        for future in waiters:
            self._settle_owner_future(job.owner, future)
        self._signal_progress()

    def _serve_fetch(self, job) -> None:
        owner = job.owner
        if owner.error is not None:
            with self._lock:
                effects = self.core.fail_job(job.job_id, owner.error)
            self._run(effects)
            return
        self._reply_with(job, owner.value)

    def worker_info_text(self) -> str:
        return f"WorkerInfo(id={self.rank}, name={self.name})"

    def _describe(self, rank: int) -> str:
        desc = self._handshake.peers.get(rank)
        return f"rank {rank} ({desc.name!r})" if desc else f"rank {rank}"

    # ------------------------------------------------------------------
    # Threads
    # ------------------------------------------------------------------

    def _start_io_thread_locked(self) -> None:
        """Start an IO thread (called with the leadership's lock held).

        A thread leaves ``_io_threads`` only once it is dead, not when
        ``_io_loop`` returns: after that it still frees its frame (the last
        effects, tensors among them, whose dealloc drops the GIL inside
        torch). Were close() not to join it, that could run into interpreter
        finalization, and a thread that takes the GIL back then is killed
        inside torch's C++, which aborts the whole process ("terminate called
        without an active exception", pytorch/pytorch#38228).
        """
        self._io_threads = {t for t in self._io_threads if t.is_alive()}
        thread = threading.Thread(target=self._io_loop, name="localrref-io", daemon=True)
        self._io_threads.add(thread)
        thread.start()

    def _inbox_deposed(self) -> None:
        if self._releases:
            self._wake_housekeeper(b"r")  # dropped while the inbox was parked

    def _io_loop(self) -> None:
        """An IO thread: follow, lead (read, carry out effects), step down or retire.

        See leadership.py for when a leader gives up the inbox and why it
        runs user functions itself.
        """
        lead = self._lead
        me = threading.get_ident()
        lead.io_thread_started(me)
        try:
            while lead.wait_to_lead(me):
                while True:
                    effects = self._lead_once()
                    if self._releases:
                        self._take_releases()
                    if effects is None:
                        lead.stop_reading(me)
                        return
                    if effects:
                        lead.busy_begin()
                        try:
                            self._run(effects, inline_jobs=True)
                        except Exception:
                            log.exception("localrref: error carrying out effects")
                        still_leader = lead.busy_end(me)
                        if self._releases:  # RRefs the job dropped (see defer_release)
                            self._take_releases()
                        if not still_leader:
                            break  # deposed meanwhile: another thread reads the inbox
                    self._signal_progress()
                    if lead.handoff_to is not None and lead.hand_off(me):
                        break
                self._signal_progress()
                if lead.should_retire():
                    return
        finally:
            lead.io_thread_exited(me)

    def release_inbox(self) -> None:
        """This thread stops holding the inbox between waits (see wait_reply)."""
        me = threading.get_ident()
        if self._lead.leader == me:
            self._lead.step_down(me)

    # ------------------------------------------------------------------
    # The caller reads its own reply
    # ------------------------------------------------------------------

    def wait_reply(self, future: torch.futures.Future):
        """``wait(future)``, reading the inbox in this thread while it can.

        A blocking call (rpc_sync, to_here) that waits on a torch future
        needs a second thread to read the reply and wake it: two wake-ups
        per call in this process, and two threads fighting over the GIL.
        Instead the waiting thread takes the inbox from the IO thread (only
        from one that spins, which hands over within a few microseconds; a
        sleeping one is left to wake for the reply itself), reads until its
        reply is in, and then *keeps* the inbox, parked, so that its next
        call needs no hand-off at all. Jobs and other futures' completions it
        reads go to the pool. The IO threads get the inbox back on an
        rpc_async or a shutdown by the parked thread, when another thread
        waits on a future, or when the housekeeper's watch finds the parked
        thread away for a whole period (2 to 16 ms, ``_WATCH_PERIOD_S``).
        """
        me = threading.get_ident()
        if not future.done() and self._claim_inbox(me):
            try:
                self._read_until(future, me)
            finally:
                self._lead.park(me)
        if future.done():
            return wait(future)
        self._lead.fallback_wait_begins()
        try:
            return wait(future)
        finally:
            self._lead.fallback_wait_ends()

    def _claim_inbox(self, me: int) -> bool:
        """Become the inbox's reader for this wait; False: another thread brings the reply."""
        outcome = self._lead.claim(me)
        if outcome != REQUESTED:
            return outcome == LEAD
        if not self.endpoint.nudge():
            # The IO thread sleeps in poll: waking it to hand over would cost
            # more than letting it wake for the reply itself.
            return self._lead.withdraw(me)
        deadline = time.perf_counter() + _HANDOFF_WAIT_S
        while (handed := self._lead.poll_handoff(me, time.perf_counter() > deadline)) is None:
            os.sched_yield()
        return handed

    def _read_until(self, future, me: int) -> None:
        def reply_arrived(_future, me=me):
            # Completed by another thread (a timeout, a peer's death): this
            # thread may be in recv, so make it look.
            if threading.get_ident() != me and not self.endpoint.nudge():
                self.endpoint.wake()

        future.add_done_callback(reply_arrived)
        while not future.done() and self._lead.leader == me:
            if self._releases:
                self._take_releases()
            effects = self._lead_once()
            if effects is None:
                return
            if effects:
                mine, others = self._split_for(future, effects)
                if others:
                    # Other futures' callbacks are user code that must not
                    # run on this thread (one could wait for this very
                    # caller), and jobs go to the pool.
                    self._run_on_pool(others)
                self._lead.busy_begin()
                try:
                    self._run(mine)
                except Exception:
                    log.exception("localrref: error carrying out effects")
                still_leader = self._lead.busy_end(me)
                if self._releases:
                    self._take_releases()
                if not still_leader:
                    return
            self._signal_progress()

    def _run_on_pool(self, effects) -> None:
        try:
            self.executor.submit(self._run, effects)
        except Exception:  # the pool is at its limit or closing:
            self._run(effects)  # better on this thread than never

    def _split_for(self, future, effects) -> tuple[list, list]:
        """The effects this waiting thread carries out itself, and the rest."""
        mine, others = [], []
        for effect in effects:
            if isinstance(effect, (fx.Complete, fx.Fail)):
                pending = self._pending.get(effect.request_id)
                ours = pending is not None and pending.future is future
                (mine if ours else others).append(effect)
            elif isinstance(effect, fx.Execute) or (
                    isinstance(effect, fx.CreationSettled)
                    and id(effect.rref) in self._exposed_creations):
                others.append(effect)
            else:
                mine.append(effect)
        return mine, others

    def _lead_once(self):
        """Read and handle one frame as leader; return its effects, or None to stop."""
        if self._closing:
            return None
        try:
            item = self.endpoint.recv(None)
        except (WorkerClosedError, OSError, ValueError):
            return None
        if item is None:
            return None if self._closing else []
        src, frame = item
        try:
            kind, obj = frames.decode(frame)
        except Exception:
            log.exception("localrref: dropped an undecodable frame from rank %d", src)
            return []
        if kind == "control":
            self._on_control(src, obj)
            return []
        if obj.type in USER_LEVEL_TYPES:
            with self._count_lock:
                self._user_received += 1
        try:
            with self._lock:
                effects = self.core.handle(src, obj, now=time.monotonic())
                self._poke_timer_locked()
        except Exception:
            log.exception("localrref: error handling %s from rank %d",
                          getattr(obj, "type", obj), src)
            return []
        return effects

    def _on_control(self, src: int, message: tuple) -> None:
        tag = message[0] if message else None
        if tag == HELLO or tag == HELLO_BACK:
            self._on_hello(src, message)
        elif tag == PEER_EXITED:
            _, rank, pid, exitcode = message
            self._on_peer_exited(rank, pid, exitcode)
        else:
            with self._control_cv:
                self._control.append(message)
                self._control_cv.notify_all()
            self._signal_progress()

    def _on_peer_exited(self, rank: int, pid: int, exitcode: int) -> None:
        desc = self._handshake.peers.get(rank)
        who = f"rank {rank}" + (f" ({desc.name!r})" if desc else "")
        error = WorkerGoneError(
            f"worker {who}, pid {pid}, {describe_exitcode(exitcode)}; every call that "
            f"depended on it fails", name=desc.name if desc else None, rank=rank, pid=pid,
            exitcode=exitcode)
        with self._lock:
            self._dead[rank] = error
            effects = self.core.on_peer_gone(rank, error, now=time.monotonic())
        with self._peers_ready:
            self._peers_ready.notify_all()
        if threading.get_ident() in self._lead.io_idents:
            self._run(effects)
        else:
            # Read by a caller waiting for its reply (wait_reply): the failed
            # futures' callbacks are user code, and must not run on it.
            self._run_on_pool(effects)
        with self._control_cv:
            self._control_cv.notify_all()
        self._signal_progress()

    def _poke_timer_locked(self) -> None:
        deadline = self.core.next_deadline()
        if deadline is not None and (self._timer_target is None or deadline < self._timer_target):
            self._timer_target = deadline
            self._wake_housekeeper(b"t")

    def _housekeeping_loop(self) -> None:
        next_watch = None
        period = _WATCH_PERIOD_S
        while not self._closing:
            now = time.monotonic()
            with self._lock:
                deadline = self.core.next_deadline()
                if deadline is None and self._timer_target is not None \
                        and self._timer_target > now:
                    # No timer armed now, but keep waking at the old target:
                    # a call made meanwhile then need not wake this thread
                    # (its deadline is later), and that one spurious wake-up
                    # is cheaper than a wake-up per call.
                    deadline = self._timer_target
                self._timer_target = deadline
            wake_at = deadline if next_watch is None else (
                next_watch if deadline is None else min(deadline, next_watch))
            timeout = None if wake_at is None else max(0.0, wake_at - now)
            try:
                readable, _, _ = select.select([self._wake_r], [], [], timeout)
                woken = os.read(self._wake_r, 4096) if readable else b""
            except BlockingIOError:
                woken = b""
            except (OSError, ValueError):
                return
            if self._closing:
                return
            now = time.monotonic()
            if next_watch is None and self._lead.watching:
                period = _WATCH_PERIOD_S
                next_watch = now + period
            elif next_watch is not None and now >= next_watch:
                outcome = self._lead.watch_tick()
                if outcome is None:
                    next_watch = None
                else:
                    period = _WATCH_PERIOD_S if outcome == DEPOSED else min(
                        2 * period, _WATCH_PERIOD_MAX_S)
                    next_watch = now + period
            if woken.strip(b"w") or (deadline is not None and now >= deadline):
                self._housekeeping_pass()

    def _wake_housekeeper(self, why: bytes) -> None:
        try:
            os.write(self._wake_w, why)
        except (BlockingIOError, OSError):
            pass  # the pipe is full (a wake-up is pending anyway) or closed

    def _take_releases(self) -> None:
        """Tell the core about the RRefs Python dropped (see defer_release)."""
        with self._lock:
            self._release_locked()
            effects = self.core.take_effects()
        self._run(effects)

    def _release_locked(self) -> None:
        releases = self._releases
        while releases:
            record = releases.popleft()
            try:
                self.core.release(record)
            except LocalRRefError:
                log.exception("localrref: releasing %r", record)

    def _housekeeping_pass(self) -> None:
        now = time.monotonic()
        with self._lock:
            self._release_locked()
            effects = self.core.take_effects()
            effects += self.core.on_tick(now)
            if self._shutdown_machine is not None:
                effects += self._shutdown_machine.poll(now)
        self._run(effects)
        self._signal_progress()

    @contextlib.contextmanager
    def _awaiting_progress(self):
        """Hold the progress condition, counted as a waiter (see _signal_progress)."""
        with self._progress:
            self._progress_waiters += 1
            try:
                yield
            finally:
                self._progress_waiters -= 1

    def _signal_progress(self) -> None:
        # Called after every handled message: take the condition's lock only
        # when someone waits (a waiter counts itself before checking its
        # predicate, so no wake-up is lost).
        if self._progress_waiters:
            with self._progress:
                self._progress.notify_all()

    # ------------------------------------------------------------------
    # Debug info and shutdown
    # ------------------------------------------------------------------

    def debug_info(self) -> dict[str, str]:
        with self._lock:
            info = self.core.get_debug_info()
            pending = len(self._pending)
        out = {key: str(value) for key, value in info.items()}
        out.update({
            "agent.num_pending_calls": str(pending),
            "agent.worker_threads": str(self.executor.thread_count),
            "agent.threads": str(threading.active_count()),
            "agent.shm_segments": str(len(self.shm_pool.segment_names())),
            "agent.num_deferred_releases": str(len(self._releases)),
        })
        return out

    def wait_until_quiet(self, timeout: float) -> bool:
        """Wait (on progress events, not by polling) until this worker holds no RRef state."""
        self.release_inbox()
        deadline = time.monotonic() + timeout
        with self._awaiting_progress():
            while True:
                with self._lock:
                    core = self.core
                    quiet = not (core.owners or core.forks or core.pending_users
                                 or core.pending_children or core.confirmed_users
                                 or core.num_pending_futures or self._releases)
                if quiet:
                    return True
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._progress.wait(left)

    def wait_control(self, tags: set[str], timeout: float | None, what: str) -> tuple:
        self.release_inbox()
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._control_cv:
            while True:
                for i, message in enumerate(self._control):
                    if message[0] == SHUTDOWN_FAILED:
                        del self._control[i]
                        raise RuntimeError(f"graceful shutdown failed: {message[1]}")
                    if message[0] in tags:
                        del self._control[i]
                        return message
                if self._dead:
                    raise next(iter(self._dead.values()))
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise RuntimeError(f"graceful shutdown timed out after {timeout:.0f} s "
                                       f"waiting for {what}")
                self._control_cv.wait(left)

    def graceful_shutdown(self, timeout: float) -> list[dict]:
        """The worker's half of the supervisor-driven shutdown; returns leak records."""
        self.release_inbox()
        supervisor = self.world_size
        # The supervisor bounds each phase and names who is missing; this
        # worker's own bound is only a backstop should the supervisor vanish.
        backstop = 2 * timeout + 10
        # Young cyclic garbage (RRefs in fresh reference cycles) is freed
        # first; a full collection would cost ~40 ms with torch loaded, more
        # than the whole shutdown should, so older cycles are the
        # application's to break (torch's leak warning says the same).
        import gc
        gc.collect(1)
        self._housekeeping_pass()
        self.endpoint.send(supervisor, frames.encode_control((SHUTDOWN_ARRIVED, self.rank)))
        # Unbounded here: other workers may legitimately still be working
        # (torch's shutdown waits for them too). A peer that dies, or the
        # supervisor's --shutdown-timeout, ends the wait with a named error.
        self.wait_control({SHUTDOWN_PROCEED}, None, "every worker to reach shutdown()")
        self._drain()
        self._housekeeping_pass()
        # Every application has stopped making RPCs: what is still held, and
        # what every owner keeps, is the leak report. It is taken before any
        # worker deletes anything (the next barrier), or an early delete
        # could free an owner before its value was described.
        held = self.leak_records()
        self.endpoint.send(supervisor, frames.encode_control((SHUTDOWN_DONE, self.rank, held)))
        self.wait_control({SHUTDOWN_PROCEED}, backstop, "every worker to report its RRefs")
        now = time.monotonic()
        machine = DelAllUsersAndUnforkedOwners(self.core, now=now, timeout=max(timeout, 1.0))
        with self._lock:
            self._shutdown_machine = machine
            effects = machine.poll(now)
        self._run(effects)
        deadline = time.monotonic() + max(timeout, 1.0) * 2
        with self._awaiting_progress():
            while True:
                with self._lock:
                    effects = machine.poll(time.monotonic())
                    settled = machine.done and self.core.num_pending_futures == 0
                self._run(effects)
                if settled or self._dead or time.monotonic() > deadline:
                    break
                self._progress.wait(0.05)
        if self._dead:
            raise next(iter(self._dead.values()))
        with self._lock:
            # torch's checkRRefLeaks, as a warning in the seed's wording.
            self.core.check_rref_leaks(ignore_rref_leak=True)
            effects = self.core.take_effects()
        self._run(effects)
        # The last barrier: nobody stops serving while a peer still deletes.
        self.endpoint.send(supervisor, frames.encode_control((SHUTDOWN_FINISHED, self.rank)))
        self.wait_control({SHUTDOWN_PROCEED}, backstop, "every worker to finish deleting RRefs")
        return held

    def _drain(self) -> None:
        """Rounds of the drain barrier (launch/control.py): until no worker has work in flight.

        Each round this worker waits until it has no call or job of its own
        in flight, then reports the calls and replies it has sent and
        received; the supervisor decides when the rounds prove the world idle.

        Unbounded here, as the arrive phase: calls may run as long as they
        need (torch's join waits too); a peer's death or the supervisor's
        --shutdown-timeout ends it with a named error.
        """
        supervisor = self.world_size
        while True:
            self._wait_until_idle()
            with self._count_lock:
                counts = (self._user_sent, self._user_received)
            self.endpoint.send(supervisor, frames.encode_control(
                shutdown_drained_message(self.rank, *counts)))
            reply = self.wait_control({SHUTDOWN_PROCEED, SHUTDOWN_AGAIN}, None,
                                      "every worker to finish the calls it had in flight")
            if reply[0] == SHUTDOWN_PROCEED:
                return

    def active_work(self) -> int:
        """Calls this worker waits for, remote() creations pending, and jobs it runs.

        A call leaves the count only once its future's callbacks have run
        (see _settled): until then one of them may still start another.
        """
        with self._lock:
            return len(self._pending) + len(self._creation) + len(self.core.jobs)

    def _wait_until_idle(self) -> None:
        with self._awaiting_progress():
            while self.active_work():
                with self._control_cv:
                    if any(m[0] == SHUTDOWN_FAILED for m in self._control):
                        return  # wait_control raises it
                if self._dead:
                    raise next(iter(self._dead.values()))
                # Progress is signalled after every message handled, every job
                # finished and every control message; the timeout only bounds
                # how late a missed signal could be noticed.
                self._progress.wait(0.05)

    def leak_records(self) -> list[dict]:
        """What this worker still holds as shutdown begins, one dict per reference.

        The states are the protocol's: a ``confirmed_user`` the application
        still holds, a ``pending_user`` not yet confirmed, a ``pending_child``
        (a fork this worker sent, not yet accepted) and an ``unforked_owner``.
        An ``owner_value`` record tells the supervisor the type and tensor
        bytes of each value this worker owns, to fill in its users' lines.
        """
        with self._lock:
            core = self.core
            records = []

            def add(record, fork_id, state, holder=self.rank):
                records.append({
                    "rref_id": str(record.rref_id), "fork_id": str(fork_id),
                    "owner_rank": record.owner, "holder_rank": holder, "state": state,
                    "value_type": None, "tensor_bytes": None,
                    "creation_site": self._sites.get(id(record))})

            for fork_id, record in core.confirmed_users.items():
                if record.holds > 0:
                    add(record, fork_id, "confirmed_user")
            for fork_id, state in core.pending_users.items():
                add(state.rref, fork_id, "pending_user")
            for fork_id, record in core.pending_children.items():
                add(record, fork_id, "pending_child")
            for rref_id, owner in core.owners.items():
                value_type, tensor_bytes = _describe_value(owner)
                if rref_id not in core.forks:
                    add(owner, rref_id, "unforked_owner")
                    records[-1].update(value_type=value_type, tensor_bytes=tensor_bytes)
                records.append({"rref_id": str(rref_id), "state": "owner_value",
                                "value_type": value_type, "tensor_bytes": tensor_bytes,
                                "creation_site": self._sites.get(id(owner))})
            return records

    def _fail_pending(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, {}
        closed = WorkerClosedError("RPC was shut down while this call was pending")
        for item in pending.values():
            if not item.future.done():
                fail(item.future, closed)

    def close(self) -> None:
        """Stop every thread and release every OS resource (idempotent)."""
        if self.closed:
            return
        self._closing = True
        self._wake_housekeeper(b"x")
        self._lead.close()
        self.endpoint.wake()
        # A thread blocked on a reply (a served function inside rpc_sync, a
        # parked caller) waits on a future only this agent can complete:
        # fail those first, or each join below would sit out its timeout.
        self._fail_pending()
        with self._lead.lock:
            io_threads = list(self._io_threads)
        for thread in io_threads:
            if thread is not threading.current_thread():
                thread.join(5.0)
        self._housekeeper.join(5.0)
        self.executor.shutdown(5.0)
        with self._lock:
            self.core.destroy_instance(ignore_rref_leak=True)
        self._fail_pending()
        self.closed = True
        self.endpoint.close()
        self.shm_pool.close()
        self.mapper.close()
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass


def _caller_site() -> str:
    """The first frame outside localrref: where the application made the RRef."""
    import sys
    frame = sys._getframe(1)
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame = frame.f_back
    if frame is None:
        return "?"
    return f"{frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}"


def _describe_value(owner) -> tuple[str | None, int]:
    if owner is None or not owner.has_value or owner.error is not None:
        return None, 0
    value = owner.value
    total = 0
    stack = [value]
    seen = 0
    while stack and seen < 10_000:
        item = stack.pop()
        seen += 1
        if isinstance(item, torch.Tensor):
            total += item.numel() * item.element_size()
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set)):
            stack.extend(item)
        elif isinstance(item, torch.nn.Module):
            stack.extend(item.state_dict().values())
    return type(value).__qualname__, total

