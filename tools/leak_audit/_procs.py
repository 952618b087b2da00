"""Which processes belong to a run, what they look like over time, and ending them.

A process belongs to the run if either

* it was seen as a descendant of a root (the audited command, or the
  auditing process for :class:`Audit`) at some sample, keyed by
  ``(pid, create_time)`` so a recycled pid is not confused with it; or
* its environment carries ``LEAK_AUDIT_RUN_ID=<this run's id>``. Children
  inherit the environment, so this catches processes that were born and
  re-parented (double fork, daemonisation) between two samples. It reads
  the environment a process was exec'ed with; a program that scrubs its
  environment before spawning is caught only by sampling.

All methods run in the caller's thread; this module starts no thread.
Waiting for exits is event-driven: a pidfd per process (Linux >= 5.3)
polled with a deadline, falling back to ``psutil.wait_procs``.
"""

from __future__ import annotations

import os
import select
import signal
import time
from collections.abc import Callable, Iterable

import psutil

from ._model import LeftoverProcess, ProcessRecord, Sample

MARKER_ENV = "LEAK_AUDIT_RUN_ID"
EXEC_WINDOW = 1.0  # seconds we give a process in the middle of exec() to show its environment

Key = tuple[int, float]


def _key(proc: psutil.Process) -> Key:
    return (proc.pid, proc.create_time())


class _Tracked:
    __slots__ = ("proc", "ppid", "name", "cmdline", "found_by", "samples", "end_state")

    def __init__(self, proc: psutil.Process, found_by: str) -> None:
        self.proc = proc
        self.found_by = found_by
        self.samples: list[Sample] = []
        self.end_state = "alive"
        try:
            with proc.oneshot():
                self.ppid = proc.ppid()
                self.name = proc.name()
                self.cmdline = tuple(proc.cmdline())
        except psutil.Error:
            self.ppid, self.name, self.cmdline = -1, "?", ()


