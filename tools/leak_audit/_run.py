"""Audit one command: run it, sample its process tree, then look for what it left.

Data flow (one thread, the caller's; the loop waits on poll(), never sleeps)::

    run_audit(cmd)
      |  env += LEAK_AUDIT_RUN_ID, LOCALRREF_LEAK_REPORT      snapshot /dev/shm
      v
    Popen(cmd, stdout=PIPE) --stdout--> _Pump: forward bytes, parse LEAK_AUDIT_STEP lines
      |                                                     (ProbePoints)
      |   poll([stdout, pidfd(root), pidfds(stragglers)], until next sample)
      |   every `interval`: ProcessTracker.sample()  -> per-process Samples
      v
    root exits -> scan env marker -> wait (patience) for stragglers, still sampling/draining
      v
    leftovers (orphans, zombies)  /dev/shm diff  RRef leak report  growth fits
      v
    report (verdicts)  ->  then kill leftovers, unlink leftover entries (if asked)
"""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TextIO

import psutil

from . import _render
from ._growth import (DEFAULT_BATCHES, PROBE_PREFIX, ProbePoint, fit_probe_points,
                      fit_process_samples, growth_verdicts, parse_probe_line)
from ._model import (LeakFound, LeakKind, LeftoverProcess, MetricGrowth, ProcessRecord,
                     RRefLeak, ShmEntry, Status, Verdict, exit_code)
from ._procs import MARKER_ENV, ProcessTracker, is_alive, kill_processes
from ._rref import REPORT_ENV, read_rref_report, rref_report_verdict
from ._shm import leftover_shm, shm_verdicts, snapshot_shm, unlink_entries
from ._verdicts import combine, orphan_verdict

GROWTH_MODES = ("auto", "samples", "off")


@dataclass(frozen=True, slots=True, kw_only=True)
class RunOptions:
    """Knobs of :func:`run_audit` (the CLI flags of the same names)."""

    interval: float = 0.1  # seconds between samples of the process tree
    patience: float = 5.0  # seconds the run's processes get to exit after the command did
    timeout: float | None = None  # kill the command's tree after this many seconds
    kill_orphans: bool = True  # kill leftover processes after reporting them
    unlink_shm: bool = True  # unlink leftover /dev/shm entries after reporting them
    shm_prefixes: tuple[str, ...] = ()  # only judge /dev/shm names with these prefixes
    growth: str = "auto"  # auto: fit probe lines; samples: also fit sampled series; off
    warmup_steps: int = 10  # probe points dropped per series before fitting
    warmup_s: float = 1.0  # seconds at the start of each process's samples not fitted
    cooldown_s: float = 1.0  # seconds at the end (teardown) of an exited process not fitted
    batches: int = DEFAULT_BATCHES
    tolerance: Mapping[str, float] = field(default_factory=dict)
    rref_report: str | None = None  # where the supervisor writes its report; default: a temp file
    env: Mapping[str, str] | None = None  # added to the command's environment
    cwd: str | None = None
    forward: TextIO | str | None = "stdout"  # where the command's stdout goes ("stderr", None)
    kill_grace: float = 3.0  # SIGTERM -> SIGKILL delay when killing

    def __post_init__(self) -> None:
        if self.growth not in GROWTH_MODES:
            raise ValueError(f"growth must be one of {GROWTH_MODES}, not {self.growth!r}")
        if self.interval <= 0 or self.patience < 0 or self.batches < 2:
            raise ValueError("need interval > 0, patience >= 0 and batches >= 2; got "
                             f"{self.interval}, {self.patience}, {self.batches}")


@dataclass(frozen=True, slots=True, kw_only=True)
class RunReport:
    command: tuple[str, ...]
    run_id: str
    returncode: int | None  # None: it did not start
    timed_out: bool
    start_error: str | None
    duration: float
    interval: float
    processes: tuple[ProcessRecord, ...]
    leftovers: tuple[LeftoverProcess, ...]
    shm: tuple[ShmEntry, ...]
    rref_leaks: tuple[RRefLeak, ...] | None  # None: no readable report
    growth: tuple[MetricGrowth, ...]
    probe_errors: tuple[str, ...]
    verdicts: tuple[Verdict, ...]

    @property
    def command_failed(self) -> bool:
        return self.returncode != 0 or self.timed_out

    @property
    def exit_code(self) -> int:
        return exit_code(self.verdicts, command_failed=self.command_failed)

    @property
    def leaks(self) -> tuple[Verdict, ...]:
        return tuple(v for v in self.verdicts if v.status is Status.LEAK)

    def verdict(self, kind: LeakKind) -> Verdict:
        return next(v for v in self.verdicts if v.kind is kind)

    def render(self) -> str:
        return _render.render_run(self)

    def to_json(self, *, series: bool = False) -> dict:
        return _render.run_to_json(self, series=series)

    def raise_if_leaking(self) -> None:
        if self.leaks:
            raise LeakFound(self.render())


