"""Records shared by every part of the auditor, and the exit-status table.

Everything here is data: frozen dataclasses and enums, no I/O. The exit
status is a bitmask (documented in ``leak_audit.py``), computed in one place
so that the CLI, ``RunReport.exit_code`` and ``AuditReport.exit_code`` agree.
"""

from __future__ import annotations

import enum
import math
from dataclasses import asdict, dataclass


class LeakKind(enum.Enum):
    """One kind of leftover the auditor can name; ``value`` is the label printed."""

    ORPHAN_PROCESS = "orphan process"
    SHM_SEGMENT = "leftover /dev/shm segment"
    SEMAPHORE = "leftover semaphore"
    FD_GROWTH = "fd growth"
    THREAD_GROWTH = "thread growth"
    MEMORY_GROWTH = "memory growth"
    LEAKED_RREF = "leaked RRef"

    @property
    def key(self) -> str:
        """The name used in JSON output: ``orphan_process``, ``fd_growth``..."""
        return self.name.lower()


EXIT_CLEAN = 0
EXIT_AUDITOR_ERROR = 1  # never combined with other bits: nothing was measured
EXIT_COMMAND_FAILED = 2

# Segments and semaphores share a bit: both are files under /dev/shm and the
# remedy is the same (unlink what you create). They keep separate verdicts.
EXIT_BIT: dict[LeakKind, int] = {
    LeakKind.ORPHAN_PROCESS: 4,
    LeakKind.SHM_SEGMENT: 8,
    LeakKind.SEMAPHORE: 8,
    LeakKind.FD_GROWTH: 16,
    LeakKind.THREAD_GROWTH: 32,
    LeakKind.MEMORY_GROWTH: 64,
    LeakKind.LEAKED_RREF: 128,
}


class LeakFound(AssertionError):
    """Raised by ``raise_if_leaking()``; an AssertionError so pytest shows it as a failure."""


class Status(enum.Enum):
    LEAK = "leak"
    CLEAN = "clean"
    UNKNOWN = "unknown"  # could not be checked; the summary says why


@dataclass(frozen=True, slots=True, kw_only=True)
class Verdict:
    kind: LeakKind
    status: Status
    summary: str
    details: tuple[str, ...] = ()

    def to_json(self) -> dict:
        return {"kind": self.kind.key, "label": self.kind.value, "status": self.status.value,
                "summary": self.summary, "details": list(self.details)}


def exit_code(verdicts: tuple[Verdict, ...], *, command_failed: bool) -> int:
    code = EXIT_COMMAND_FAILED if command_failed else EXIT_CLEAN
    for v in verdicts:
        if v.status is Status.LEAK:
            code |= EXIT_BIT[v.kind]
    return code


def describe_exit_code(code: int) -> str:
    """``"20 = orphan process + fd growth"``; the inverse of :func:`exit_code`."""
    if code == EXIT_CLEAN:
        return "0 = clean"
    if code == EXIT_AUDITOR_ERROR:
        return "1 = auditor error"
    parts = ["audited command failed"] if code & EXIT_COMMAND_FAILED else []
    seen: set[int] = set()
    for kind, bit in EXIT_BIT.items():
        if code & bit and bit not in seen:
            seen.add(bit)
            same = [k.value for k, b in EXIT_BIT.items() if b == bit]
            parts.append(" or ".join(same))
    return f"{code} = " + " + ".join(parts)


@dataclass(frozen=True, slots=True, kw_only=True)
class Sample:
    """One look at one process. ``t`` counts seconds from the start of the run."""

    t: float
    rss: int
    uss: int | None  # None where /proc/<pid>/smaps could not be read
    fds: int | None
    threads: int
    children: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ProcessRecord:
    pid: int
    ppid: int
    name: str
    cmdline: tuple[str, ...]
    create_time: float
    found_by: str  # "tree": seen as a descendant while sampling; "marker": by env marker only
    samples: tuple[Sample, ...]
    end_state: str  # "exited", "alive" or "zombie" when the audit ended

    def to_json(self, *, series: bool) -> dict:
        d = {k: getattr(self, k) for k in ("pid", "ppid", "name", "create_time", "found_by",
                                             "end_state")}
        d["cmdline"] = list(self.cmdline)
        d["summary"] = summarize_samples(self.samples)
        if series:
            d["samples"] = [asdict(s) for s in self.samples]
        return d


