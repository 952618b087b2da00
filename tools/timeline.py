"""Where a step's wall time goes, across processes: a timeline of one run.

    BENCH_APPS_TIMELINE=/tmp/tl python tools/bench_apps.py --apps ps --world-sizes 3 \\
        --backends localrref --scale 0.2
    python tools/timeline.py /tmp/tl --phase "trainer: forward and backward" --rank 1 --steps 2

With ``BENCH_APPS_TIMELINE=<dir>``, every process of a localrref world that
``tools/bench_apps.py`` starts records, during the measured run only, a
timestamp at each of these points, and writes them to ``<dir>/rank<k>.txt``:

* ``W>``/``W<``: a frame handed to the outbox (``destination:bytes:kind``),
  and back;
* ``R>``/``R<``: a thread asks its inbox for the next frame, and has it
  (``source:bytes:kind``); ``P>``/``P<`` around the wait (spin, then poll)
  inside. The kind is the protocol message's class (``PythonCall``,
  ``RRefAck``, ...), ``autograd`` or ``control``; a frame sent through
  shared memory is a ``blob`` where it is sent, and shows its kind where
  it is read. Kinds are worked out when the file is written, not while the
  run is timed;
* ``J>``/``J<``: a job (a user function, a fetch) run by the thread that read it;
* ``A>``/``A<``: a distributed autograd frame handled; ``RP>``/``RP<`` a
  gradient pass, ``EB>``/``EB<`` torch's engine inside it;
* ``T>``/``T<``: the program's own phases (bench_apps' ``timed`` blocks).

Each line is ``ns thread event detail@cpu`` (the directory is made if need
be); the clock is CLOCK_MONOTONIC (``time.perf_counter_ns``), which every
process on the machine shares, so the files merge into one timeline. The
CLI prints it from the N-th start of a phase on one rank, one column per
rank, with the gap since the previous line: a hop is a ``W>`` on one rank
and the ``P<`` that follows on another. A ``W>``..``W<`` of tens of
microseconds is the kernel waking a process on an idle CPU; one of
hundreds is the writer preempted, on its own CPU, by the process it woke.

``--wakes`` prints, instead, how long the writes of the run took to wake
their readers: for every frame written to a worker whose reader was waiting
for its inbox (``P>``), the time from the start of the write to the end of
that wait, by writer and reader, how many woke on the CPU the write began on,
and how many took longer than ``--stall-us`` (a reader put behind another
busy task on its CPU while another CPU idles)::

    python tools/timeline.py /tmp/tl --wakes
    python tools/timeline.py /tmp/tl --wakes --phase "ps: optimizer step"

With a ``--phase``, it also splits that phase's steps (from one start to the
next, on ``--rank``) by whether a stalled wake-up began in them, and says
what share of the steps' time the stalled ones took beyond the others'
median: an upper bound on what the stalls cost, since the same steps may be
long for other reasons (an RL episode's update, say).

The points are wrapped around localrref's internals at run time: no code in
localrref pays for them. A rename there makes :func:`install` fail loudly
(its test runs it).
"""

from __future__ import annotations

import argparse
import bisect
import ctypes
import functools
import glob
import io
import os
import pickletools
import sys
import threading
import time
from dataclasses import dataclass

__all__ = ["install", "start", "stop", "write", "event", "load", "render", "wakes",
           "summarize_wakes", "render_wakes", "stall_cost", "Wake", "WakeRow", "StallCost",
           "main"]

_events: list[tuple[int, int, str, str, int]] = []
_recording = False
_limit = 200_000
_now = time.perf_counter_ns
try:
    _getcpu = ctypes.CDLL(None).sched_getcpu
except (OSError, AttributeError):  # not glibc
    def _getcpu() -> int:
        return -1


def event(kind: str, detail: str = "") -> None:
    """Record one point (a no-op unless recording)."""
    if _recording and len(_events) < _limit:
        _events.append((_now(), threading.get_ident(), kind, detail, _getcpu()))


def _wrap(owner, name: str, before: str, after: str, detail=None, result=None) -> None:
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        event(before, detail(*args, **kwargs) if detail else "")
        value = original(*args, **kwargs)
        event(after, result(value) if result else "")
        return value

    setattr(owner, name, wrapper)