class _Pump:
    """Forwards the command's stdout and collects probe points from it."""

    def __init__(self, fd: int, forward: TextIO | None) -> None:
        self.fd = fd
        self.forward = forward
        self.partial = b""
        self.points: list[ProbePoint] = []
        self.errors: list[str] = []
        self.eof = False
        os.set_blocking(fd, False)

    def read(self) -> None:
        while not self.eof:
            try:
                chunk = os.read(self.fd, 65536)
            except BlockingIOError:
                return
            if not chunk:
                self.eof = True
                if self.partial:
                    self._lines([self.partial])
                    self.partial = b""
                return
            if self.forward is not None:
                self.forward.write(chunk.decode("utf-8", "replace"))
                self.forward.flush()
            lines = (self.partial + chunk).split(b"\n")
            self.partial = lines.pop()
            self._lines(lines)

    def _lines(self, lines: list[bytes]) -> None:
        for raw in lines:
            if not raw.startswith(PROBE_PREFIX.encode()):
                continue
            try:
                point = parse_probe_line(raw.decode("utf-8", "replace").rstrip("\r"))
            except ValueError as exc:
                if len(self.errors) < 20:
                    self.errors.append(str(exc))
                continue
            if point is not None:
                self.points.append(point)


class _Waits:
    """pidfds polled together with the stdout pipe; falls back to a sampling-rate check."""

    def __init__(self, pump: _Pump) -> None:
        self.poller = select.poll()
        self.pump = pump
        self.pidfds: dict[int, psutil.Process] = {}
        self.unwatchable: list[psutil.Process] = []
        self.poller.register(pump.fd, select.POLLIN)

    def watch(self, proc: psutil.Process) -> None:
        if proc in self.pidfds.values() or proc in self.unwatchable:
            return
        try:
            fd = os.pidfd_open(proc.pid)
        except ProcessLookupError:
            return
        except (OSError, AttributeError):
            self.unwatchable.append(proc)
            return
        self.pidfds[fd] = proc
        self.poller.register(fd, select.POLLIN)

    def wait(self, seconds: float) -> list[psutil.Process]:
        """Block until output, an exit, or ``seconds``; returns the processes that exited."""
        exited = []
        for fd, _ in self.poller.poll(max(0, int(seconds * 1000) + 1)):
            if fd == self.pump.fd:
                self.pump.read()
                if self.pump.eof:
                    self.poller.unregister(fd)
            elif fd in self.pidfds:
                self.poller.unregister(fd)
                os.close(fd)
                exited.append(self.pidfds.pop(fd))
        return exited

    def close(self) -> None:
        for fd in self.pidfds:
            os.close(fd)
        self.pidfds.clear()


def _resolve_forward(forward: TextIO | str | None) -> TextIO | None:
    if forward == "stdout":
        return sys.stdout
    if forward == "stderr":
        return sys.stderr
    return forward  # type: ignore[return-value]


def run_audit(command: Sequence[str], **options) -> RunReport:
    """Run ``command``, watch its process tree, and report what it leaves behind.

    Args:
        command: argv of the program to audit (no shell).
        **options: fields of :class:`RunOptions`.

    Returns:
        A :class:`RunReport`; ``exit_code`` is the CLI's exit status.

    Raises:
        ValueError: an option is out of range.
    """
    opts = RunOptions(**options)
    command = tuple(command)
    run_id = uuid.uuid4().hex
    tmpdir = None
    report_path = opts.rref_report
    if report_path is None:
        tmpdir = tempfile.mkdtemp(prefix="leak_audit_")
        report_path = os.path.join(tmpdir, "rref_leaks.json")
    elif os.path.exists(report_path):
        os.remove(report_path)  # a stale report from an earlier run would be misread as ours
    env = dict(os.environ)
    env.update(opts.env or {})
    env[MARKER_ENV] = run_id
    env[REPORT_ENV] = report_path
    shm_before = snapshot_shm()
    t0 = time.monotonic()
    try:
        try:
            popen = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, cwd=opts.cwd)
        except OSError as exc:
            return _not_started(command, run_id, opts, f"{exc.__class__.__name__}: {exc}")
        with popen:
            return _watch(popen, command, run_id, opts, t0, shm_before, report_path)
    finally:
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)


def _not_started(command, run_id, opts: RunOptions, error: str) -> RunReport:
    why = f"not checked: the command did not start ({error})"
    verdicts = tuple(Verdict(kind=k, status=Status.UNKNOWN, summary=why) for k in LeakKind)
    return RunReport(command=command, run_id=run_id, returncode=None, timed_out=False,
                     start_error=error, duration=0.0, interval=opts.interval, processes=(),
                     leftovers=(), shm=(), rref_leaks=None, growth=(), probe_errors=(),
                     verdicts=verdicts)


