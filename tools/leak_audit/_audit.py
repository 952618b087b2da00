"""``with Audit() as a: ...`` -- what a block of code (a test) left behind in this process.

Data flow (all in the caller's thread)::

    __enter__: snapshot children (pid, create_time), threading.enumerate(),
               /proc/self/fd, /dev/shm; set LEAK_AUDIT_RUN_ID in os.environ
               so every process spawned in the block carries it
      ... the block runs ...
    __exit__:  restore os.environ
               new processes (descendants + env marker) --wait_for_exit(pidfd)--+
               new threads --Thread.join(timeout)--------------------------------+ one
                                                                                  | deadline:
               gc.collect(); new fds; new /dev/shm entries; RRef counters         | `patience`
               -> AuditReport; then kill leftover processes, unlink leftovers

Nothing sleeps: processes are waited on with pidfds and threads with
``join``, both against one deadline, so a clean block costs no time.

Ignored on purpose (by the default ``ignore_process``): multiprocessing's
resource tracker and forkserver. Each is started once per interpreter on
first use and lives until the interpreter exits, by design; so are the fds
this process keeps to them.
"""

from __future__ import annotations

import gc
import os
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Collection
from dataclasses import dataclass, replace

import psutil

from ._model import (LeakFound, LeakKind, LeftoverProcess, ShmEntry, Status, Verdict,
                     exit_code)
from ._procs import MARKER_ENV, ProcessTracker, _key, is_alive, kill_processes, wait_for_exit
from ._render import verdict_lines
from ._rref import (debug_counters, debug_counters_verdict, read_rref_report,
                    rref_report_verdict)
from ._shm import leftover_shm, shm_verdicts, snapshot_shm, unlink_entries
from ._verdicts import combine, orphan_verdict

_INFRA_MODULES = ("multiprocessing.resource_tracker", "multiprocessing.forkserver")


def is_infrastructure(proc: psutil.Process) -> bool:
    """multiprocessing's per-interpreter helper processes (see the module docstring)."""
    if proc.pid in _infrastructure_pids():
        # By pid first: they are started without waiting for exec, so for a moment
        # their command line is still ours.
        return True
    try:
        cmd = " ".join(proc.cmdline())
    except psutil.Error:
        return False
    return any(m in cmd for m in _INFRA_MODULES)


def _infrastructure_pids() -> set[int]:
    rt = sys.modules.get("multiprocessing.resource_tracker")
    fs = sys.modules.get("multiprocessing.forkserver")
    pids = {getattr(getattr(rt, "_resource_tracker", None), "_pid", None),
            getattr(getattr(fs, "_forkserver", None), "_forkserver_pid", None)}
    return {p for p in pids if isinstance(p, int)}


def _infrastructure_fds() -> set[int]:
    fds = set()
    rt = sys.modules.get("multiprocessing.resource_tracker")
    fd = getattr(getattr(rt, "_resource_tracker", None), "_fd", None)
    if isinstance(fd, int):
        fds.add(fd)
    fs = sys.modules.get("multiprocessing.forkserver")
    fd = getattr(getattr(fs, "_forkserver", None), "_forkserver_alive_fd", None)
    if isinstance(fd, int):
        fds.add(fd)
    return fds