def summarize_samples(samples: tuple[Sample, ...]) -> dict:
    def peak(attr: str) -> int | None:
        vals = [getattr(s, attr) for s in samples if getattr(s, attr) is not None]
        return max(vals) if vals else None

    last = samples[-1] if samples else None
    return {"samples": len(samples), "rss_peak": peak("rss"), "uss_peak": peak("uss"),
            "uss_last": last.uss if last else None, "fds_max": peak("fds"),
            "threads_max": peak("threads"), "children_max": peak("children")}


@dataclass(frozen=True, slots=True, kw_only=True)
class LeftoverProcess:
    pid: int
    ppid: int
    name: str
    cmdline: tuple[str, ...]
    status: str  # psutil status at the end: "sleeping", "running", "zombie"...
    found_by: str
    reparented: bool  # its parent is not a process of the run (init or a subreaper adopted it)
    killed: bool = False

    def describe(self) -> str:
        cmd = " ".join(self.cmdline) or self.name
        how = "zombie" if self.status == "zombie" else self.status
        extra = f", reparented to {self.ppid}" if self.reparented else f", parent {self.ppid}"
        return (f"pid {self.pid} ({cmd[:80]}; {how}{extra}; found by {self.found_by}"
                f"{'; killed' if self.killed else ''})")


@dataclass(frozen=True, slots=True, kw_only=True)
class ShmEntry:
    name: str
    kind: LeakKind  # SHM_SEGMENT or SEMAPHORE
    size: int
    held_by: tuple[int, ...]  # pids of the run that had it open or mapped at the end
    unlinked: bool = False

    def describe(self) -> str:
        held = f", held by pid {', '.join(map(str, self.held_by))}" if self.held_by else ""
        done = "; unlinked" if self.unlinked else ""
        return f"/dev/shm/{self.name} ({self.size} bytes{held}{done})"


@dataclass(frozen=True, slots=True, kw_only=True)
class RRefLeak:
    """One entry of the supervisor's leak report (env ``LOCALRREF_LEAK_REPORT``)."""

    rref_id: object
    fork_id: object
    owner_rank: int | None
    holder_rank: int | None
    state: str
    value_type: str | None
    tensor_bytes: int | None
    creation_site: str | None

    def describe(self) -> str:
        site = f" created at {self.creation_site}" if self.creation_site else ""
        return (f"rref {self.rref_id} fork {self.fork_id}: {self.state} on rank "
                f"{self.holder_rank} (owner {self.owner_rank}), {self.value_type}, "
                f"{self.tensor_bytes or 0} tensor bytes{site}")


@dataclass(frozen=True, slots=True, kw_only=True)
class MetricGrowth:
    """The fitted growth of one metric of one source (a process or a worker).

    ``verdict`` is "leak" (slope over tolerance and every batch grew),
    "clean" (slope within tolerance), "noisy" (slope over tolerance but not
    every batch grew: allocator noise, a one-off cache fill) or
    "insufficient" (too few points after warm-up to decide).
    """

    source: str
    metric: str
    kind: LeakKind
    per: str  # unit of x: "step" or "s"
    slope: float
    t: float  # (slope - tolerance) / standard error of the slope
    r2: float
    tolerance: float
    batch_growths: tuple[float, ...]
    points: int
    verdict: str
    note: str = ""

    def describe(self) -> str:
        growths = ", ".join(f"{g:+.4g}" for g in self.batch_growths)
        note = f"; {self.note}" if self.note else ""
        return (f"{self.source} {self.metric}: {self.slope:+.4g}/{self.per} "
                f"(tolerance {self.tolerance:g}, t {self.t:.1f}, r2 {self.r2:.2f}, "
                f"{self.points} points, batch growths [{growths}]) -> {self.verdict}{note}")

    def to_json(self) -> dict:
        d = {k: getattr(self, k) for k in ("source", "metric", "per", "slope", "r2", "tolerance",
                                             "points", "verdict", "note")}
        d["t"] = self.t if math.isfinite(self.t) else (1e308 if self.t > 0 else -1e308)
        d["kind"] = self.kind.key
        d["batch_growths"] = list(self.batch_growths)
        return d
