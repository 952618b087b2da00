"""The supervisor: start a world of worker processes, watch it, stop it.

Used by ``localrref.spawn`` (torch.multiprocessing.spawn semantics) and by
``python -m localrref.launch`` (torchrun semantics). One :class:`WorkerGroup`
is one world: its own ``world_id``, inboxes and processes.

Data flow::

      caller thread                      watcher thread "lrr-watch-<id>"          worker r
      -------------                      -------------------------------          --------
      WorkerGroup.start()
        inboxes = SimpleQueue x (n+1)
        Process(worker_main, WorldSpec) ---------------------------------------> bootstrap, fn / script
        start watcher ------------------> loop: wait(sentinels, supervisor inbox, wake pipe, deadline)
                                            sentinel r ready: reap r (the ONLY reaper)
                                              abnormal, before any stop signal:
                                                bounded_send(("__peer_exited__", r, pid, code)) -> inbox of
                                                                                        every live peer
                                              ControlDispatcher.on_worker_exit (barrier may fail)
                                            supervisor inbox readable: <------------ control frames
                                              InboxReader -> ControlDispatcher        (__shutdown_arrived__,
                                                shutdown barrier: __shutdown_proceed__ -> __shutdown_done__, ...)
                                                / __shutdown_failed__ to every live rank
                                            stop requested: grace -> death signal
                                              -> shutdown_timeout -> SIGKILL (torch's ladder)
                                            all exited: final inbox drain, done
      wait(timeout) / stop(...)  <------- Condition: exits, first failure, done
      close(): join watcher, close queues, sweep /dev/shm/lrr_<world_id>_*

Threads: the caller thread only starts processes, requests a stop and reads
results under ``_cond``; the watcher owns the ``Process`` objects after start
(it alone reaps and signals them, so a pid is never signalled after it was
reaped) and the inbox reader. No I/O happens under ``_cond``.

Processes are started from the caller's thread on purpose: Linux delivers
``PR_SET_PDEATHSIG`` when the *thread* that forked a worker exits.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from localrref import world
from localrref.errors import RRefLeakError
from localrref.launch import errorfile
from localrref.launch.bootstrap import CallFunction, ChildPlan, RunScript, worker_main
from localrref.launch.control import (ControlDispatcher, describe_leaks, format_leak_line,
                                     write_leak_report)
from localrref.control_messages import Control, PeerExited
from localrref.launch.inbox import InboxReader, send_control
from localrref.launch.paused_gc import process_class
from localrref.transport import wire
from localrref.transport.mpqueue import make_inboxes
from localrref.transport.segment import (new_world_id, segment_prefix, sweep_world_segments,
                                          tracker_running, untrack_segment)

__all__ = [
    "RunOptions",
    "WorkerExit",
    "WorkerGroup",
    "ProcessContext",
    "spawn",
    "start_processes",
    "new_world_id",
]

DEFAULT_SHUTDOWN_TIMEOUT = 30.0  # torch's spawn and torchrun both wait 30 s after SIGTERM
STRICT_LEAKS_ENV = "LOCALRREF_STRICT_LEAKS"
RECORD_CREATION_SITES_ENV = "LOCALRREF_RECORD_CREATION_SITES"
# How long the watcher may wait on one peer's inbox (its lock, then pipe room)
# before giving up on that peer's notification.
NOTIFY_TIMEOUT = 1.0


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() not in ("", "0", "false", "no")


@dataclass(frozen=True, slots=True, kw_only=True)
class RunOptions:
    """Run-wide switches, copied into every worker's WorldSpec."""

    strict_leaks: bool = False
    record_creation_sites: bool = False
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT
    # How long workers that reached shutdown() wait for the rest, 0 = as long
    # as it takes (torch's default: ranks commonly call shutdown() at once and
    # wait there while rank 0 works). Set when a shutdown timeout is given
    # explicitly: then a worker that never arrives is named after that long.
    arrive_timeout: float = 0.0

    def __post_init__(self) -> None:
        if self.shutdown_timeout < 0:
            raise ValueError(f"shutdown_timeout must be >= 0, got {self.shutdown_timeout}")

    @classmethod
    def resolve(cls, *, strict_leaks: bool | None = None, record_creation_sites: bool | None = None,
                shutdown_timeout: float | None = None) -> RunOptions:
        """Explicit values win; None falls back to LOCALRREF_* env switches, then defaults."""
        return cls(
            strict_leaks=_env_flag(STRICT_LEAKS_ENV) if strict_leaks is None else strict_leaks,
            record_creation_sites=(_env_flag(RECORD_CREATION_SITES_ENV)
                                   if record_creation_sites is None else record_creation_sites),
            shutdown_timeout=DEFAULT_SHUTDOWN_TIMEOUT if shutdown_timeout is None else shutdown_timeout,
            arrive_timeout=0.0 if shutdown_timeout is None else shutdown_timeout,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerExit:
    """How and when one worker ended.

    ``signalled_by_us`` is True when the worker exited after the supervisor
    had sent it a stop signal, i.e. it is not a root cause.
    """

    rank: int
    pid: int
    exitcode: int
    exited_at: float  # epoch seconds, when the watcher saw it
    signalled_by_us: bool


class _Ladder:
    """The stop the watcher is carrying out: torch's grace, signal, SIGKILL ladder.

    Phases: ``grace`` (workers may exit on their own) -> ``term`` (the death
    signal was sent) -> ``kill`` (SIGKILL was sent) -> abandon. Each phase
    lasts until ``deadline``; ``escalate`` jumps straight to ``kill``.
    """

    def __init__(self, *, death_sig: int, grace: float, timeout: float, now: float) -> None:
        self.death_sig = death_sig
        self.timeout = timeout
        self.phase = "grace"
        self.deadline = now + grace

    def advance(self, now: float, escalate: bool) -> int | str | None:
        """The signal to send now, ``"abandon"``, or None to keep waiting."""
        if escalate and self.phase in ("grace", "term"):
            self.phase, self.deadline = "kill", now + self.timeout
            return signal.SIGKILL
        if now < self.deadline:
            return None
        if self.phase == "grace":
            self.phase, self.deadline = "term", now + self.timeout
            return self.death_sig
        if self.phase == "term":
            self.phase, self.deadline = "kill", now + self.timeout
            return signal.SIGKILL
        return "abandon"


class WorkerGroup:
    """One world of ``nprocs`` worker processes and the thread that watches them.

    Args:
        jobs: One job per rank (``CallFunction`` or ``RunScript``).
        plans: One ``ChildPlan`` per rank (env, streams, error file).
        start_method: ``"spawn"`` (default), ``"forkserver"`` or ``"fork"``.
        daemon: The workers' ``daemon`` flag.
        options: Run-wide options copied into every WorldSpec.
        world_id: Defaults to :func:`new_world_id`.
    """

    def __init__(self, *, jobs: Sequence[CallFunction | RunScript], plans: Sequence[ChildPlan],
                 start_method: str = "spawn", daemon: bool = False,
                 options: RunOptions | None = None, world_id: str | None = None) -> None:
        if len(jobs) != len(plans) or not jobs:
            raise ValueError(f"need one job and one plan per rank, got {len(jobs)} and {len(plans)}")
        if start_method not in multiprocessing.get_all_start_methods():
            raise ValueError(f"start_method {start_method!r} is not available here; "
                             f"choose one of {multiprocessing.get_all_start_methods()}")
        self.nprocs = len(jobs)
        self.world_id = world_id or new_world_id()
        segment_prefix(self.world_id)  # a malformed id fails here, not in close()'s sweep
        self.options = options or RunOptions()
        self.dispatcher = ControlDispatcher(self.nprocs, self._send_control,
                                            phase_timeout=self.options.shutdown_timeout,
                                            arrive_timeout=self.options.arrive_timeout)
        self.processes: list[Any] = []
        self._jobs = list(jobs)
        self._plans = list(plans)
        self._ctx = multiprocessing.get_context(start_method)
        self._daemon = daemon
        self._inboxes: tuple[Any, ...] = ()
        self._thread: threading.Thread | None = None
        self._wake_r, self._wake_w = -1, -1
        self._closed = False
        # Shared with the watcher; guarded by _cond.
        self._cond = threading.Condition()
        self._exits: dict[int, WorkerExit] = {}
        self._first_failure: WorkerExit | None = None
        self._stop_request: tuple[int, float, float] | None = None
        self._escalate = False
        self._done = False
        self._watch_error: BaseException | None = None

    # ----------------------------------------------------------------- caller side

    def start(self) -> None:
        """Create the inboxes, start every worker, then the watcher thread.

        If starting any worker fails (e.g. ``fn`` does not pickle), the ones
        already started are killed and reaped before the error propagates.
        """
        if self.processes:
            raise RuntimeError("WorkerGroup.start() called twice; build a new group per world")
        self._inboxes = tuple(make_inboxes(self._ctx, self.nprocs))
        try:
            for rank in range(self.nprocs):
                spec = world.WorldSpec(
                    world_id=self.world_id, rank=rank, world_size=self.nprocs,
                    inboxes=self._inboxes, supervisor_pid=os.getpid(),
                    strict_leaks=self.options.strict_leaks,
                    record_creation_sites=self.options.record_creation_sites,
                    shutdown_timeout=self.options.shutdown_timeout,
                )
                process = process_class(self._ctx)(
                    target=worker_main, args=(spec, self._jobs[rank], self._plans[rank]),
                    daemon=self._daemon, name=f"localrref-rank{rank}",
                )
                process.start()
                self.processes.append(process)
        except BaseException:
            for process in self.processes:
                process.kill()
                process.join()
                process.close()
            self.processes = []
            self._close_inboxes()
            raise
        self._wake_r, self._wake_w = os.pipe()
        self._thread = threading.Thread(target=self._watch, name=f"lrr-watch-{self.world_id}",
                                        daemon=True)
        self._thread.start()

    def pids(self) -> list[int]:
        return [int(p.pid) for p in self.processes]

    @property
    def done(self) -> bool:
        """Every worker has exited (or was abandoned after SIGKILL) and the watcher finished."""
        with self._cond:
            return self._done

    @property
    def first_failure(self) -> WorkerExit | None:
        """The first worker seen exiting non-zero before any stop signal was sent."""
        with self._cond:
            return self._first_failure

    def exits(self) -> dict[int, WorkerExit]:
        """Snapshot of the workers that have exited so far, by rank."""
        with self._cond:
            return dict(self._exits)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until all workers exited or one failed; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not (self._done or self._first_failure is not None):
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining)
            self._raise_watch_error()
            return True

    def stop(self, *, death_sig: int = signal.SIGTERM, grace: float | None = None,
             timeout: float | None = None) -> None:
        """Stop every live worker and wait until all have exited.

        Torch's ladder: let the workers exit on their own for ``grace``
        seconds, send ``death_sig``, wait ``timeout`` seconds (default: the
        run's shutdown_timeout), then SIGKILL. A worker that survives SIGKILL
        for another ``timeout`` (stuck in the kernel) is abandoned with a warning.
        """
        if self._thread is None:
            return  # never started: nothing to stop
        timeout = self.options.shutdown_timeout if timeout is None else timeout
        with self._cond:
            if self._stop_request is None:
                self._stop_request = (int(death_sig), grace or 0.0, timeout)
        self._wake()
        with self._cond:
            while not self._done:
                self._cond.wait()
            self._raise_watch_error()

    def escalate(self) -> None:
        """Skip the rest of the ladder and SIGKILL now (e.g. a second Ctrl-C). Signal-handler safe."""
        self._escalate = True
        self._wake()

    def close(self) -> list[str]:
        """Release the world's resources once it is done; return the /dev/shm names swept.

        Raises:
            RuntimeError: Some worker is still running; call :meth:`stop` first.
        """
        if self._closed:
            return []
        if self._thread is not None:
            with self._cond:
                if not self._done:
                    raise RuntimeError(
                        f"world {self.world_id} still has running workers; call stop() before close()")
            self._thread.join()
            os.close(self._wake_r)
            os.close(self._wake_w)
        self._closed = True
        for process in self.processes:
            if process.exitcode is not None:
                process.close()
        self._close_inboxes()
        swept = sweep_world_segments(self.world_id)
        if tracker_running():  # the workers' pools registered them (transport/shm.py)
            for name in swept:
                untrack_segment(name)
        return swept

    def _close_inboxes(self) -> None:
        for queue in self._inboxes:
            queue.close()
        # Dropping the queues releases their semaphores (and the resource
        # tracker's record of them) now rather than at interpreter exit.
        self._inboxes = ()

    def _wake(self) -> None:
        if self._wake_w >= 0:
            try:
                os.write(self._wake_w, b"\0")
            except OSError:
                pass  # closed: the watcher is gone already

    def _raise_watch_error(self) -> None:
        if self._watch_error is not None:
            raise RuntimeError(f"localrref supervisor watcher of world {self.world_id} crashed; "
                               "this is a bug in localrref") from self._watch_error

    # ---------------------------------------------------------------- watcher side

    def _watch(self) -> None:
        try:
            self._watch_loop()
        except BaseException as exc:  # surfaced to callers by _raise_watch_error
            for process in self.processes:
                if process.exitcode is None:
                    process.kill()
            with self._cond:
                self._watch_error = exc
                self._done = True
                self._cond.notify_all()

    def _watch_loop(self) -> None:
        reader = InboxReader(self._inboxes[self.nprocs])
        alive = {p.sentinel: rank for rank, p in enumerate(self.processes)}
        ladder: _Ladder | None = None
        signals_sent = False
        while alive:
            now = time.monotonic()
            deadlines = [d for d in (ladder.deadline if ladder else None,
                                     self.dispatcher.deadline) if d is not None]
            timeout = max(0.0, min(deadlines) - now) if deadlines else None
            waitables = [self._wake_r, *alive] + ([] if reader.eof else [reader])
            ready = multiprocessing.connection.wait(waitables, timeout)
            if self._wake_r in ready:
                os.read(self._wake_r, 512)
            if reader in ready:
                self._dispatch_all(reader)
            self.dispatcher.check_deadline(time.monotonic())
            exited = [alive.pop(s) for s in list(alive) if s in ready]
            for rank in exited:
                self._record_exit(rank, signals_sent)
            for rank in exited:
                exit_ = self._exits[rank]
                if self.dispatcher.exit_is_a_death(exit_.exitcode):
                    # Also while stopping: a survivor blocked where no signal
                    # reaches Python (inside torch's Future.wait, say) gets
                    # out only when its calls to the dead fail; without the
                    # notice it would sit out the ladder's whole timeout.
                    self._notify_peers(exit_, alive.values())
                self.dispatcher.on_worker_exit(rank, exit_.exitcode)
            if ladder is None:
                with self._cond:
                    request = self._stop_request
                if request is not None:
                    death_sig, grace, stop_timeout = request
                    ladder = _Ladder(death_sig=death_sig, grace=grace, timeout=stop_timeout,
                                     now=time.monotonic())
            if ladder is not None and alive:
                action = ladder.advance(time.monotonic(), self._escalate)
                if action == "abandon":
                    # Stuck in uninterruptible sleep: no signal can help any more.
                    for rank in alive.values():
                        print(f"localrref.launch: worker rank {rank} (pid {self.processes[rank].pid}) "
                              f"survived SIGKILL for {ladder.timeout:g}s (uninterruptible kernel "
                              "sleep?); abandoning it", file=sys.stderr)
                    alive.clear()
                elif action is not None:
                    if action == signal.SIGKILL and ladder.death_sig != signal.SIGKILL and not self._escalate:
                        print(f"localrref.launch: {len(alive)} worker(s) did not exit within "
                              f"{ladder.timeout:g}s of {signal.Signals(ladder.death_sig).name}; "
                              "sending SIGKILL", file=sys.stderr)
                    for rank in alive.values():
                        self._signal(self.processes[rank], action)
                    signals_sent = True
        self._dispatch_all(reader)  # what workers wrote just before exiting
        with self._cond:
            self._done = True
            self._cond.notify_all()

    @staticmethod
    def _signal(process: Any, signum: int) -> None:
        try:
            os.kill(process.pid, signum)
        except ProcessLookupError:
            pass  # exited, not yet reaped: the sentinel will report it

    def _record_exit(self, rank: int, signalled_by_us: bool) -> None:
        process = self.processes[rank]
        # The sentinel fires as the child closes its fds, a moment before it
        # becomes reapable, so this blocking join (as torch's) is short. The
        # watcher is the only thread that reaps.
        process.join()
        exit_ = WorkerExit(rank=rank, pid=process.pid, exitcode=process.exitcode,
                           exited_at=time.time(), signalled_by_us=signalled_by_us)
        with self._cond:
            self._exits[rank] = exit_
            if exit_.exitcode != 0 and not signalled_by_us and self._first_failure is None:
                self._first_failure = exit_
            self._cond.notify_all()

    def _dispatch_all(self, reader: InboxReader) -> None:
        for src, frame in reader.read_available():
            try:
                control = wire.decode_control(frame)
            except ValueError as exc:
                print(f"localrref.launch: dropped a frame from rank {src}: {exc} (only control "
                      f"frames go to the supervisor)", file=sys.stderr)
                continue
            self.dispatcher.dispatch(src, control)

    def _send_control(self, rank: int, control: Control) -> None:
        if not send_control(self._inboxes[rank], self.nprocs, control, NOTIFY_TIMEOUT):
            print(f"localrref.launch: could not send {type(control).__name__} to rank {rank}: "
                  f"its inbox stayed full for {NOTIFY_TIMEOUT:g}s", file=sys.stderr)

    def _notify_peers(self, exit_: WorkerExit, live_ranks: Any) -> None:
        message = PeerExited(rank=exit_.rank, pid=exit_.pid, exitcode=exit_.exitcode)
        for rank in list(live_ranks):
            self._send_control(rank, message)


