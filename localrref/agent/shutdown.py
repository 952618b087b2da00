"""The worker's half of graceful shutdown, and the leak records it reports.

The supervisor drives the barrier (``launch/control.py``); each worker, in
the application thread that called ``shutdown()``:

1. sends :class:`ShutdownArrived` and waits for every worker to arrive;
2. drains (:meth:`GracefulShutdown._drain`): rounds in which it waits until
   it has no call or job of its own in flight and reports how many calls
   and replies it has sent and received, until the supervisor has proof
   that nothing is in flight anywhere (torch's ``join``);
3. reports what it still holds (:meth:`GracefulShutdown.leak_records`) and
   waits for every report, taken before anyone deletes anything;
4. runs the seed's ``delAllUsersAndUnforkedOwners``
   (``core/shutdown.py``) until its deletes are acknowledged;
5. the last barrier: nobody stops serving while a peer still deletes.

Meanwhile the inbox is served as always: by IO threads, never by the thread
in ``shutdown()``. Messages from the supervisor land in :attr:`inbox`
(appended by the reader, under :attr:`_lock`); the application thread waits
on the agent's progress signal. A peer's death, a ``ShutdownFailed`` or the
worker's own backstop ends any wait with a named error.
"""

from __future__ import annotations

import collections
import gc
import threading

import torch

from ..control_messages import (
    ShutdownAgain, ShutdownArrived, ShutdownDone, ShutdownDrained, ShutdownFailed,
    ShutdownFinished, ShutdownProceed,
)
from ..core.shutdown import DelAllUsersAndUnforkedOwners

__all__ = ["GracefulShutdown"]


class GracefulShutdown:
    """See the module docstring."""

    def __init__(self, agent) -> None:
        self.agent = agent
        self.inbox: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self.machine: DelAllUsersAndUnforkedOwners | None = None

    def deliver(self, message) -> None:
        """A control message from the supervisor (called by the reader)."""
        with self._lock:
            self.inbox.append(message)
        self.agent.signal_progress()

    def poll_locked(self, now: float) -> list:
        """The machine's effects due at ``now`` (agent lock held; see Housekeeper.pass_)."""
        return self.machine.poll(now) if self.machine is not None else []

    def run(self, timeout: float) -> list[dict]:
        """The whole shutdown (see the module docstring); returns the leak records."""
        agent = self.agent
        agent.reader.release_inbox()
        supervisor = agent.world_size
        # The supervisor bounds each phase and names who is missing; this
        # worker's own bound is only a backstop should the supervisor vanish.
        backstop = 2 * timeout + 10
        # Young cyclic garbage (RRefs in fresh reference cycles) is freed
        # first; a full collection would cost ~40 ms with torch loaded, more
        # than the whole shutdown should, so older cycles are the
        # application's to break (torch's leak warning says the same).
        gc.collect(1)
        agent.housekeeper.pass_()
        agent.send_control(supervisor, ShutdownArrived(rank=agent.rank))
        # Unbounded here: other workers may legitimately still be working
        # (torch's shutdown waits for them too). A peer that dies, or the
        # supervisor's --shutdown-timeout, ends the wait with a named error.
        self._wait_for((ShutdownProceed,), None, "every worker to reach shutdown()")
        self._drain()
        agent.housekeeper.pass_()
        # Every application has stopped making RPCs: what is still held, and
        # what every owner keeps, is the leak report. It is taken before any
        # worker deletes anything (the next barrier), or an early delete
        # could free an owner before its value was described.
        held = self.leak_records()
        agent.send_control(supervisor, ShutdownDone(rank=agent.rank, leaks=held))
        self._wait_for((ShutdownProceed,), backstop, "every worker to report its RRefs")
        self._delete_all(timeout)
        # The last barrier: nobody stops serving while a peer still deletes.
        agent.send_control(supervisor, ShutdownFinished(rank=agent.rank))
        self._wait_for((ShutdownProceed,), backstop, "every worker to finish deleting RRefs")
        return held

    # -- waiting for the supervisor -------------------------------------------------

    def _wait_for(self, kinds: tuple[type, ...], timeout: float | None, what: str):
        agent = self.agent
        agent.reader.release_inbox()
        found = []

        def arrived() -> bool:
            with self._lock:
                for i, message in enumerate(self.inbox):
                    if isinstance(message, (ShutdownFailed, *kinds)):
                        del self.inbox[i]
                        found.append(message)
                        return True
            return bool(agent.dead)

        if not agent.block_until(arrived, timeout, what):
            raise RuntimeError(f"graceful shutdown timed out after {timeout:.0f} s "
                               f"waiting for {what}")
        if not found:
            raise next(iter(agent.dead.values()))
        message = found[0]
        if isinstance(message, ShutdownFailed):
            raise RuntimeError(f"graceful shutdown failed: {message.reason}")
        return message

    def _failed_waiting(self) -> bool:
        with self._lock:
            return any(isinstance(m, ShutdownFailed) for m in self.inbox)

    # -- the drain --------------------------------------------------------------------

    def _drain(self) -> None:
        """Rounds of the drain barrier (launch/control.py): until no worker has work in flight.

        Each round this worker waits until it has no call or job of its own
        in flight, then reports the calls and replies it has sent and
        received; the supervisor decides when the rounds prove the world idle.

        Unbounded here, as the arrive phase: calls may run as long as they
        need (torch's join waits too); a peer's death or the supervisor's
        --shutdown-timeout ends it with a named error.
        """
        agent = self.agent
        while True:
            agent.block_until(
                lambda: not agent.active_work() or agent.dead or self._failed_waiting(),
                None, "this worker's calls in flight to finish")
            sent, received = agent.message_counts()
            agent.send_control(agent.world_size, ShutdownDrained(
                rank=agent.rank, sent=sent, received=received))
            reply = self._wait_for((ShutdownProceed, ShutdownAgain), None,
                                   "every worker to finish the calls it had in flight")
            if isinstance(reply, ShutdownProceed):
                return

    # -- deleting every RRef ------------------------------------------------------------

    def _delete_all(self, timeout: float) -> None:
        agent = self.agent
        limit = max(timeout, 1.0)
        now = agent.clock()
        machine = DelAllUsersAndUnforkedOwners(agent.core, now=now, timeout=limit)
        with agent.lock:
            self.machine = machine
            effects = machine.poll(now)
        agent.run(effects)
        deadline = agent.clock() + 2 * limit

        def settled() -> bool:
            with agent.lock:
                effects = machine.poll(agent.clock())
                done = machine.done and agent.core.num_pending_futures == 0
            agent.run(effects)
            return done or bool(agent.dead) or agent.clock() > deadline

        # The machine has deadlines of its own: look at least every 50 ms.
        agent.block_until(settled, None, "this worker's RRef deletes to be acknowledged",
                          poll=0.05)
        if agent.dead:
            raise next(iter(agent.dead.values()))
        with agent.lock:
            # torch's checkRRefLeaks, as a warning in the seed's wording.
            agent.core.check_rref_leaks(ignore_rref_leak=True)
            effects = agent.core.take_effects()
        agent.run(effects)

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
