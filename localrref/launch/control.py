"""What the supervisor does with the control messages workers send it.

Workers send the records of ``localrref.control_messages``.
:class:`ControlDispatcher` matches each by its type, and the runtime may add
handlers for other types with :meth:`register`. Built in:

* the graceful-shutdown barrier (the process side of ``localrref.shutdown``)::

      Phase.ARRIVE:   collect ShutdownArrived from every rank -> broadcast ShutdownProceed
      Phase.DRAIN:    collect ShutdownDrained (messages sent, received) -> broadcast
                      ShutdownAgain for another round, until a round's sends equal the
                      previous round's receipts: then ShutdownProceed
      Phase.DONE:     collect ShutdownDone (with leaks)        -> broadcast ShutdownProceed
      Phase.FINISHED: collect ShutdownFinished (RRefs deleted) -> broadcast ShutdownProceed
      a rank exits while a phase waits for it, or the phase times out -> ShutdownFailed

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

* leak reports (``ShutdownDone`` and ``LeakReport``), kept for the
  supervisor to print (:func:`format_leak_line`) when the world is over.

Handlers run on the supervisor's watcher thread, one message at a time; the
``send`` they are given never blocks for long (``inbox.bounded_send``).
"""

from __future__ import annotations

import enum
import sys
from collections.abc import Callable
from typing import Any

from localrref import world
from localrref.control_messages import (
    Control, LeakReport, ShutdownAgain, ShutdownArrived, ShutdownDone, ShutdownDrained,
    ShutdownFailed, ShutdownFinished, ShutdownProceed, describe_exitcode,
)

__all__ = ["ControlDispatcher", "Handler", "Phase", "format_leak_line"]


class Phase(enum.Enum):
    """Where the graceful-shutdown barrier stands."""

    IDLE = "idle"           # no shutdown under way (or the last one completed)
    ARRIVE = "arrive"       # waiting for every worker to call shutdown()
    DRAIN = "drain"         # rounds until no worker has work in flight
    DONE = "done"           # waiting for every leak report
    FINISHED = "finished"   # waiting for every worker to finish deleting RRefs
    FAILED = "failed"       # a worker died or a phase timed out


_BARRIER_PHASES = (Phase.ARRIVE, Phase.DRAIN, Phase.DONE, Phase.FINISHED)
# What a worker that never reported in each phase did not do, for the error.
_STEPS = {Phase.ARRIVE: "reach shutdown()", Phase.DRAIN: "finish the calls it had in flight",
          Phase.DONE: "report its RRefs", Phase.FINISHED: "finish deleting its RRefs"}