class ProcessTracker:
    """The processes of one run, discovered from ``roots`` and an env marker.

    Args:
        roots: processes whose descendants belong to the run.
        sample_roots: also sample the roots themselves (True for a command,
            False when the root is the auditing process).
        marker: the run id in ``MARKER_ENV``; None disables the scan.
        t0: ``time.monotonic()`` at the start of the run (sample times count from it).
        ignore: predicate for processes that are never part of the run.
    """

    def __init__(self, roots: Iterable[psutil.Process], *, sample_roots: bool,
                 marker: str | None, t0: float,
                 ignore: Callable[[psutil.Process], bool] | None = None,
                 exclude: Iterable[Key] = ()) -> None:
        self.roots = list(roots)
        self.marker = marker
        self.t0 = t0
        self.ignore = ignore
        self._exclude = set(exclude) | {_key(psutil.Process())}
        self._tracked: dict[Key, _Tracked] = {}
        if sample_roots:
            for r in self.roots:
                self._add(r, "tree")

    def _add(self, proc: psutil.Process, found_by: str) -> None:
        try:
            key = _key(proc)
        except psutil.Error:
            return
        if key in self._tracked or key in self._exclude:
            return
        if self.ignore is not None and self.ignore(proc):
            self._exclude.add(key)
            return
        self._tracked[key] = _Tracked(proc, found_by)

    def discover(self) -> None:
        """Add every current descendant of a root or of a tracked process."""
        starts = [r for r in self.roots if r.is_running()]
        starts += [t.proc for t in self._tracked.values()
                   if t.proc.is_running() and t.proc not in starts]
        seen: set[int] = set()
        for start in starts:
            if start.pid in seen:
                continue
            try:
                kids = start.children(recursive=True)
            except psutil.Error:
                continue
            for kid in kids:
                seen.add(kid.pid)
                self._add(kid, "tree")

    def scan_marker(self) -> None:
        """Add every live process whose environment carries this run's marker."""
        if self.marker is None:
            return
        known = set(self._tracked) | self._exclude
        in_exec = []
        # Fresh Process objects, not psutil.process_iter(): its cache can hand back an
        # object made for an earlier process with a since-recycled pid, whose stale
        # create_time would make our new process look dead.
        for pid in psutil.pids():
            try:
                proc = psutil.Process(pid)
                if _key(proc) in known:
                    continue
                env = proc.environ()
                if not env and _execing(proc):
                    in_exec.append(proc)
                elif env.get(MARKER_ENV) == self.marker:
                    self._add(proc, "marker")
            except psutil.Error:
                continue
        for proc in _after_exec(in_exec, time.monotonic() + EXEC_WINDOW):
            try:
                if proc.environ().get(MARKER_ENV) == self.marker:
                    self._add(proc, "marker")
            except psutil.Error:
                continue

    def sample(self) -> None:
        """Discover, then record one :class:`Sample` of every live tracked process."""
        self.discover()
        t = time.monotonic() - self.t0
        live = [tr for tr in self._tracked.values() if tr.proc.is_running()]
        parents: dict[int, int] = {}
        for tr in live:
            try:
                parents[tr.proc.pid] = tr.proc.ppid()
            except psutil.Error:
                pass
        for tr in live:
            proc = tr.proc
            try:
                with proc.oneshot():
                    if proc.status() == psutil.STATUS_ZOMBIE:
                        continue
                    if len(tr.samples) < 3:  # a shell or launcher may exec right after fork
                        tr.name, tr.cmdline = proc.name(), tuple(proc.cmdline())
                    try:
                        mem = proc.memory_full_info()
                        rss, uss = mem.rss, mem.uss
                    except psutil.AccessDenied:
                        rss, uss = proc.memory_info().rss, None
                    try:
                        fds = proc.num_fds()
                    except psutil.AccessDenied:
                        fds = None
                    threads = proc.num_threads()
            except psutil.Error:
                continue
            kids = sum(1 for pp in parents.values() if pp == proc.pid)
            tr.samples.append(Sample(t=t, rss=rss, uss=uss, fds=fds, threads=threads,
                                     children=kids))

    def live(self) -> list[psutil.Process]:
        """Tracked processes that have not been reaped (zombies included)."""
        return [t.proc for t in self._tracked.values() if t.proc.is_running()]

    def pids(self) -> set[int]:
        return {t.proc.pid for t in self._tracked.values()}

    def leftovers(self, *, own_children_of: int | None = None) -> list[LeftoverProcess]:
        """The tracked processes still here, as reported leftovers.

        A zombie counts only if its parent is a live process of the run or
        ``own_children_of`` (the auditing process): it was not waited for.
        Zombies adopted by init are about to be reaped and are not the run's doing.
        """
        live = self.live()
        live_pids = {p.pid for p in live}
        family = live_pids | {r.pid for r in self.roots} | {own_children_of}
        out = []
        for proc in live:
            tr = self._tracked[_key(proc)]
            try:
                with proc.oneshot():
                    status, ppid = proc.status(), proc.ppid()
                    if status != psutil.STATUS_ZOMBIE:  # it may have exec'ed since we met it
                        tr.name, tr.cmdline = proc.name(), tuple(proc.cmdline())
            except psutil.Error:
                continue
            if status == psutil.STATUS_ZOMBIE and ppid not in live_pids | {own_children_of}:
                tr.end_state = "exited"
                continue
            tr.end_state = "zombie" if status == psutil.STATUS_ZOMBIE else "alive"
            out.append(LeftoverProcess(pid=proc.pid, ppid=ppid, name=tr.name,
                                       cmdline=tr.cmdline, status=status,
                                       found_by=tr.found_by, reparented=ppid not in family))
        for tr in self._tracked.values():
            if not tr.proc.is_running():
                tr.end_state = "exited"
        return out

    def records(self) -> tuple[ProcessRecord, ...]:
        out = []
        for (pid, ctime), tr in self._tracked.items():
            out.append(ProcessRecord(pid=pid, ppid=tr.ppid, name=tr.name, cmdline=tr.cmdline,
                                     create_time=ctime, found_by=tr.found_by,
                                     samples=tuple(tr.samples), end_state=tr.end_state))
        return tuple(out)