def install() -> None:
    """Wrap localrref's send, receive, job, autograd and pass paths in this process."""
    from localrref.agent import agent, autograd_pass, jobs, tape
    from localrref.transport import mpqueue, outbox

    # Frames are described when written out, not while the run is timed.
    _wrap(outbox.Outbox, "send", "W>", "W<",
          detail=lambda self, dst, record, token=None: _Frame(dst, record, sent=True))
    _wrap(mpqueue.Endpoint, "recv", "R>", "R<",
          result=lambda item: "none" if item is None else _Frame(*item, sent=False))
    _wrap(mpqueue.Endpoint, "_wait_readable", "P>", "P<")
    _wrap(jobs.Jobs, "run", "J>", "J<")
    _wrap(agent.Agent, "on_autograd", "A>", "A<",
          detail=lambda self, src, frame: f"{src}:{len(frame)}")
    _wrap(tape.Tape, "_run_pass", "RP>", "RP<")
    # autograd_pass calls engine_backward by its module-level name.
    _wrap(autograd_pass, "engine_backward", "EB>", "EB<")


def start() -> None:
    global _recording
    _events.clear()
    _recording = True


def stop() -> None:
    global _recording
    _recording = False


class _Frame:
    """A frame seen at a send or a receive: its peer, size and kind.

    It keeps a copy of the frame's first bytes only (all of an inline
    message), never a view of the transport's buffers. A blob's record at a
    send holds only its shared-memory handle: its kind shows at the receive."""

    __slots__ = ("peer", "size", "head", "blob")

    def __init__(self, peer: int, data, sent: bool) -> None:
        from localrref.transport import wire
        start = wire.LENGTH.size + wire.SRC.size if sent else 0
        self.peer, self.size = peer, len(data) - start
        self.blob = sent and wire.SRC.unpack_from(data, wire.LENGTH.size)[0] < 0
        self.head = b"" if self.blob else bytes(data[start:start + wire.PIPE_BUF])

    def __str__(self) -> str:
        if self.blob:
            return f"{self.peer}:{self.size}:blob"
        tag = self.head[:1]
        if tag == b"M":
            kind = _message_class(self.head)
        else:
            kind = {b"A": "autograd", b"C": "control"}.get(tag, "frame")
        return f"{self.peer}:{self.size}:{kind}"


def _message_class(head: bytes) -> str:
    """The class of the message whose frame starts with ``head``: its type code
    is the first number of the pickled tuple, so the start of a frame is enough."""
    from localrref.codec import frames
    try:
        for opcode, arg, _ in pickletools.genops(io.BytesIO(head[1:])):
            if isinstance(arg, int) and opcode.name.startswith("BININT"):
                return frames._MESSAGE_CLASSES[arg].__name__
    except Exception:  # noqa: BLE001 - a cut stream, a strange frame: only a description
        pass
    return "message"


def write(path: str) -> None:
    threads: dict[int, int] = {}
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        for ns, thread, kind, detail, cpu in _events:
            number = threads.setdefault(thread, len(threads))
            f.write(f"{ns} {number} {kind} {detail}@{cpu}\n")


# ----------------------------------------------------------------------- reading

def load(directory: str) -> list[tuple[int, int, int, str, str]]:
    """Every event of ``directory``'s ``rank<k>.txt`` files: (ns, rank, thread, kind, detail),
    in time order."""
    merged = []
    for path in sorted(glob.glob(os.path.join(directory, "rank*.txt"))):
        rank = int(os.path.basename(path)[4:-4])
        with open(path) as f:
            for line in f:
                ns, thread, kind, *rest = line.rstrip("\n").split(" ", 3)
                merged.append((int(ns), rank, int(thread), kind, rest[0] if rest else ""))
    merged.sort()
    return merged


def render(events, *, phase: str, rank: int, first: int, steps: int, width: int = 30) -> str:
    """The timeline from the ``first``-th start of ``phase`` on ``rank``, for ``steps`` steps."""
    label = phase.replace(" ", "_")
    starts = [i for i, e in enumerate(events)
              if e[1] == rank and e[3] == "T>" and e[4].split("@")[0] == label]
    if len(starts) <= first:
        raise SystemExit(f"phase {phase!r} starts {len(starts)} times on rank {rank}; "
                         f"pick --first below that (phases: {_phases(events)})")
    begin = starts[first]
    end = starts[first + steps] if first + steps < len(starts) else len(events)
    t0, previous, lines = events[begin][0], None, []
    for ns, r, thread, kind, detail in events[begin:end]:
        gap = "" if previous is None else f"+{(ns - previous) / 1e3:.1f}"
        previous = ns
        lines.append(f"{(ns - t0) / 1e3:9.1f} {gap:>9} {' ' * width * r}"
                     f"rank{r}/t{thread} {kind} {detail}")
    return "\n".join(lines)