def _fd_table() -> dict[int, str]:
    table = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            table[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:  # the fd of the listing itself, closed by now
            continue
    return table


@dataclass(frozen=True, slots=True, kw_only=True)
class ThreadInfo:
    name: str
    ident: int | None
    daemon: bool
    where: str  # innermost frame of its stack, "file:line in function"

    def describe(self) -> str:
        return f"{self.name!r} ({'daemon' if self.daemon else 'non-daemon'}) at {self.where}"


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditReport:
    leftovers: tuple[LeftoverProcess, ...]
    threads: tuple[ThreadInfo, ...]
    fds: tuple[tuple[int, str], ...]
    shm: tuple[ShmEntry, ...]
    native_threads_delta: int  # OS threads of this process, after minus before (not judged)
    verdicts: tuple[Verdict, ...]

    @property
    def leaks(self) -> tuple[Verdict, ...]:
        return tuple(v for v in self.verdicts if v.status is Status.LEAK)

    @property
    def exit_code(self) -> int:
        return exit_code(self.verdicts, command_failed=False)

    def verdict(self, kind: LeakKind) -> Verdict:
        return next(v for v in self.verdicts if v.kind is kind)

    def render(self) -> str:
        return "\n".join(["leak_audit: what the block left behind"] + verdict_lines(self.verdicts)
                         + [f"  (native threads {self.native_threads_delta:+d}; not judged)"])

    def to_json(self) -> dict:
        return {"verdicts": [v.to_json() for v in self.verdicts],
                "leaks": [v.kind.key for v in self.leaks], "exit_code": self.exit_code,
                "native_threads_delta": self.native_threads_delta}

    def raise_if_leaking(self) -> None:
        if self.leaks:
            raise LeakFound(self.render())


class Audit:
    """Context manager that reports what the block leaves behind in this process.

    Example, a pytest fixture::

        @pytest.fixture
        def no_leaks():
            with leak_audit.Audit() as audit:
                yield audit
            audit.report().raise_if_leaking()

    Args:
        patience: seconds processes and threads started in the block get to
            finish after it ends (one deadline for all; waited on, not slept).
        shm_prefixes: judge only /dev/shm names with these prefixes.
        check_fds, check_threads: turn those checks off.
        marker: put ``LEAK_AUDIT_RUN_ID`` in ``os.environ`` during the block so
            that re-parented grandchildren can be found.
        rref_report: path of a localrref leak report to read; if None, this
            process's ``localrref.get_debug_info()`` counters are used when
            an RPC agent runs here (otherwise the RRef verdict is unknown).
        kill_orphans, unlink_shm: clean up leftovers after reporting them.
        ignore_process, ignore_thread: predicates for things that are not leaks.
    """

    def __init__(self, *, patience: float = 5.0, shm_prefixes: Collection[str] = (),
                 check_fds: bool = True, check_threads: bool = True, marker: bool = True,
                 rref_report: str | None = None, kill_orphans: bool = True,
                 unlink_shm: bool = True,
                 ignore_process: Callable[[psutil.Process], bool] | None = is_infrastructure,
                 ignore_thread: Callable[[threading.Thread], bool] | None = None,
                 kill_grace: float = 3.0) -> None:
        self.patience = patience
        self.shm_prefixes = tuple(shm_prefixes)
        self.check_fds = check_fds
        self.check_threads = check_threads
        self.marker = marker
        self.rref_report = rref_report
        self.kill_orphans = kill_orphans
        self.unlink_shm = unlink_shm
        self.ignore_process = ignore_process
        self.ignore_thread = ignore_thread
        self.kill_grace = kill_grace
        self.run_id = uuid.uuid4().hex
        self._report: AuditReport | None = None

    def __enter__(self) -> Audit:
        me = psutil.Process()
        self._me = me
        self._children_before = {_key(p) for p in me.children(recursive=True)}
        self._threads_before = set(threading.enumerate())
        self._fds_before = _fd_table() if self.check_fds else {}
        self._shm_before = snapshot_shm()
        self._native_before = me.num_threads()
        self._old_marker = os.environ.get(MARKER_ENV)
        if self.marker:
            os.environ[MARKER_ENV] = self.run_id
        self._report = None
        return self

    def __exit__(self, *exc_info) -> bool:
        if self.marker:
            if self._old_marker is None:
                os.environ.pop(MARKER_ENV, None)
            else:
                os.environ[MARKER_ENV] = self._old_marker
        self._report = self._finish()
        return False

    def report(self) -> AuditReport:
        """The report of the finished block.

        Raises:
            RuntimeError: the ``with`` block has not ended yet.
        """
        if self._report is None:
            raise RuntimeError("Audit.report() is available once the `with Audit()` block has "
                               "ended; call it after the block.")
        return self._report

    def _finish(self) -> AuditReport:
        deadline = time.monotonic() + self.patience
        tracker = ProcessTracker([self._me], sample_roots=False,
                                 marker=self.run_id if self.marker else None,
                                 t0=time.monotonic(), ignore=self.ignore_process,
                                 exclude=self._children_before)
        while True:  # until nothing of the block runs, or the deadline
            tracker.discover()
            tracker.scan_marker()  # again each round: forked while we waited counts too
            waiting = [p for p in tracker.live() if is_alive(p)]
            left = deadline - time.monotonic()
            if not waiting or left <= 0:
                break
            wait_for_exit(waiting, left)
        threads = self._leftover_threads(deadline) if self.check_threads else []
        gc.collect()  # closes files only garbage still holds
        fds = self._leftover_fds() if self.check_fds else []
        leftovers = tracker.leftovers(own_children_of=self._me.pid)
        shm = leftover_shm(self._shm_before, run_pids=tracker.pids() | {self._me.pid},
                           prefixes=self.shm_prefixes)
        if self.kill_orphans and leftovers:
            procs = [p for p in tracker.live() if p.pid in {lp.pid for lp in leftovers}]
            dead = kill_processes(procs, grace=self.kill_grace)
            leftovers = [replace(lp, killed=lp.pid in dead) for lp in leftovers]
        if self.unlink_shm and shm and self.shm_prefixes:
            # Only entries under a prefix the caller named are ours to remove:
            # a semaphore of another program can look unheld (glibc maps it
            # under a temporary name), and unlinking it breaks that program.
            shm = unlink_entries(shm)
        verdicts = [orphan_verdict(leftovers, what="started in the block"),
                    *shm_verdicts(shm, prefixes=self.shm_prefixes),
                    _fd_verdict(fds, self.check_fds), _thread_verdict(threads, self.check_threads),
                    Verdict(kind=LeakKind.MEMORY_GROWTH, status=Status.UNKNOWN,
                            summary="not measured by Audit (use measure_growth)"),
                    self._rref_verdict()]
        return AuditReport(leftovers=tuple(leftovers), threads=tuple(threads), fds=tuple(fds),
                           shm=tuple(shm),
                           native_threads_delta=self._me.num_threads() - self._native_before,
                           verdicts=combine(verdicts))

    def _leftover_threads(self, deadline: float) -> list[ThreadInfo]:
        new = [t for t in threading.enumerate()
               if t not in self._threads_before and t is not threading.current_thread()
               and not (self.ignore_thread and self.ignore_thread(t))]
        for t in new:
            t.join(max(0.0, deadline - time.monotonic()))
        frames = sys._current_frames()
        out = []
        for t in new:
            if not t.is_alive():
                continue
            frame = frames.get(t.ident) if t.ident is not None else None
            where = "?"
            if frame is not None:
                fs = traceback.extract_stack(frame, limit=1)[-1]
                where = f"{fs.filename}:{fs.lineno} in {fs.name}"
            out.append(ThreadInfo(name=t.name, ident=t.ident, daemon=t.daemon, where=where))
        return out

    def _leftover_fds(self) -> list[tuple[int, str]]:
        infra = _infrastructure_fds()
        return sorted((fd, tgt) for fd, tgt in _fd_table().items()
                      if self._fds_before.get(fd) != tgt and fd not in infra)

    def _rref_verdict(self) -> Verdict:
        if self.rref_report is not None:
            return rref_report_verdict(*read_rref_report(self.rref_report))
        return debug_counters_verdict(*debug_counters())


def _fd_verdict(fds: list[tuple[int, str]], checked: bool) -> Verdict:
    kind = LeakKind.FD_GROWTH
    if not checked:
        return Verdict(kind=kind, status=Status.UNKNOWN, summary="not checked (check_fds=False)")
    if fds:
        return Verdict(kind=kind, status=Status.LEAK,
                       summary=f"{len(fds)} fd(s) opened in the block are still open",
                       details=tuple(f"fd {fd} -> {tgt}" for fd, tgt in fds))
    return Verdict(kind=kind, status=Status.CLEAN, summary="no new open fd")


def _thread_verdict(threads: list[ThreadInfo], checked: bool) -> Verdict:
    kind = LeakKind.THREAD_GROWTH
    if not checked:
        return Verdict(kind=kind, status=Status.UNKNOWN,
                       summary="not checked (check_threads=False)")
    if threads:
        return Verdict(kind=kind, status=Status.LEAK,
                       summary=f"{len(threads)} thread(s) started in the block still run",
                       details=tuple(t.describe() for t in threads))
    return Verdict(kind=kind, status=Status.CLEAN, summary="no new thread still running")
