"""The RPC agent of one worker process: the composition root of its parts.

Data flow (one worker; every arrow that leaves the box crosses a process)::

    app thread: calls.py  rpc_async / remote / to_here
      | pickle args in this thread (RRefs -> core.prepare_child_fork under the lock,
      | big tensors -> the shared-memory pool), then under the lock: core.rpc/remote/fetch
      v
    effects --Send--> transport.send(dst, frame) --------------------------> peer inbox
                                                                                 |
    reader.py: one thread at a time reads the inbox (an IO thread, or the
      application thread waiting in rpc_sync/to_here; see leadership.py)
      transport.recv() <-------------------------------------------------- our inbox
      | control frame -> Agent.on_control (handshake, deaths, shutdown barrier)
      | message -> under the lock: core.handle(src, msg, now)
      v
    effects (Agent.run):
      Execute          -> jobs.py: the reader runs the user function itself (the
                          application reader hands it to the pool); reply via core
      Complete / Fail  -> calls.py: the caller's future (futures.py)
      CreationSettled  -> calls.py: the remote() RRef's creation future
      Send             -> Agent.send
    housekeeper.py: timers, RRefs Python dropped, the leadership's watch
    shutdown.py: the worker's half of the supervisor-driven graceful shutdown

Which thread touches what: :attr:`Agent.lock` guards the core and the parts'
tables and nothing else; effects run after it is released (STYLE rule 6),
so no thread ever blocks, sends or runs user code while holding it. Each
part's docstring says which threads use it.

What is passed in, so that a test can run agents without processes: the
transport (``send``/``recv``/``nudge``/``wake``/``close``: an inbox
``Endpoint``, or ``transport.inproc``), the shared-memory pool and mapper
(or none: tensors then travel inline), the clock, and a *driver*. With a
driver the agent starts no thread at all: jobs run inline, and every wait
asks the driver to make progress instead (``driver.run_until``), which a
test world does by delivering frames and moving a fake clock in a seeded
order (``tests/agent/agent_world.py``).
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import os
import threading
import time

from ..codec import frames
from ..codec.pickler import dumps, dumps_exception, loads, wrap_exception
from ..control_messages import (
    ArrivalRefused, Hello, HelloBack, PeerExited, ShutdownAgain, ShutdownFailed, ShutdownProceed,
)
from ..core import effects as fx
from ..core.messages import REQUEST_TYPES, USER_LEVEL_TYPES, ExceptionMessage
from ..core.rref_context import RetryPolicy, RRefContext
from ..errors import WorkerClosedError, WorkerGoneError
from ..transport import wire
from . import current
from .calls import Calls
from .faults import (COPY, DyingCopier, FaultPlan, FaultyTransport, InjectedFault, ScriptSends,
                     spec_for)
from .handshake import Handshake, WorkerDesc
from .housekeeper import Housekeeper
from .jobs import Jobs
from .reader import Reader
from .shutdown import GracefulShutdown
from .tape import HEADER as TAPE_HEADER
from .tape import AUTOGRAD_DEBUG_KEYS, Tape, is_builtin

__all__ = ["Agent", "WorkerDesc"]

log = logging.getLogger("localrref")

# Unique in this process: tells this agent's handshake from a previous one's (handshake.py).
_AGENT_SERIALS = itertools.count()
_JOIN_TIMEOUT_S = 5.0


class Agent:
    """One worker's RPC agent (see the module docstring).

    Args:
        rank, world_size, name: this worker.
        options: ``RpcBackendOptions``.
        transport: moves frames (see the module docstring).
        rref_type: the public RRef class: ``_adopt(agent, record, creation=None)``
            wraps a record, ``_record_for(agent)`` unwraps one being pickled.
        pool, mapper: the shared-memory pool (sender) and mapper (receiver).
        clock: ``monotonic()`` seconds; the core's deadlines use it.
        driver: makes progress in a world without threads (see above).
        shutdown_timeout: the world's bound on each graceful-shutdown phase.
        record_sites: remember where each RRef was made, for leak reports.
    """

    def __init__(self, *, rank: int, world_size: int, name: str, options, transport,
                 rref_type, pool=None, mapper=None, clock=time.monotonic, driver=None,
                 shutdown_timeout: float = 300.0, record_sites: bool = False) -> None:
        self.rank = rank
        self.world_size = world_size
        self.name = name
        self.options = options
        set_may_wait = getattr(transport, "set_may_wait", None)
        if set_may_wait is not None:
            set_may_wait(self._may_wait_for_room)
        faults = spec_for(options, os.environ)
        # Which requests torch would send as SCRIPT_* messages: kept only
        # while faults are injected (the calls note them; see faults.py).
        self.script_sends = None
        if faults is not None:
            log.info("localrref: rank %d injects faults: %s", rank, faults)
            self.script_sends = ScriptSends()
            transport = FaultyTransport(transport, FaultPlan(faults, rank),
                                        on_copy=self._count_copy,
                                        classify=self.script_sends.kind)
            if faults.kill_on == COPY and pool is not None:
                pool.copier = DyingCopier(pool.copier, transport)
        self.transport = transport
        self.rref_type = rref_type
        self.shm_pool = pool
        self.mapper = mapper
        self.clock = clock
        self.driver = driver
        self.shutdown_timeout = shutdown_timeout
        self.record_sites = record_sites
        self.default_timeout = options.rpc_timeout
        self.lock = threading.Lock()
        self.core = RRefContext(rank, retry=RetryPolicy(
            ack_timeout=options.rpc_timeout if options.rpc_timeout > 0 else 60.0))
        self.closing = False
        self.closed = False
        self._tape = None  # distributed autograd, see autograd_tape()
        # rank -> the error every later use of that peer raises.
        self.dead: dict[int, BaseException] = {}
        # Set when the world is known never to form (see _on_arrival_refused).
        self._init_failure: BaseException | None = None
        # The first death of a peer whose init_rpc had not returned: it fails
        # an init_rpc still waiting for hellos (await_peers).
        self._unformed_death: BaseException | None = None
        self._handshake = Handshake(rank=rank, name=name, pid=os.getpid(),
                                    world_size=world_size, serial=next(_AGENT_SERIALS))
        self._progress = threading.Condition()
        self._progress_waiters = 0
        self._progress_epoch = 0
        # Calls and replies (USER_LEVEL_TYPES) sent and received, for the
        # shutdown drain; a sent message is counted before it leaves.
        self._count_lock = threading.Lock()
        self._user_sent = 0
        self._user_received = 0
        threads = driver is None
        self.calls = Calls(self)
        self.jobs = Jobs(self, threads=threads)
        self.reader = Reader(self, threads=threads)
        self.housekeeper = Housekeeper(self, threads=threads)
        self.shutdown = GracefulShutdown(self)

    @classmethod
    def for_world(cls, spec, name: str, options, *, rref_type) -> "Agent":
        """The agent of a worker that a localrref supervisor started (``spec``: its WorldSpec)."""
        from ..transport.mpqueue import Endpoint
        from ..transport.shm import ShmMapper, ShmPool
        pool = ShmPool(spec.world_id, spec.rank, threshold=options.shm_threshold, tracked=True)
        mapper = ShmMapper()
        # Frames too big for one atomic pipe write travel through shared memory.
        endpoint = Endpoint(spec.rank, spec.inboxes, blob_pool=pool, blob_mapper=mapper,
                            spin_s=options.spin_us * 1e-6,
                            wait_limit_s=options.rpc_timeout if options.rpc_timeout > 0 else 60.0)
        return cls(rank=spec.rank, world_size=spec.world_size, name=name, options=options,
                   transport=endpoint, rref_type=rref_type, pool=pool, mapper=mapper,
                   shutdown_timeout=spec.shutdown_timeout or 300.0,
                   record_sites=bool(spec.record_creation_sites))

    # ------------------------------------------------------------------
    # Start: meet every peer
    # ------------------------------------------------------------------

    def start(self, init_timeout: float) -> None:
        """Start the threads and meet every peer (init_rpc's handshake)."""
        self.say_hello()
        self.await_peers(init_timeout)

    def await_peers(self, init_timeout: float) -> None:
        """Wait until every peer answered our hello (or one died first, or time ran out)."""
        met = self.block_until(lambda: (self._handshake.complete
                                        or self._unformed_death is not None
                                        or self.closing or self._init_failure is not None),
                               init_timeout, "every peer to call init_rpc")
        if self._init_failure is not None and not self._handshake.complete:
            raise self._init_failure
        if not met:
            raise RuntimeError(
                f"init_rpc timed out after {init_timeout:.0f} s waiting for ranks "
                f"{self._handshake.missing()} to call init_rpc (every worker of the world "
                f"must call it)")
        if self._unformed_death is not None and not self._handshake.complete:
            # A peer died before every hello was answered: this world never
            # formed. Once the handshake is complete, a death (even one seen
            # before this thread woke up) is an ordinary death: calls to that
            # peer fail, and init_rpc has succeeded. So is the death of a peer
            # whose own init_rpc had returned (PeerExited.formed): every
            # worker had answered it, so the hellos still missing here come.
            raise self._unformed_death
        names = collections.Counter(p.name for p in self._handshake.peers.values())
        duplicates = sorted(n for n, c in names.items() if c > 1)
        if duplicates:
            name = duplicates[0]
            ranks = sorted(p.rank for p in self._handshake.peers.values() if p.name == name)
            raise RuntimeError(f"worker name {name!r} is not unique: ranks {ranks} all use it; "
                               f"give every worker its own name")

    def say_hello(self) -> None:
        """Start the threads and say hello to every peer (start() then waits for answers)."""
        self.reader.start()
        self.housekeeper.start()
        hello = self._handshake.hello()
        for rank in range(self.world_size):
            if rank != self.rank:
                try:
                    self.send_control(rank, hello)
                except WorkerGoneError:
                    # The reader already heard of this peer's death (and maybe
                    # of why the world cannot form, which matters more):
                    # await_peers reports what it heard, in that order.
                    pass

    def _on_hello(self, src: int, message: Hello | HelloBack) -> None:
        with self.lock:
            if self.closing:
                return
            reply = self._handshake.receive(message)
            for rank, text in self._handshake.mismatches.items():
                error = self.dead.setdefault(rank, RuntimeError(text))
                if self._unformed_death is None:
                    self._unformed_death = error
        self.signal_progress()
        if reply is not None:
            with contextlib.suppress(WorkerClosedError, WorkerGoneError):
                # Closing, or the peer is gone: then nobody needs the answer.
                self.send_control(src, reply)

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
        self.block_until(lambda: (self._handshake.complete or self._unformed_death is not None
                                  or self.closing),
                         None, "every peer to say hello")
        return True

    def describe(self, rank: int) -> str:
        desc = self._handshake.peers.get(rank)
        return f"rank {rank} ({desc.name!r})" if desc else f"rank {rank}"

    def worker_info_text(self) -> str:
        return f"WorkerInfo(id={self.rank}, name={self.name})"

    # ------------------------------------------------------------------
    # What the parts share
    # ------------------------------------------------------------------

    def check_open(self) -> None:
        if self.closed or self.closing:
            raise WorkerClosedError("RPC has been shut down on this worker; call "
                                    "localrref.init_rpc again before making RPCs")

    def timeout_of(self, timeout: float | None) -> float:
        if timeout is None or timeout < 0:
            return self.default_timeout
        return float(timeout)

    def encode(self, obj, grads: list | None = None):
        """Pickle ``obj`` for the wire: RRefs are forked, big tensors go to shared memory.

        ``grads``: collects the tensors that require grad (distributed autograd).
        """
        return dumps(obj, fork=self._fork, abandon=self._abandon, pool=self.shm_pool,
                     rref_type=self.rref_type, grads=grads)

    def current_tape(self):
        """This agent's distributed autograd if any thread has used it yet, else None."""
        return self._tape

    def encode_for(self, dst: int, obj, *, func=None) -> tuple[bytes, tuple]:
        """``(data, forks)`` of ``obj`` sent to ``dst``, inside this thread's autograd context.

        ``func``: the function a call or ``remote()`` runs. As in torch, a
        call of one of torch's builtin operators takes the context along
        only if its tensors require grad; a Python function's call always
        does (its result might).
        """
        tape = self._tape
        context_id = tape.current() if tape is not None else None
        if context_id is None:
            encoded = self.encode(obj)
            return encoded.data, encoded.forks
        return tape.encode(dst, obj, context_id,
                           always=func is None or not is_builtin(func))

    def decode_from(self, src: int, data: bytes, rrefs) -> tuple[object, int | None]:
        """Unpickle ``data`` from ``src``: the value, and the autograd context it came in (or None)."""
        if data[:1] != TAPE_HEADER:
            return loads(data, rrefs=rrefs, mapper=self.mapper)[0], None
        return self.autograd_tape().decode(
            src, data, lambda payload, grads: loads(payload, rrefs=rrefs, mapper=self.mapper,
                                                    grads=grads)[0])

    def autograd_tape(self):
        """This agent's distributed autograd (made on first use: most programs never use it)."""
        tape = self._tape
        if tape is None:
            with self.lock:
                if self._tape is None:
                    self._tape = Tape(self)
                tape = self._tape
        return tape

    def _fork(self, rref) -> object:
        record = rref._record_for(self)
        with self.lock:
            return self.core.prepare_child_fork(record)

    def _abandon(self, fork_data) -> None:
        with self.lock:
            self.core.abandon_child_fork(fork_data)
            effects = self.core.take_effects()
        self.run(effects)

    def run(self, effects, *, inline_jobs: bool = False) -> None:
        """Carry out the core's effects (never with the lock held).

        ``inline_jobs``: run jobs on this thread, after everything else
        (the reader does; see reader.py), instead of on the pool.
        """
        jobs = []
        for effect in effects:
            match effect:
                case fx.Send():
                    self.send(effect.dst, effect.message)
                case fx.Execute():
                    if inline_jobs:
                        jobs.append(effect)
                    else:
                        self.jobs.submit(effect)
                case fx.Complete():
                    self.calls.complete(effect)
                case fx.Fail():
                    self.calls.fail(effect)
                case fx.CreationSettled():
                    self.calls.creation_settled(effect)
                case fx.Released():
                    pass
                case fx.Log():
                    log.log(logging.getLevelName(effect.level.upper()), "%s", effect.text)
        for job in jobs:
            # Leader/followers: this thread read the request, so it runs it
            # now, with no hand-off on the call's path (see leadership.py for
            # who reads the inbox meanwhile).
            self.jobs.run(job)

    def send(self, dst: int, message) -> None:
        """Send a protocol message; a failure is the core's to handle (retries, failed calls)."""
        counted = message.type in USER_LEVEL_TYPES
        if counted:
            self._count_sent(+1)
        try:
            dead = self.dead.get(dst)
            if dead is not None:
                raise dead
            self.transport.send(dst, frames.encode_message(message))
        except Exception as exc:
            if counted:
                self._count_sent(-1)  # it never left
            gone = isinstance(exc, (WorkerGoneError, WorkerClosedError))
            if message.type not in REQUEST_TYPES:
                if gone:
                    log.info("could not send %s to rank %d: %s", message.type.value, dst, exc)
                else:
                    self._reply_failed(dst, message, exc)
                return
            with self.lock:
                # A dead peer: drop its control messages at once, as the
                # core does with those pending when it heard of the death
                # (retrying them would hold their futures for the backoff).
                effects = self.core.on_send_failed(
                    message.request_id, exc, now=self.clock(),
                    peer_gone=isinstance(exc, WorkerGoneError),
                    intentional=isinstance(exc, InjectedFault))
                self.housekeeper.poke_timer_locked()
            self.run(effects)

    def _reply_failed(self, dst: int, message, exc: BaseException) -> None:
        """A reply could not be sent: undo its forks and tell the caller why."""
        log.warning("could not send %s to rank %d: %s", message.type.value, dst, exc)
        for fork_data in getattr(message, "rrefs", ()):
            self._abandon(fork_data)
        if message.type.value in ("PYTHON_RET", "PYTHON_RREF_FETCH_RET"):
            payload = dumps_exception(wrap_exception(RuntimeError(
                f"the reply could not be sent: {type(exc).__name__}: {exc}"),
                self.worker_info_text()))
            self._count_sent(+1)
            try:
                self.transport.send(dst, frames.encode_message(
                    ExceptionMessage(request_id=message.request_id, payload=payload)))
            except Exception:
                self._count_sent(-1)
                log.exception("localrref: could not tell rank %d its reply failed", dst)

    def _may_wait_for_room(self) -> bool:
        """Whether this thread may wait for room in a peer's full pipe: only an
        application thread that does not hold the inbox (see transport/outbox.py)."""
        return not current.serving() and not self.reader.holds_inbox()

    def send_control(self, dst: int, control) -> None:
        self.transport.send(dst, wire.encode_control(control))

    def send_autograd(self, dst: int, message) -> None:
        """Send a distributed autograd message (its gradients go as tensors do).

        Raises:
            WorkerGoneError, WorkerClosedError: ``dst`` is gone (the tape
                hears of deaths on its own and fails what waited on it).
        """
        dead = self.dead.get(dst)
        if dead is not None:
            raise dead
        frame = wire.AUTOGRAD_TAG + self.encode(frames.flatten_autograd(message)).data
        self._count_sent(+1)
        try:
            self.transport.send(dst, frame)
        except BaseException:
            self._count_sent(-1)  # it never left
            raise

    def on_autograd(self, src: int, frame) -> None:
        """A distributed autograd message arrived (called by the reader)."""
        try:
            message = frames.unflatten_autograd(
                loads(memoryview(frame)[1:], rrefs=(), mapper=self.mapper)[0])
        except Exception:
            log.exception("localrref: dropped an undecodable autograd frame from rank %d", src)
            return
        self.count_received()  # as a message frame: once it decoded
        try:
            self.autograd_tape().on_message(src, message)
        except Exception:
            log.exception("localrref: error handling a distributed autograd message from "
                          "rank %d", src)

    def _count_copy(self, message) -> None:
        """Fault injection sent ``message`` twice: count the copy as sent too."""
        if message.type in USER_LEVEL_TYPES:
            self._count_sent(+1)

    def _count_sent(self, delta: int) -> None:
        with self._count_lock:
            self._user_sent += delta

    def count_received(self) -> None:
        with self._count_lock:
            self._user_received += 1

    def message_counts(self) -> tuple[int, int]:
        """Calls and replies sent and received since init_rpc (the shutdown drain)."""
        with self._count_lock:
            return self._user_sent, self._user_received

    def active_work(self) -> int:
        """Calls this worker waits for, remote() creations pending, and jobs it runs.

        A call leaves the count only once its future's callbacks have run
        (see Calls._settled): until then one of them may still start another.
        """
        with self.lock:
            return self.calls.active() + len(self.core.jobs)

    # ------------------------------------------------------------------
    # Control messages and deaths
    # ------------------------------------------------------------------

    def on_control(self, src: int, control) -> None:
        """A control message arrived (called by the reader)."""
        match control:
            case Hello() | HelloBack():
                self._on_hello(src, control)
            case PeerExited():
                self._on_peer_exited(control)
            case ShutdownProceed() | ShutdownAgain() | ShutdownFailed():
                self.shutdown.deliver(control)
            case ArrivalRefused():
                self._on_arrival_refused(control)
            case _:
                log.warning("localrref: ignored a control message of unknown type %s from "
                            "rank %d", type(control).__name__, src)

    def _on_arrival_refused(self, refused: ArrivalRefused) -> None:
        if self._handshake.complete:
            # A stray process knocked on a world that formed without it.
            log.warning("localrref: a process (pid %d) was refused as rank %d: %s", refused.pid,
                        refused.rank, refused.reason)
            return
        self._init_failure = RuntimeError(
            f"init_rpc failed: this world cannot form, since the process (pid {refused.pid}) "
            f"arriving as rank {refused.rank} was refused: {refused.reason}")
        self.signal_progress()

    def _on_peer_exited(self, exited: PeerExited) -> None:
        rank = exited.rank
        desc = self._handshake.peers.get(rank)
        who = f"rank {rank}" + (f" ({desc.name!r})" if desc else "")
        error = WorkerGoneError(
            f"worker {who}, pid {exited.pid}, {exited.how()}; every "
            f"call that depended on it fails", name=desc.name if desc else None, rank=rank,
            pid=exited.pid, exitcode=exited.exitcode)
        with self.lock:
            self.dead[rank] = error
            if not exited.formed and self._unformed_death is None:
                self._unformed_death = error
            effects = self.core.on_peer_gone(rank, error, now=self.clock())
        forget = getattr(self.transport, "forget", None)
        if forget is not None:
            forget(rank, error)  # what still waited for room in its pipe
        if self.reader.on_io_thread() or self.driver is not None:
            self.run(effects)
        else:
            # Read by a caller waiting for its reply (wait_reply): the failed
            # futures' callbacks are user code, and must not run on it.
            self.reader.run_on_pool(effects)
        self.signal_progress()
        self.shutdown.wake()
        if self._tape is not None:
            self._tape.worker_died(rank)

    # ------------------------------------------------------------------
    # Waiting
    # ------------------------------------------------------------------

    def signal_progress(self) -> None:
        """Something happened that a waiter may be waiting for.

        Called after every frame handled, every job finished, every call
        settled and every control message: cheap unless someone waits.
        """
        self._progress_epoch += 1
        if self._progress_waiters:
            with self._progress:
                self._progress.notify_all()

    def block_until(self, predicate, timeout: float | None, what: str, *,
                    poll: float | None = None) -> bool:
        """Wait until ``predicate()`` holds; False if ``timeout`` seconds passed first.

        The predicate is checked again after every progress signal (never
        with a lock of ours held), and at least every ``poll`` seconds if
        given. Without threads, the driver makes progress until it holds.
        """
        if self.driver is not None:
            return self.driver.run_until(predicate, timeout, what)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            seen = self._progress_epoch
            if predicate():
                return True
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            if poll is not None:
                left = poll if left is None else min(left, poll)
            with self._progress:
                self._progress_waiters += 1
                try:
                    # A signal between the check above and here changed the
                    # epoch: look again rather than sleep through it.
                    if self._progress_epoch == seen:
                        self._progress.wait(left)
                finally:
                    self._progress_waiters -= 1

    def wait_until_quiet(self, timeout: float) -> bool:
        """Wait (on progress events, not by polling) until this worker holds no RRef state."""
        self.reader.release_inbox()

        def quiet() -> bool:
            with self.lock:
                core = self.core
                return not (core.owners or core.forks or core.pending_users
                            or core.pending_children or core.confirmed_users
                            or core.num_pending_futures or self.housekeeper.releases)

        return self.block_until(quiet, timeout, "the RRef tables to empty")

    # ------------------------------------------------------------------
    # Debug info, graceful shutdown, close
    # ------------------------------------------------------------------

    def debug_info(self) -> dict[str, str]:
        """Everything below, in one map (torch's ``_get_debug_info()``)."""
        out = self.rref_debug_info()
        out.update(self.agent_debug_info())
        out.update(self.autograd_debug_info())
        return out

    def rref_debug_info(self) -> dict[str, str]:
        """The RRef context's counters (torch's ``_rref_context_get_debug_info()``)."""
        with self.lock:
            info = self.core.get_debug_info()
        return {key: str(value) for key, value in info.items()}

    def autograd_debug_info(self) -> dict[str, str]:
        """Distributed autograd's counters (torch's ``dist_autograd._get_debug_info()``,
        its two keys only); the send and recv tables are in :meth:`agent_debug_info`."""
        counts = self._autograd_counts()
        return {key: str(counts[key]) for key in AUTOGRAD_DEBUG_KEYS}

    def _autograd_counts(self) -> dict[str, int]:
        tape = self._tape
        return tape.debug_info() if tape is not None else {
            "num_current_backward_passes": 0, "num_autograd_contexts": 0,
            "num_send_functions": 0, "num_recv_functions": 0}

    def agent_debug_info(self) -> dict[str, str]:
        """The agent's own figures (torch's ``_get_current_rpc_agent().get_debug_info()``)."""
        with self.lock:
            pending = len(self.calls.pending)
            jobs = len(self.core.jobs)
        async_jobs = self.jobs.async_waiting
        pool_size, idle = self.jobs.executor.sizes()
        counts = self._autograd_counts()
        return {
            # torch's TensorPipe agent's keys
            "agent.thread_pool_size": str(pool_size),
            "agent.num_idle_threads": str(idle),
            "agent.client_active_calls": str(pending),
            "agent.server_active_calls": str(max(0, jobs - async_jobs)),
            "agent.server_active_async_calls": str(async_jobs),
            # localrref's own
            "agent.num_pending_calls": str(pending),
            "agent.worker_threads": str(self.jobs.executor.thread_count),
            "agent.threads": str(threading.active_count()),
            "agent.shm_segments": str(len(self.shm_pool.segment_names())
                                      if self.shm_pool is not None else 0),
            "agent.num_deferred_releases": str(len(self.housekeeper.releases)),
            # Replies a waiting caller got from another thread, not by reading
            # the inbox itself (each one a thread hand-off).
            "agent.fallback_waits": str(self.reader.lead.fallback_waits),
            # Distributed autograd's send and recv tables, across live contexts
            # (torch keeps them out of dist_autograd._get_debug_info()).
            "num_send_functions": str(counts["num_send_functions"]),
            "num_recv_functions": str(counts["num_recv_functions"]),
        }

    def graceful_shutdown(self, timeout: float) -> list[dict]:
        """The worker's half of the supervisor-driven shutdown; returns leak records."""
        return self.shutdown.run(timeout)

    def close(self) -> None:
        """Stop every thread and release every OS resource (idempotent)."""
        if self.closed:
            return
        self.closing = True
        self.signal_progress()
        self.shutdown.wake()
        self.housekeeper.wake(b"x")
        self.reader.lead.close()
        self.transport.wake()
        # A thread blocked on a reply (a served function inside rpc_sync, a
        # parked caller) waits on a future only this agent can complete:
        # fail those first, or each join below would sit out its timeout.
        closed = WorkerClosedError("RPC was shut down while this call was pending")
        self.calls.fail_all(closed)
        self.reader.close(_JOIN_TIMEOUT_S)
        self.housekeeper.close(_JOIN_TIMEOUT_S)
        self.jobs.close(_JOIN_TIMEOUT_S)
        with self.lock:
            self.core.destroy_instance(ignore_rref_leak=True)
        self.calls.fail_all(closed)
        self.closed = True
        self.transport.close()
        if self.shm_pool is not None:
            self.shm_pool.close()
        if self.mapper is not None:
            self.mapper.close()
        self.housekeeper.close_pipe()