@dataclass(frozen=True)
class Wake:
    """One frame written to a worker whose reader was waiting for its inbox."""

    src: int
    dst: int
    at_ns: int          # when the write began
    latency_us: float   # from the start of the write to the end of the reader's wait
    write_us: float     # the writer's own write call, which wakes the reader
    same_cpu: bool      # the reader's wait ended on the CPU the write began on


def wakes(events) -> list[Wake]:
    """Every write that found its reader waiting (in ``P>``), and when the wait ended.

    A write to a worker that was busy is left out: nobody had to be woken.
    """
    waits: dict[int, list[tuple[int, int, int]]] = {}  # rank: (start, end, cpu at end)
    open_waits: dict[tuple[int, int], int] = {}
    open_writes: dict[tuple[int, int], tuple[int, int, int]] = {}  # (rank, thread): W>
    writes = []
    for ns, rank, thread, kind, detail in events:
        if kind == "P>":
            open_waits[rank, thread] = ns
        elif kind == "P<" and (rank, thread) in open_waits:
            waits.setdefault(rank, []).append((open_waits.pop((rank, thread)), ns,
                                               _cpu(detail)))
        elif kind == "W>":
            open_writes[rank, thread] = (ns, int(detail.split(":", 1)[0]), _cpu(detail))
        elif kind == "W<" and (rank, thread) in open_writes:
            start, dst, cpu = open_writes.pop((rank, thread))
            writes.append((start, ns, rank, dst, cpu))
    # One thread at a time waits for a worker's inbox (the transport's recv
    # lock), so a rank's waits do not overlap.
    for rank_waits in waits.values():
        rank_waits.sort()
    starts = {rank: [w[0] for w in rank_waits] for rank, rank_waits in waits.items()}
    found = []
    for start, end, src, dst, cpu in writes:
        i = bisect.bisect_right(starts.get(dst, []), start) - 1
        if i < 0:
            continue
        wait_start, wait_end, wait_cpu = waits[dst][i]
        if not wait_start <= start < wait_end:
            continue  # the reader was not waiting: it finds the frame when it looks
        found.append(Wake(src=src, dst=dst, at_ns=start, latency_us=(wait_end - start) / 1e3,
                          write_us=(end - start) / 1e3, same_cpu=wait_cpu == cpu >= 0))
    return found


@dataclass(frozen=True)
class WakeRow:
    """The wake-ups from one writer rank to one reader rank (or all: ``src`` is None)."""

    src: int | None
    dst: int | None
    wakes: int
    median_us: float
    p90_us: float
    max_us: float
    same_cpu: int       # how many woke on the CPU the write began on
    stalls: int         # how many took longer than the stall threshold
    stalled_ms: float   # their latencies, summed
    write_median_us: float
    write_p90_us: float


def summarize_wakes(found: list[Wake], *, stall_us: float = 300.0) -> list[WakeRow]:
    """One row per (writer, reader) pair that had wake-ups, then one for all of them."""
    pairs: dict[tuple[int, int], list[Wake]] = {}
    for wake in found:
        pairs.setdefault((wake.src, wake.dst), []).append(wake)
    groups = [(src, dst, group) for (src, dst), group in sorted(pairs.items())]
    if found:
        groups.append((None, None, found))
    rows = []
    for src, dst, group in groups:
        latency = sorted(w.latency_us for w in group)
        write = sorted(w.write_us for w in group)
        stalls = [x for x in latency if x > stall_us]
        rows.append(WakeRow(src=src, dst=dst, wakes=len(group), median_us=_pct(latency, 50),
                            p90_us=_pct(latency, 90), max_us=latency[-1],
                            same_cpu=sum(w.same_cpu for w in group), stalls=len(stalls),
                            stalled_ms=sum(stalls) / 1e3, write_median_us=_pct(write, 50),
                            write_p90_us=_pct(write, 90)))
    return rows