def _watch(popen: subprocess.Popen, command, run_id: str, opts: RunOptions, t0: float,
           shm_before: dict[str, int], report_path: str) -> RunReport:
    root = psutil.Process(popen.pid)
    tracker = ProcessTracker([root], sample_roots=True, marker=run_id, t0=t0)
    pump = _Pump(popen.stdout.fileno(), _resolve_forward(opts.forward))
    waits = _Waits(pump)
    timed_out = False
    try:
        waits.watch(root)
        # Not at t0: a process that has just forked has nothing to show yet.
        next_sample = t0 + opts.interval
        while popen.poll() is None:
            now = time.monotonic()
            if now >= next_sample:
                tracker.sample()
                next_sample = max(next_sample + opts.interval, now)
            if opts.timeout is not None and now - t0 >= opts.timeout:
                timed_out = True
                tracker.discover()
                kill_processes([root, *tracker.live()], grace=opts.kill_grace, reap=False)
                break
            until = next_sample
            if opts.timeout is not None:
                until = min(until, t0 + opts.timeout)
            waits.wait(min(until - now, opts.interval) if waits.unwatchable else until - now)
        returncode = popen.wait()
        duration = time.monotonic() - t0

        # The command is gone; give its processes `patience` to follow, still draining
        # stdout (a straggler blocked on a full pipe would never exit) and sampling.
        tracker.sample()
        deadline = time.monotonic() + opts.patience
        while True:
            tracker.discover()
            tracker.scan_marker()  # every round: processes born while we wait count too
            waiting = [p for p in tracker.live() if is_alive(p)]
            now = time.monotonic()
            if not waiting or now >= deadline:
                break
            for p in waiting:
                waits.watch(p)
            if now >= next_sample:
                tracker.sample()
                next_sample = now + opts.interval
            limit = min(deadline, next_sample) - now
            waits.wait(min(limit, opts.interval) if waits.unwatchable else limit)

        leftovers = tracker.leftovers()
        shm = leftover_shm(shm_before, run_pids=tracker.pids(), prefixes=opts.shm_prefixes)
        if opts.kill_orphans and leftovers:
            procs = [p for p in tracker.live() if p.pid in {lp.pid for lp in leftovers}]
            dead = kill_processes(procs, grace=opts.kill_grace, reap=False)
            leftovers = [replace(lp, killed=lp.pid in dead) for lp in leftovers]
        if opts.unlink_shm and shm and opts.shm_prefixes:
            # Only entries under a prefix the caller named are ours to remove:
            # a semaphore of another program can look unheld (glibc maps it
            # under a temporary name), and unlinking it breaks that program.
            shm = unlink_entries(shm)
        # Killing the leftovers closed their ends of the pipe: take what they wrote.
        drain_until = time.monotonic() + (1.0 if opts.kill_orphans else 0.0)
        while not pump.eof and time.monotonic() < drain_until:
            waits.wait(drain_until - time.monotonic())
        pump.read()
    except BaseException:
        tracker.discover()
        kill_processes([root, *tracker.live()], grace=opts.kill_grace, reap=False)
        raise
    finally:
        waits.close()

    leaks, why = read_rref_report(report_path)
    verdicts = [orphan_verdict(leftovers), *shm_verdicts(shm, prefixes=opts.shm_prefixes),
                rref_report_verdict(leaks, why)]
    growth, reason = _growth(opts, pump.points, tracker.records())
    verdicts += growth_verdicts(growth, none_reason=reason)
    return RunReport(command=command, run_id=run_id, returncode=returncode, timed_out=timed_out,
                     start_error=None, duration=duration, interval=opts.interval,
                     processes=tracker.records(), leftovers=tuple(leftovers), shm=tuple(shm),
                     rref_leaks=None if leaks is None else tuple(leaks), growth=tuple(growth),
                     probe_errors=tuple(pump.errors), verdicts=combine(verdicts))


def _growth(opts: RunOptions, points: list[ProbePoint], records) -> tuple[list[MetricGrowth], str]:
    if opts.growth == "off":
        return [], "growth checks are off (--growth off)"
    fits = fit_probe_points(points, warmup=opts.warmup_steps, batches=opts.batches,
                            tolerance=opts.tolerance)
    if opts.growth == "samples":
        fits += fit_process_samples(records, warmup_s=opts.warmup_s, cooldown_s=opts.cooldown_s,
                                    batches=opts.batches, tolerance=opts.tolerance)
        return fits, "no process lived long enough for a fit"
    return fits, (f"the command printed no {PROBE_PREFIX.strip()} lines; print them "
                  "(leak_audit.probe_line) or use --growth samples")