# --------------------------------------------------------------------- spawn API


class ProcessContext:
    """What ``spawn(..., join=False)`` returns; mirrors ``torch.multiprocessing.ProcessContext``.

    Attributes:
        processes: The worker ``Process`` objects, by rank.
        error_files: Where each rank records an uncaught exception.
        world_id: The world's id (its /dev/shm prefix is ``lrr_<world_id>_``).
    """

    def __init__(self, group: WorkerGroup, error_dir: str) -> None:
        self._group = group
        self._error_dir = error_dir
        self._finished = False
        self.processes = group.processes
        self.error_files = [plan.error_file for plan in group._plans]
        self.world_id = group.world_id

    @property
    def group(self) -> WorkerGroup:
        return self._group

    def pids(self) -> list[int]:
        return self._group.pids()

    def join(self, timeout: float | None = None, grace_period: float | None = None) -> bool:
        """Wait for the workers; raise torch's exception for the first one that failed.

        Args:
            timeout: Seconds to wait before returning False.
            grace_period: After a failure, how long the others may take to exit
                on their own before SIGTERM; SIGKILL follows after the same
                period, or after the run's ``shutdown_timeout`` if None (torch).

        Returns:
            True once every worker exited with code 0; False on timeout.

        Raises:
            ProcessRaisedException: A worker's ``fn`` raised (traceback included).
            ProcessExitedException: A worker exited non-zero or was killed by a signal.
            RRefLeakError: All workers succeeded but leaks were reported and
                ``strict_leaks`` is on.
        """
        if self._finished:
            return True
        try:
            if not self._group.wait(timeout):
                return False
            failure = self._group.first_failure
            if failure is not None:
                stop_timeout = self._group.options.shutdown_timeout if grace_period is None else grace_period
                self._group.stop(death_sig=signal.SIGTERM, grace=grace_period, timeout=stop_timeout)
        except BaseException:
            # KeyboardInterrupt in the parent, or a watcher crash: take the world down with us.
            if not self._group.done:
                self._group.stop(death_sig=signal.SIGTERM, timeout=self._group.options.shutdown_timeout)
            self._finish()
            raise
        error = self._exception_for(failure) if failure is not None else None
        leaks = self._finish()
        if error is not None:
            raise error
        if leaks and self._group.options.strict_leaks:
            raise RRefLeakError(
                f"{describe_leaks(leaks)} in world {self.world_id} (listed above on stderr). "
                f"Delete every RRef and end every distributed autograd context before shutdown, "
                f"or drop strict_leaks / unset {STRICT_LEAKS_ENV} to only report them.")
        return True

    def _finish(self) -> list[dict[str, Any]]:
        """Release the world (error files included) and print its leak report."""
        self._finished = True
        self._group.close()
        shutil.rmtree(self._error_dir, ignore_errors=True)
        leaks = self._group.dispatcher.leaks
        write_leak_report(leaks)
        for leak in leaks:
            print(format_leak_line(leak), file=sys.stderr)
        return leaks

    def _exception_for(self, failure: WorkerExit) -> Exception:
        from torch.multiprocessing.spawn import ProcessExitedException, ProcessRaisedException

        index, pid, exitcode = failure.rank, failure.pid, failure.exitcode
        trace = errorfile.traceback_from(errorfile.read_error_file(self.error_files[index]))
        if trace is not None:
            msg = f"\n\n-- Process {index:d} terminated with the following error:\n" + trace
            return ProcessRaisedException(msg, index, pid)
        if exitcode < 0:
            try:
                name = signal.Signals(-exitcode).name
            except ValueError:
                name = f"<Unknown signal {-exitcode}>"
            return ProcessExitedException(f"process {index:d} terminated with signal {name}",
                                          error_index=index, error_pid=pid, exit_code=exitcode,
                                          signal_name=name)
        return ProcessExitedException(f"process {index:d} terminated with exit code {exitcode:d}",
                                      error_index=index, error_pid=pid, exit_code=exitcode)