Handler = Callable[[int, Any], None]
Send = Callable[[int, Control], None]


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
        # IDLE -> ARRIVE -> DRAIN (rounds) -> DONE -> FINISHED -> IDLE, or -> FAILED
        self._phase = Phase.IDLE
        self._waiting_for: set[int] = set()
        self._round: list[int] = [0, 0]  # the drain round's sums: sent, received
        self._received_before: int | None = None  # the previous round's receipts
        self.drain_rounds = 0
        self._completed = False  # the last barrier ran to its end
        self._handlers: dict[type, Handler] = {
            ShutdownArrived: self._on_shutdown_arrived,
            ShutdownDrained: self._on_shutdown_drained,
            ShutdownDone: self._on_shutdown_done,
            ShutdownFinished: self._on_shutdown_finished,
            LeakReport: self._on_leak_report,
        }

    @property
    def phase(self) -> Phase:
        return self._phase

    def register(self, kind: type, handler: Handler) -> None:
        """Handle messages of type ``kind`` as ``handler(src, message)``."""
        self._handlers[kind] = handler

    def dispatch(self, src: int, message: object) -> None:
        """Run the handler for ``message``; unknown messages are reported, not raised."""
        handler = self._handlers.get(type(message))
        if handler is None:
            _say(f"ignored a control message of unknown type {type(message).__name__} from "
                 f"rank {src}: {message!r:.200}")
            return
        try:
            handler(src, message)
        except Exception as exc:  # one bad message must not stop the watcher
            _say(f"handler for {type(message).__name__} failed: {type(exc).__name__}: {exc}")

    def exit_is_a_death(self, exitcode: int) -> bool:
        """Whether the peers must hear of a worker's exit (``PeerExited``).

        Every exit but a clean one after a completed graceful shutdown: a
        worker may also exit with 0 having shut down alone (its shutdown
        failed because a peer died, or it was not graceful) while its peers
        still run, and their calls to it must then fail, not hang.
        """
        return exitcode != 0 or not (self._completed and self._phase is Phase.IDLE)

    def on_worker_exit(self, rank: int, exitcode: int) -> None:
        """A worker exited: a barrier phase still waiting for it can never complete."""
        self._exited[rank] = exitcode
        self._fail_if_waiting_for_the_dead()

    # --------------------------------------------------------------- shutdown barrier

    def _on_shutdown_arrived(self, src: int, message: ShutdownArrived) -> None:
        rank = message.rank
        self.shutdown_arrived.append(rank)
        if self._phase is Phase.IDLE:  # also a later init_rpc/shutdown cycle
            self._completed = False
            self.drain_rounds = 0
            self._received_before = None
            self._start_phase(Phase.ARRIVE)
        self._reached(rank, Phase.ARRIVE, next_phase=Phase.DRAIN)

    def _on_shutdown_drained(self, src: int, message: ShutdownDrained) -> None:
        rank = message.rank
        if self._phase is not Phase.DRAIN:
            self._reached(rank, Phase.DRAIN, next_phase=Phase.DONE)  # says it is ignored
            return
        if rank not in self._waiting_for:
            _say(f"rank {rank} reported twice in one drain round; ignored")
            return
        self._round[0] += message.sent
        self._round[1] += message.received
        if self._waiting_for != {rank}:
            self._waiting_for.discard(rank)
            return
        if self._received_before != self._round[0]:
            # Not proven drained yet: remember this round's receipts, ask again.
            self._received_before = self._round[1]
            self._broadcast(ShutdownAgain())
            self._start_phase(Phase.DRAIN)
            return
        self._reached(rank, Phase.DRAIN, next_phase=Phase.DONE)

    def _on_shutdown_done(self, src: int, message: ShutdownDone) -> None:
        self._record_leaks(message.rank, message.leaks)
        self._reached(message.rank, Phase.DONE, next_phase=Phase.FINISHED)

    def _on_shutdown_finished(self, src: int, message: ShutdownFinished) -> None:
        self._reached(message.rank, Phase.FINISHED, next_phase=Phase.IDLE)

    def _reached(self, rank: int, phase: Phase, *, next_phase: Phase) -> None:
        if self._phase is not phase:
            if self._phase is not Phase.FAILED:
                _say(f"rank {rank} sent its {phase.value!r} shutdown message during the "
                     f"{self._phase.value!r} phase; ignored")
            return
        self._waiting_for.discard(rank)
        if not self._waiting_for:
            self._broadcast(ShutdownProceed())
            self._completed = next_phase is Phase.IDLE
            self._start_phase(next_phase)

    def _start_phase(self, phase: Phase) -> None:
        self._phase, self._waiting_for = phase, set(range(self.world_size))
        if phase is Phase.DRAIN:
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

    def _limit(self, phase: Phase) -> float:
        # Arriving and draining wait for application code; the rest is protocol work.
        return self.arrive_timeout if phase in (Phase.ARRIVE, Phase.DRAIN) else self.phase_timeout

    def check_deadline(self, now: float) -> None:
        """Fail a barrier phase that waited past its deadline, naming who never came."""
        if self.deadline is None or now < self.deadline or self._phase not in _BARRIER_PHASES:
            return
        missing = sorted(self._waiting_for)
        reason = (f"worker rank(s) {missing} did not {_STEPS[self._phase]} within "
                  f"{self._limit(self._phase):g} s (--shutdown-timeout); the others gave up "
                  f"waiting")
        _say(reason)
        self._fail(reason)

    def _fail(self, reason: str) -> None:
        self._phase = Phase.FAILED
        self.deadline = None
        self._broadcast(ShutdownFailed(reason=reason))

    def _fail_if_waiting_for_the_dead(self) -> None:
        if self._phase not in _BARRIER_PHASES:
            return
        dead = sorted(self._waiting_for & self._exited.keys())
        if dead:
            rank = dead[0]
            self._fail(f"worker rank {rank} {describe_exitcode(self._exited[rank])} before it "
                       f"reached the shutdown barrier ({self._phase.value} phase)")

    def _broadcast(self, control: Control) -> None:
        for rank in range(self.world_size):
            if rank not in self._exited:
                self._send(rank, control)

    # -------------------------------------------------------------------- leak reports

    def _on_leak_report(self, src: int, message: LeakReport) -> None:
        self._record_leaks(message.rank, message.leaks)

    def _record_leaks(self, rank: int, leaks) -> None:
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
    """One line per leaked RRef, fields in :data:`localrref.world.LEAK_FIELDS` order
    (or per distributed autograd context left open, :data:`CONTEXT_LEAK_FIELDS`)."""
    if leak.get("state") == "autograd_context":
        fields = " ".join(f"{name}={leak.get(name, '?')}" for name in CONTEXT_LEAK_FIELDS)
        return f"localrref: leaked distributed autograd context {fields}"
    fields = " ".join(f"{name}={leak.get(name, '?')}" for name in world.LEAK_FIELDS)
    return f"localrref: leaked RRef {fields}"


# A context whose ``with`` block never ended on its creator (holder_rank).
CONTEXT_LEAK_FIELDS = ("context_id", "holder_rank", "known_workers", "send_functions",
                       "recv_tensors")


def describe_leaks(leaks: list[dict[str, Any]]) -> str:
    """``"2 leaked RRef(s)"``, ``"1 leaked RRef(s) and 1 autograd context(s)"``, ..."""
    contexts = sum(1 for leak in leaks if leak.get("state") == "autograd_context")
    text = f"{len(leaks) - contexts} leaked RRef(s)"
    if contexts:
        text += f" and {contexts} distributed autograd context(s) left open"
    return text


def _say(message: str) -> None:
    print(f"localrref.launch: {message}", file=sys.stderr)
