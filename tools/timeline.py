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
and the ``P<`` that follows on another, and a long ``W>``..``W<`` is the
kernel waking a process on another CPU.

The points are wrapped around localrref's internals at run time: no code in
localrref pays for them. A rename there makes :func:`install` fail loudly
(its test runs it).
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import glob
import io
import os
import pickletools
import sys
import threading
import time

__all__ = ["install", "start", "stop", "write", "event", "load", "render", "main"]

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


def _phases(events) -> list[str]:
    return sorted({e[4].split("@")[0].replace("_", " ") for e in events if e[3] == "T>"})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", help="the BENCH_APPS_TIMELINE directory of a run")
    parser.add_argument("--phase", required=True, help="a program phase to align on")
    parser.add_argument("--rank", type=int, default=0, help="the rank whose phase starts count")
    parser.add_argument("--first", type=int, default=10, help="which start to begin at")
    parser.add_argument("--steps", type=int, default=1, help="how many starts to show")
    args = parser.parse_args(argv)
    events = load(args.directory)
    if not events:
        raise SystemExit(f"no rank*.txt files with events in {args.directory}")
    print(render(events, phase=args.phase, rank=args.rank, first=args.first, steps=args.steps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
