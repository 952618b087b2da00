"""``delAllUsersAndUnforkedOwners`` as a state machine.

The seed's function blocks twice on a condition variable. Without threads it
becomes four phases that the driver advances with :meth:`poll` after every
change to the context (each handled message) and at each deadline:

    WAIT_PENDING  until no pending user and no pending child is left, or the
                  first deadline passes (seed: "Timed out waiting for pending
                  UserRRefs to be confirmed by owner and parent.")
        |  then, at once: tryDel every confirmed user (RREF_USER_DELETE), and
        |  drop every owner that no fork ever reached (the unforked sweep)
        v
    WAIT_OWNERS   until ``owners`` is empty, or the second deadline passes
                  (seed: "Timed out waiting for pending OwnerRRefs to be
                  deleted.")
        v
    DONE

The deadlines are supplied by the caller (``now + timeout`` for each wait, as
the seed's ``wait_for(lock, timeoutMillis, ...)`` does); a missed deadline is
logged and recorded in :attr:`timed_out`, never raised: shutdown carries on.
"""

from __future__ import annotations

import enum

from .rref_context import RRefContext

__all__ = ["DelAllUsersAndUnforkedOwners", "ShutdownPhase"]


class ShutdownPhase(enum.Enum):
    WAIT_PENDING = "WAIT_PENDING"
    WAIT_OWNERS = "WAIT_OWNERS"
    DONE = "DONE"


class DelAllUsersAndUnforkedOwners:
    """One run of the seed's ``delAllUsersAndUnforkedOwners`` on ``context``."""

    def __init__(self, context: RRefContext, *, now: float, timeout: float) -> None:
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
        self.context = context
        self.timeout = timeout
        self.phase = ShutdownPhase.WAIT_PENDING
        self.deadline = now + timeout
        self.timed_out: list[ShutdownPhase] = []

    @property
    def done(self) -> bool:
        return self.phase is ShutdownPhase.DONE

    def poll(self, now: float) -> list:
        """Advance as far as the context's state and ``now`` allow; return effects."""
        ctx = self.context
        if self.phase is ShutdownPhase.WAIT_PENDING:
            if ctx.has_pending_users_or_children() and now < self.deadline:
                return ctx.take_effects()
            if ctx.has_pending_users_or_children():
                self.timed_out.append(self.phase)
                ctx._log("error", "Timed out waiting for pending UserRRefs to be confirmed by "
                                  "owner and parent.")
            # No new forks are made during a graceful shutdown, so the
            # confirmed users are all the users this worker will ever delete.
            ctx.delete_all_confirmed_users()
            ctx.sweep_unforked_owners()
            self.phase = ShutdownPhase.WAIT_OWNERS
            self.deadline = now + self.timeout
        if self.phase is ShutdownPhase.WAIT_OWNERS:
            if ctx.owners and now < self.deadline:
                return ctx.take_effects()
            if ctx.owners:
                self.timed_out.append(self.phase)
                ctx._log("error", "Timed out waiting for pending OwnerRRefs to be deleted.")
            self.phase = ShutdownPhase.DONE
        return ctx.take_effects()