def render_wakes(found: list[Wake], *, stall_us: float = 300.0) -> str:
    """A table of ``found`` by writer and reader: how long waking took, and where."""
    if not found:
        return "no write found its reader waiting"
    lines = [f"{'from':>4} {'to':>3} {'wakes':>6} {'median':>8} {'p90':>8} {'max':>8} "
             f"{'on the writer CPU':>17} {f'over {stall_us:.0f} us':>13} {'stalled':>8} "
             f"{'write median':>12} {'write p90':>9}"]
    for row in summarize_wakes(found, stall_us=stall_us):
        src, dst = ("all", "") if row.src is None else (row.src, row.dst)
        lines.append(
            f"{src:>4} {dst:>3} {row.wakes:>6} {row.median_us:>5.0f} us {row.p90_us:>5.0f} us "
            f"{row.max_us:>5.0f} us {row.same_cpu:>9} ({100 * row.same_cpu / row.wakes:3.0f} %) "
            f"{row.stalls:>6} ({100 * row.stalls / row.wakes:3.0f} %) "
            f"{row.stalled_ms:>5.1f} ms {row.write_median_us:>9.0f} us "
            f"{row.write_p90_us:>6.0f} us")
    return "\n".join(lines)


@dataclass(frozen=True)
class StallCost:
    """What stalled wake-ups cost the steps of a program phase (start to next start)."""

    steps: int
    stalled: int               # steps in which a wake-up began that stalled
    stalled_median_ms: float
    others_median_ms: float
    share: float               # of all steps' time, what the stalled ones took beyond
                               # the others' median


def stall_cost(events, found: list[Wake], *, phase: str, rank: int,
               stall_us: float = 300.0) -> StallCost | None:
    """Split the steps of ``phase`` on ``rank`` by whether a stalled wake-up began in
    them; None without two steps of each kind."""
    label = phase.replace(" ", "_")
    starts = [e[0] for e in events
              if e[1] == rank and e[3] == "T>" and e[4].split("@")[0] == label]
    stall_starts = sorted(w.at_ns for w in found if w.latency_us > stall_us)
    stalled, others = [], []
    for begin, end in zip(starts, starts[1:]):
        i = bisect.bisect_left(stall_starts, begin)
        hit = i < len(stall_starts) and stall_starts[i] < end
        (stalled if hit else others).append((end - begin) / 1e6)
    if len(stalled) < 2 or len(others) < 2:
        return None
    stalled.sort()
    others.sort()
    typical = _pct(others, 50)
    total = sum(stalled) + sum(others)
    return StallCost(steps=len(stalled) + len(others), stalled=len(stalled),
                     stalled_median_ms=_pct(stalled, 50), others_median_ms=typical,
                     share=(sum(stalled) - typical * len(stalled)) / total)


def _pct(ordered: list[float], p: int) -> float:
    return ordered[min(len(ordered) - 1, len(ordered) * p // 100)]


def _cpu(detail: str) -> int:
    try:
        return int(detail.rsplit("@", 1)[1])
    except (IndexError, ValueError):
        return -1


def _phases(events) -> list[str]:
    return sorted({e[4].split("@")[0].replace("_", " ") for e in events if e[3] == "T>"})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", help="the BENCH_APPS_TIMELINE directory of a run")
    parser.add_argument("--phase", help="a program phase to align on")
    parser.add_argument("--wakes", action="store_true",
                        help="instead: how long each write took to wake a waiting reader "
                             "(with --phase, also what the stalls cost its steps)")
    parser.add_argument("--stall-us", type=float, default=300.0,
                        help="with --wakes: a wake-up slower than this counts as a stall")
    parser.add_argument("--rank", type=int, default=0, help="the rank whose phase starts count")
    parser.add_argument("--first", type=int, default=10, help="which start to begin at")
    parser.add_argument("--steps", type=int, default=1, help="how many starts to show")
    args = parser.parse_args(argv)
    events = load(args.directory)
    if not events:
        raise SystemExit(f"no rank*.txt files with events in {args.directory}")
    if args.wakes:
        found = wakes(events)
        print(render_wakes(found, stall_us=args.stall_us))
        if args.phase is not None:
            cost = stall_cost(events, found, phase=args.phase, rank=args.rank,
                              stall_us=args.stall_us)
            print(f"steps of {args.phase!r} on rank {args.rank}: " + (
                "too few with and without a stall to compare" if cost is None else
                f"{cost.stalled} of {cost.steps} had a wake-up over {args.stall_us:.0f} us, "
                f"{cost.stalled_median_ms:.2f} ms at the median against "
                f"{cost.others_median_ms:.2f} ms for the others; beyond the others' median "
                f"they took {100 * cost.share:.0f} % of the steps' time (what the stalls "
                f"cost, at most: those steps may be long for other reasons too)"))
        return 0
    if args.phase is None:
        parser.error(f"name a --phase to align on (phases: {_phases(events)}), or ask for --wakes")
    print(render(events, phase=args.phase, rank=args.rank, first=args.first, steps=args.steps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