def start_processes(fn: Callable[..., Any], args: tuple[Any, ...] = (), nprocs: int = 1,
                    join: bool = True, daemon: bool = False, start_method: str = "spawn", *,
                    strict_leaks: bool | None = None, record_creation_sites: bool | None = None,
                    shutdown_timeout: float | None = None) -> ProcessContext | None:
    """:func:`spawn` with a choice of start method and localrref's run options.

    Args:
        strict_leaks: Fail the run if any worker reports a leaked RRef
            (default: ``LOCALRREF_STRICT_LEAKS``).
        record_creation_sites: Ask workers to record where RRefs are created
            (default: ``LOCALRREF_RECORD_CREATION_SITES``).
        shutdown_timeout: Seconds between SIGTERM and SIGKILL when stopping,
            also the runtime's graceful-shutdown budget (default 30).

    The other arguments, the return value and the exceptions are :func:`spawn`'s.
    """
    if nprocs < 1:
        raise ValueError(f"nprocs must be >= 1, got {nprocs}")
    options = RunOptions.resolve(strict_leaks=strict_leaks, record_creation_sites=record_creation_sites,
                                 shutdown_timeout=shutdown_timeout)
    world_id = new_world_id()
    error_dir = tempfile.mkdtemp(prefix=f"localrref-{world_id}-")
    job = CallFunction(fn=fn, args=tuple(args))
    plans = [ChildPlan(error_file=os.path.join(error_dir, f"{rank}.json")) for rank in range(nprocs)]
    group = WorkerGroup(jobs=[job] * nprocs, plans=plans, start_method=start_method, daemon=daemon,
                        options=options, world_id=world_id)
    try:
        group.start()
    except BaseException:
        shutil.rmtree(error_dir, ignore_errors=True)
        raise
    context = ProcessContext(group, error_dir)
    if not join:
        return context
    while not context.join():
        pass
    return None


