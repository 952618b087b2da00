"""The worker's half of graceful shutdown, and the leak records it reports.

The supervisor drives the barrier (``launch/control.py``); each worker runs
this machine, one phase after another::

    ARRIVING        sent ShutdownArrived; waits for every worker to arrive
    DRAINING        waits until it has no call or job of its own in flight,
                    then reports its message counts (ShutdownDrained)
    DRAIN_REPORTED  waits: ShutdownAgain -> DRAINING again, until the
                    supervisor has proof that nothing is in flight anywhere
                    (torch's join); ShutdownProceed -> reports what it holds
    REPORTING       sent ShutdownDone(leaks), taken before anyone deletes
                    anything; waits for every report
    DELETING        runs the seed's delAllUsersAndUnforkedOwners
                    (core/shutdown.py) until its deletes are acknowledged,
                    then sends ShutdownFinished
    FINISHING       the last barrier: nobody stops serving while a peer
                    still deletes
    DONE / FAILED   a ShutdownFailed, a dead peer or the backstop -> FAILED

:meth:`GracefulShutdown.advance` takes every step it can without waiting.
:meth:`GracefulShutdown.run` (the application thread in ``shutdown()``)
calls it again whenever it may go further: in the phases that wait for the
supervisor, when a control message arrives (or a peer dies); in DRAINING
and DELETING, after the agent's progress signals. Waking at every message
handled in the phases that wait for the supervisor would cost a thread
wake-up per message for as long as a worker that called shutdown() early
waits for the others, stealing the CPU from the thread serving them. A
test world without threads advances every worker's machine itself.

Meanwhile the inbox is served as always: by IO threads, never by the thread
in ``shutdown()``. Messages from the supervisor land in :attr:`inbox`
(appended by the reader, under :attr:`_lock`).
"""

from __future__ import annotations

import collections
import enum
import gc
import threading

import torch

from ..control_messages import (
    ShutdownAgain, ShutdownArrived, ShutdownDone, ShutdownDrained, ShutdownFailed,
    ShutdownFinished, ShutdownProceed,
)
from ..core.shutdown import DelAllUsersAndUnforkedOwners

__all__ = ["GracefulShutdown", "Phase"]


class Phase(enum.Enum):
    IDLE = "idle"
    ARRIVING = "arriving"
    DRAINING = "draining"
    DRAIN_REPORTED = "drain reported"
    REPORTING = "reporting"
    DELETING = "deleting"
    FINISHING = "finishing"
    DONE = "done"
    FAILED = "failed"


# What a worker waits for in each phase, for error messages.
_WAITING_FOR = {
    Phase.ARRIVING: "every worker to reach shutdown()",
    Phase.DRAINING: "this worker's calls in flight to finish",
    Phase.DRAIN_REPORTED: "every worker to finish the calls it had in flight",
    Phase.REPORTING: "every worker to report its RRefs",
    Phase.DELETING: "this worker's RRef deletes to be acknowledged",
    Phase.FINISHING: "every worker to finish deleting RRefs",
}