def _execing(proc: psutil.Process) -> bool:
    """In the middle of exec(): a new executable, but no argv or environment yet.

    The kernel wakes the parent (vfork, or the CLOEXEC pipe subprocess waits on)
    before it has built the new stack, so for a moment right after ``Popen``
    returns /proc/<pid>/environ and cmdline read empty. Kernel threads also
    have neither, but no executable.
    """
    try:
        return bool(proc.exe()) and not proc.cmdline()
    except psutil.Error:
        return False


def _after_exec(procs: list[psutil.Process], deadline: float) -> list[psutil.Process]:
    """``procs`` once each has finished exec() (or exited), up to ``deadline``.

    The kernel reports no event for "exec done", so this re-reads, bounded by
    the deadline; the poll on their pidfds only returns early when one exits.
    """
    done: list[psutil.Process] = []
    pending = list(procs)
    while pending:
        still = []
        for proc in pending:
            (still if _execing(proc) else done).append(proc)
        pending = still
        left = deadline - time.monotonic()
        if not pending or left <= 0:
            break
        wait_for_exit(pending, min(left, 0.002))
    return done


def wait_for_exit(procs: Iterable[psutil.Process], timeout: float
                  ) -> tuple[list[psutil.Process], list[psutil.Process]]:
    """Wait until every process has exited (a zombie counts as exited) or ``timeout``.

    Returns:
        ``(gone, alive)``. Does not reap anything: children stay waitable by
        their owners (multiprocessing, subprocess).
    """
    procs = list(procs)
    deadline = time.monotonic() + timeout
    gone: list[psutil.Process] = []
    fds: dict[int, psutil.Process] = {}
    fallback: list[psutil.Process] = []
    poller = select.poll()
    try:
        for proc in procs:
            try:
                fd = os.pidfd_open(proc.pid)
            except ProcessLookupError:
                gone.append(proc)
                continue
            except (OSError, AttributeError):  # no pidfd on this kernel or platform
                fallback.append(proc)
                continue
            if not proc.is_running():  # the pid was recycled before we opened it
                os.close(fd)
                gone.append(proc)
                continue
            fds[fd] = proc
            poller.register(fd, select.POLLIN)
        while fds:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            for fd, _ in poller.poll(max(1, int(left * 1000))):
                poller.unregister(fd)
                os.close(fd)
                gone.append(fds.pop(fd))
        alive = list(fds.values())
    finally:
        for fd in fds:
            os.close(fd)
    if fallback:
        g, a = psutil.wait_procs(fallback, timeout=max(0.0, deadline - time.monotonic()))
        gone += g
        alive += a
    return gone, alive


def is_alive(proc: psutil.Process) -> bool:
    """Running and not a zombie."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def kill_processes(procs: Iterable[psutil.Process], *, grace: float = 3.0,
                   reap: bool = True) -> set[int]:
    """SIGTERM, wait up to ``grace``, then SIGKILL (and wait again).

    A zombie cannot be signalled; it goes away once its parent (killed here
    too when it is part of the run) is gone.

    Args:
        reap: also ``waitpid`` the ones that are this process's children, so
            they do not stay zombies. Pass False when their owner will wait
            for them (a ``Popen`` whose return code you still want).

    Returns:
        The pids that are dead afterwards.
    """
    procs = list({p.pid: p for p in procs}.values())
    me = os.getpid()
    ours = []
    for p in procs:
        try:
            if p.ppid() == me:
                ours.append(p.pid)
        except psutil.Error:
            continue
    remaining = [p for p in procs if is_alive(p)]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in remaining:
            try:
                p.send_signal(sig)
            except psutil.Error:
                continue
        _, remaining = wait_for_exit(remaining, grace)
        if not remaining:
            break
    if reap:
        reap_own_children(ours)
    return {p.pid for p in procs if not is_alive(p)}


def reap_own_children(pids: Iterable[int]) -> None:
    """``waitpid`` children of this process that have exited, so no zombie stays."""
    for pid in pids:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            continue