def spawn(fn: Callable[..., Any], args: tuple[Any, ...] = (), nprocs: int = 1, join: bool = True,
          daemon: bool = False, start_method: str = "spawn") -> ProcessContext | None:
    r"""Spawn ``nprocs`` worker processes that run ``fn(rank, *args)`` in a localrref world.

    Same contract as ``torch.multiprocessing.spawn``: if one worker exits
    non-zero the others are stopped (SIGTERM, then SIGKILL after the shutdown
    timeout) and the first failure is raised in the parent, with the worker's
    traceback when it raised. Each worker also gets a
    :class:`~localrref.world.WorldSpec` (its inbox queues and world id) before
    ``fn`` runs, which is what lets ``init_rpc`` connect the world, and the
    moment a worker dies abnormally every other worker's inbox receives
    ``("__peer_exited__", rank, pid, exitcode)``.

    Unlike torch, ``start_method`` is honoured (``"spawn"``, ``"forkserver"``,
    ``"fork"``) rather than forced to ``"spawn"``. ``"forkserver"`` with
    ``multiprocessing.set_forkserver_preload(["torch"])`` starts a world in
    ~0.1-0.3 s instead of ~1 s per worker once the server runs (it starts on
    first use and lives as long as this process); its workers inherit the
    server's environment and stdout/stderr from when it started, not this
    process's current ones.

    Args:
        fn: Entry point, called as ``fn(i, *args)``; must be picklable
            (defined at the top level of a module).
        args: Arguments passed to ``fn`` after the process index.
        nprocs: Number of processes to spawn.
        join: Perform a blocking join on all processes.
        daemon: The spawned processes' daemon flag.
        start_method: ``multiprocessing`` start method.

    Returns:
        None if ``join`` is True, else a :class:`ProcessContext`.

    Raises:
        torch.multiprocessing.spawn.ProcessRaisedException: ``fn`` raised in a worker.
        torch.multiprocessing.spawn.ProcessExitedException: A worker exited
            non-zero or was killed by a signal.
        localrref.errors.RRefLeakError: Leaks were reported and
            ``LOCALRREF_STRICT_LEAKS=1``.
    """
    return start_processes(fn, args, nprocs, join, daemon, start_method)
