"""What the supervisor does with the control tuples workers send it.

Workers send ``(tag, rank, *payload)`` tuples (vocabulary in
``localrref.world``). :class:`ControlDispatcher` maps each tag to a handler
and the runtime may add its own with :meth:`register`. Built in:

* the graceful-shutdown barrier (the process side of ``localrref.shutdown``)::

      phase "arrive": collect __shutdown_arrived__ from every rank -> broadcast __shutdown_proceed__
      phase "drain":  collect __shutdown_drained__ (messages sent, received) -> broadcast
                      __shutdown_again__ for another round, until a round's sends equal
                      the previous round's receipts: then __shutdown_proceed__
      phase "done":   collect __shutdown_done__ (with leaks)      -> broadcast __shutdown_proceed__
      phase "finished": collect __shutdown_finished__ (RRefs deleted) -> broadcast __shutdown_proceed__
      a rank exits while a phase waits for it                    -> broadcast __shutdown_failed__

  The drain is what torch's ``TensorPipeAgent::join`` does: graceful
  shutdown returns only once no worker has work in flight, so calls nobody
  waits for (a chain of ``rpc_async`` hops, say) still finish. Each worker
  reports when it has no call or job of its own in flight, with how many
  calls and replies it has sent and received since ``init_rpc``. Reports of
  one round are read at different moments, so "everyone idle" alone proves
  nothing: a chain of calls can slip past each worker between its reports.
  Mattern's four-counter rule does: if the receipts summed over one round
  equal the sends summed over the next, no message was in flight at the end
  of the first round, and an idle worker only works again when a message
  reaches it. (torch's join reads call counts after a barrier, and relies on
  the reads being close together.)

* leak reports (``__shutdown_done__`` and ``__leak_report__``), kept for the
  supervisor to print (:func:`format_leak_line`) when the world is over.

Handlers run on the supervisor's watcher thread, one message at a time; the
``send`` they are given never blocks for long (``inbox.bounded_send``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from localrref import world

__all__ = ["ControlDispatcher", "Handler", "format_leak_line"]

_BARRIER_PHASES = ("arrive", "drain", "done", "finished")

Handler = Callable[[int, tuple[Any, ...]], None]
Send = Callable[[int, tuple[Any, ...]], None]


class ControlDispatcher:
    """Routes supervisor-inbox messages by tag; drives the shutdown barrier.

    Args:
        world_size: Number of worker ranks.
        send: ``send(rank, control_tuple)`` to one worker.

    Attributes:
        shutdown_arrived: Ranks that sent ``__shutdown_arrived__``, in arrival order.
        leaks: Every leaked-RRef dict received, each with ``reporting_rank`` added.
    """

    def __init__(self, world_size: int, send: Send, *, phase_timeout: float = 0.0,
                 arrive_timeout: float = 0.0,
                 clock: Callable[[], float] | None = None) -> None:
        import time
        self.world_size = world_size
        # Bound the "done" phase (protocol work only) and the "arrive" phase
        # (which also waits for application code); 0 means unbounded.
        self.phase_timeout = phase_timeout
        self.arrive_timeout = arrive_timeout
        self._clock = clock or time.monotonic
        self.deadline: float | None = None
        self.shutdown_arrived: list[int] = []
        self.leaks: list[dict[str, Any]] = []
        self._values: dict[str, tuple[dict[str, Any], str | None]] = {}
        self._send = send
        self._exited: dict[int, int] = {}  # rank -> exit code
        # None -> "arrive" -> "drain" (rounds) -> "done" -> "finished" -> "complete" | "failed"
        self._phase: str | None = None
        self._waiting_for: set[int] = set()
        self._round: list[int] = [0, 0]  # the drain round's sums: sent, received
        self._received_before: int | None = None  # the previous round's receipts
        self.drain_rounds = 0
        self._handlers: dict[str, Handler] = {
            world.SHUTDOWN_ARRIVED: self._on_shutdown_arrived,
            world.SHUTDOWN_DRAINED: self._on_shutdown_drained,
            world.SHUTDOWN_DONE: self._on_shutdown_done,
            world.SHUTDOWN_FINISHED: self._on_shutdown_finished,
            world.LEAK_REPORT: self._on_leak_report,
        }

    def register(self, tag: str, handler: Handler) -> None:
        """Handle messages whose first element is ``tag`` as ``handler(src, message)``."""
        self._handlers[tag] = handler

    def dispatch(self, src: int, message: object) -> None:
        """Run the handler for ``message``; malformed or unknown messages are reported, not raised."""
        if not (isinstance(message, tuple) and message and isinstance(message[0], str)):
            _say(f"ignored a control message from rank {src} that is not a (tag, ...) tuple: "
                 f"{message!r:.200}")
            return
        handler = self._handlers.get(message[0])
        if handler is None:
            _say(f"ignored a control message with unknown tag {message[0]!r} from rank {src}; "
                 f"known tags: {sorted(self._handlers)}")
            return
        try:
            handler(src, message)
        except Exception as exc:  # one bad message must not stop the watcher
            _say(f"handler for {message[0]!r} failed: {type(exc).__name__}: {exc}")

    def on_worker_exit(self, rank: int, exitcode: int) -> None:
        """A worker exited: a barrier phase still waiting for it can never complete."""
        self._exited[rank] = exitcode
        self._fail_if_waiting_for_the_dead()

    # --------------------------------------------------------------- shutdown barrier

    def _on_shutdown_arrived(self, src: int, message: tuple[Any, ...]) -> None:
        _, rank = message
        self.shutdown_arrived.append(rank)
        if self._phase in (None, "complete"):  # "complete": a later init_rpc/shutdown cycle
            self.drain_rounds = 0
            self._received_before = None
            self._start_phase("arrive")
        self._reached(rank, "arrive", next_phase="drain")

    def _on_shutdown_drained(self, src: int, message: tuple[Any, ...]) -> None:
        _, rank, sent, received = message
        if self._phase != "drain":
            self._reached(rank, "drain", next_phase="done")  # says it is ignored
            return
        if rank not in self._waiting_for:
            _say(f"rank {rank} reported twice in one drain round; ignored")
            return
        self._round[0] += sent
        self._round[1] += received
        if self._waiting_for != {rank}:
            self._waiting_for.discard(rank)
            return
        if self._received_before != self._round[0]:
            # Not proven drained yet: remember this round's receipts, ask again.
            self._received_before = self._round[1]
            self._broadcast((world.SHUTDOWN_AGAIN,))
            self._start_phase("drain")
            return
        self._reached(rank, "drain", next_phase="done")

    def _on_shutdown_done(self, src: int, message: tuple[Any, ...]) -> None:
        _, rank, leaks = message
        self._record_leaks(rank, leaks)
        self._reached(rank, "done", next_phase="finished")

    def _on_shutdown_finished(self, src: int, message: tuple[Any, ...]) -> None:
        _, rank = message
        self._reached(rank, "finished", next_phase="complete")

    def _reached(self, rank: int, phase: str, *, next_phase: str) -> None:
        if self._phase != phase:
            if self._phase != "failed":
                _say(f"rank {rank} sent its {phase!r} shutdown message during the "
                     f"{self._phase!r} phase; ignored")
            return
        self._waiting_for.discard(rank)
        if not self._waiting_for:
            self._broadcast((world.SHUTDOWN_PROCEED,))
            self._start_phase(next_phase)
            if next_phase == "complete":
                self.deadline = None

    def _start_phase(self, phase: str) -> None:
        self._phase, self._waiting_for = phase, set(range(self.world_size))
        if phase == "drain":
            self._round = [0, 0]
            self.drain_rounds += 1
            if self.drain_rounds > 1:
                # A new round keeps the first round's deadline: the drain as a
                # whole is bounded, like the arrive phase.
                self._fail_if_waiting_for_the_dead()
                return
        limit = self._limit(phase)
        waiting = phase in _BARRIER_PHASES and limit > 0
        self.deadline = self._clock() + limit if waiting else None
        self._fail_if_waiting_for_the_dead()

    def _limit(self, phase: str) -> float:
        # Arriving and draining wait for application code; the rest is protocol work.
        return self.arrive_timeout if phase in ("arrive", "drain") else self.phase_timeout

    def check_deadline(self, now: float) -> None:
        """Fail a barrier phase that waited past its deadline, naming who never came."""
        if self.deadline is None or now < self.deadline or self._phase not in _BARRIER_PHASES:
            return
        missing = sorted(self._waiting_for)
        step = {"arrive": "reach shutdown()", "drain": "finish the calls it had in flight",
                "done": "report its RRefs", "finished": "finish deleting its RRefs"}[self._phase]
        limit = self._limit(self._phase)
        reason = (f"worker rank(s) {missing} did not {step} within {limit:g} s "
                  f"(--shutdown-timeout); the others gave up waiting")
        _say(reason)
        self._phase = "failed"
        self.deadline = None
        self._broadcast((world.SHUTDOWN_FAILED, reason))

    def _fail_if_waiting_for_the_dead(self) -> None:
        if self._phase not in _BARRIER_PHASES:
            return
        dead = sorted(self._waiting_for & self._exited.keys())
        if dead:
            rank = dead[0]
            reason = (f"worker rank {rank} {world.describe_exitcode(self._exited[rank])} before it "
                      f"reached the shutdown barrier ({self._phase} phase)")
            self._phase = "failed"
            self.deadline = None
            self._broadcast((world.SHUTDOWN_FAILED, reason))

    def _broadcast(self, control: tuple[Any, ...]) -> None:
        for rank in range(self.world_size):
            if rank not in self._exited:
                self._send(rank, control)

    # -------------------------------------------------------------------- leak reports

    def _on_leak_report(self, src: int, message: tuple[Any, ...]) -> None:
        _, rank, leaks = message
        self._record_leaks(rank, leaks)

    def _record_leaks(self, rank: int, leaks: list[dict[str, Any]]) -> None:
        # "owner_value" records are not leaks: they carry the type and tensor
        # bytes of values an owner holds, for the lines of that RRef's users
        # (which know neither), whichever report arrives first.
        for leak in leaks:
            if leak.get("state") == "owner_value":
                value = {k: leak.get(k) for k in ("value_type", "tensor_bytes")}
                self._values[leak["rref_id"]] = (value, leak.get("creation_site"))
                for earlier in self.leaks:
                    if earlier["rref_id"] == leak["rref_id"]:
                        self._fill(earlier)
                continue
            record = {**leak, "reporting_rank": rank}
            self._fill(record)
            self.leaks.append(record)

    def _fill(self, record: dict[str, Any]) -> None:
        known = self._values.get(record["rref_id"])
        if known is None:
            return
        value, site = known
        for key, item in value.items():
            if record.get(key) is None:
                record[key] = item
        if record.get("creation_site") is None and site is not None:
            record["creation_site"] = site


LEAK_REPORT_ENV = "LOCALRREF_LEAK_REPORT"


def write_leak_report(leaks: list[dict[str, Any]]) -> str | None:
    """Write ``leaks`` as JSON to ``$LOCALRREF_LEAK_REPORT`` if it is set (``[]`` if clean).

    The leak auditor (``tools/leak_audit.py``) sets the variable and reads the
    file after the run. A file lock serialises runs that share the path
    (several launches under one auditor, or restarts), and the write is
    atomic (a temporary file renamed into place).
    """
    import json
    import os

    from filelock import FileLock

    path = os.environ.get(LEAK_REPORT_ENV)
    if not path:
        return None
    fields = [*world.LEAK_FIELDS, "reporting_rank"]
    records = [{key: leak.get(key) for key in fields} for leak in leaks]
    with FileLock(path + ".lock"):
        previous = []
        if os.path.exists(path):
            try:
                with open(path) as f:
                    previous = json.load(f)
            except (OSError, ValueError):
                previous = []
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(previous + records, f, indent=1)
        os.replace(tmp, path)
    return path


def format_leak_line(leak: dict[str, Any]) -> str:
    """One line per leaked RRef, fields in :data:`localrref.world.LEAK_FIELDS` order."""
    fields = " ".join(f"{name}={leak.get(name, '?')}" for name in world.LEAK_FIELDS)
    return f"localrref: leaked RRef {fields}"


def _say(message: str) -> None:
    print(f"localrref.launch: {message}", file=sys.stderr)