class GracefulShutdown:
    """See the module docstring."""

    def __init__(self, agent) -> None:
        self.agent = agent
        self.inbox: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self.machine: DelAllUsersAndUnforkedOwners | None = None
        self.phase = Phase.IDLE
        self.error: BaseException | None = None
        self.leaks: list[dict] = []
        self._timeout = 0.0
        self._deadline: float | None = None

    def deliver(self, message) -> None:
        """A control message from the supervisor (called by the reader)."""
        with self._lock:
            self.inbox.append(message)
            self._arrived.notify_all()
        self.agent.signal_progress()

    def wake(self) -> None:
        """Look again (a peer died, or the agent is closing)."""
        with self._lock:
            self._arrived.notify_all()

    def poll_locked(self, now: float) -> list:
        """The machine's effects due at ``now`` (agent lock held; see Housekeeper.pass_)."""
        return self.machine.poll(now) if self.machine is not None else []

    def run(self, timeout: float) -> list[dict]:
        """The whole shutdown, in this thread; returns the leak records.

        Raises:
            RuntimeError: a peer died (``WorkerGoneError``), the supervisor
                failed the barrier (naming who and why), or the backstop passed.
        """
        agent = self.agent
        self.begin(timeout)
        while not self.advance():
            if agent.driver is not None or self.phase in (Phase.DRAINING, Phase.DELETING):
                # The machine has deadlines of its own: look at least every 50 ms.
                agent.block_until(self.advance, None, _WAITING_FOR[self.phase], poll=0.05)
            else:
                self._wait_for_a_message()
        if self.phase is Phase.FAILED:
            raise self.error
        return self.leaks

    def _wait_for_a_message(self) -> None:
        agent = self.agent
        with self._arrived:
            if self.inbox or agent.dead or agent.closing:
                return
            left = None if self._deadline is None else self._deadline - agent.clock()
            if left is None or left > 0:
                self._arrived.wait(left)

    def begin(self, timeout: float) -> None:
        """Arrive at the barrier (``timeout`` bounds the deletes, and backs the supervisor up)."""
        agent = self.agent
        agent.reader.release_inbox()
        self._timeout = max(timeout, 1.0)
        # Young cyclic garbage (RRefs in fresh reference cycles) is freed
        # first; a full collection would cost ~40 ms with torch loaded, more
        # than the whole shutdown should, so older cycles are the
        # application's to break (torch's leak warning says the same).
        gc.collect(1)
        agent.housekeeper.pass_()
        self.phase = Phase.ARRIVING
        self._deadline = None
        # Unbounded here: other workers may legitimately still be working
        # (torch's shutdown waits for them too). A peer that dies, or the
        # supervisor's --shutdown-timeout, ends the wait with a named error.
        agent.send_control(agent.world_size, ShutdownArrived(rank=agent.rank))

    def advance(self) -> bool:
        """Take every step that needs no waiting; True once DONE or FAILED."""
        while self.phase not in (Phase.DONE, Phase.FAILED, Phase.IDLE):
            if not self._step():
                break
        return self.phase in (Phase.DONE, Phase.FAILED)

    def _step(self) -> bool:
        """One step of the current phase; False if it must wait."""
        agent = self.agent
        failure = self._take(ShutdownFailed)
        if failure is not None:
            return self._fail(RuntimeError(f"graceful shutdown failed: {failure.reason}"))
        if self.phase is Phase.FINISHING and self._take(ShutdownProceed) is not None:
            # The world finished shutting down; a death heard of since (a
            # worker killed right after its last shutdown message) came after
            # it: the supervisor sends its notices in order.
            self.phase = Phase.DONE
            return True
        if agent.dead:
            return self._fail(next(iter(agent.dead.values())))
        if self._deadline is not None and agent.clock() > self._deadline:
            return self._fail(RuntimeError(
                f"graceful shutdown timed out after {self._timeout * 2 + 10:.0f} s waiting for "
                f"{_WAITING_FOR[self.phase]}"))
        phase = self.phase
        if phase is Phase.ARRIVING:
            if self._take(ShutdownProceed) is None:
                return False
            self.phase = Phase.DRAINING
        elif phase is Phase.DRAINING:
            if agent.active_work():
                return False
            sent, received = agent.message_counts()
            agent.send_control(agent.world_size, ShutdownDrained(
                rank=agent.rank, sent=sent, received=received))
            self.phase = Phase.DRAIN_REPORTED
        elif phase is Phase.DRAIN_REPORTED:
            if self._take(ShutdownAgain) is not None:
                self.phase = Phase.DRAINING
                return True
            if self._take(ShutdownProceed) is None:
                return False
            agent.housekeeper.pass_()
            # Every application has stopped making RPCs: what is still held,
            # and what every owner keeps, is the leak report. It is taken
            # before any worker deletes anything (the next barrier), or an
            # early delete could free an owner before its value was described.
            self.leaks = self.leak_records()
            agent.send_control(agent.world_size, ShutdownDone(rank=agent.rank, leaks=self.leaks))
            self._backstop()
            self.phase = Phase.REPORTING
        elif phase is Phase.REPORTING:
            if self._take(ShutdownProceed) is None:
                return False
            self._start_deleting()
            self.phase = Phase.DELETING
        elif phase is Phase.DELETING:
            if not self._deletes_settled():
                return False
            with agent.lock:
                # torch's checkRRefLeaks, as a warning in the seed's wording.
                agent.core.check_rref_leaks(ignore_rref_leak=True)
                effects = agent.core.take_effects()
            agent.run(effects)
            agent.send_control(agent.world_size, ShutdownFinished(rank=agent.rank))
            self._backstop()
            self.phase = Phase.FINISHING
        elif phase is Phase.FINISHING:
            if self._take(ShutdownProceed) is None:
                return False
            self.phase = Phase.DONE
        return True

    def _take(self, kind: type):
        """The first message of type ``kind`` in the inbox, removed; None if there is none."""
        with self._lock:
            for i, message in enumerate(self.inbox):
                if isinstance(message, kind):
                    del self.inbox[i]
                    return message
        return None

    def _fail(self, error: BaseException) -> bool:
        self.error = error
        self.phase = Phase.FAILED
        return True

    def _backstop(self) -> None:
        # The supervisor bounds each phase and names who is missing; this
        # worker's own bound is only a backstop should the supervisor vanish.
        self._deadline = self.agent.clock() + 2 * self._timeout + 10

    def _start_deleting(self) -> None:
        agent = self.agent
        tape = agent.current_tape()
        if tape is not None:
            # Reported already; their tensors and graphs go now, on every worker.
            tape.forget_all()
        now = agent.clock()
        machine = DelAllUsersAndUnforkedOwners(agent.core, now=now, timeout=self._timeout)
        with agent.lock:
            self.machine = machine
            effects = machine.poll(now)
        agent.run(effects)
        self._delete_deadline = now + 2 * self._timeout

    def _deletes_settled(self) -> bool:
        agent = self.agent
        with agent.lock:
            effects = self.machine.poll(agent.clock())
            done = self.machine.done and agent.core.num_pending_futures == 0
        agent.run(effects)
        return done or agent.clock() > self._delete_deadline

    # -- the leak report ------------------------------------------------------------------

    def leak_records(self) -> list[dict]:
        """What this worker still holds as shutdown begins, one dict per reference.

        The states are the protocol's: a ``confirmed_user`` the application
        still holds, a ``pending_user`` not yet confirmed, a ``pending_child``
        (a fork this worker sent, not yet accepted) and an ``unforked_owner``.
        An ``owner_value`` record tells the supervisor the type and tensor
        bytes of each value this worker owns, to fill in its users' lines.
        """
        agent = self.agent
        sites = agent.calls.sites
        with agent.lock:
            core = agent.core
            records = []

            def add(record, fork_id, state, holder=agent.rank):
                records.append({
                    "rref_id": str(record.rref_id), "fork_id": str(fork_id),
                    "owner_rank": record.owner, "holder_rank": holder, "state": state,
                    "value_type": None, "tensor_bytes": None,
                    "creation_site": sites.get(id(record))})

            for fork_id, record in core.confirmed_users.items():
                if record.holds > 0:
                    add(record, fork_id, "confirmed_user")
            for fork_id, state in core.pending_users.items():
                add(state.rref, fork_id, "pending_user")
            for fork_id, record in core.pending_children.items():
                add(record, fork_id, "pending_child")
            for rref_id, owner in core.owners.items():
                value_type, tensor_bytes = _describe_value(owner)
                if rref_id not in core.forks:
                    add(owner, rref_id, "unforked_owner")
                    records[-1].update(value_type=value_type, tensor_bytes=tensor_bytes)
                records.append({"rref_id": str(rref_id), "state": "owner_value",
                                "value_type": value_type, "tensor_bytes": tensor_bytes,
                                "creation_site": sites.get(id(owner))})
        tape = agent.current_tape()
        if tape is not None:
            records.extend(tape.leak_records())
        return records


def _describe_value(owner) -> tuple[str | None, int]:
    if owner is None or not owner.has_value or owner.error is not None:
        return None, 0
    value = owner.value
    total = 0
    stack = [value]
    seen = 0
    while stack and seen < 10_000:
        item = stack.pop()
        seen += 1
        if isinstance(item, torch.Tensor):
            total += item.numel() * item.element_size()
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set)):
            stack.extend(item)
        elif isinstance(item, torch.nn.Module):
            stack.extend(item.state_dict().values())
    return type(value).__qualname__, total
