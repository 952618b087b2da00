"""What a worker process knows about the world it was started in.

The supervisor (``localrref.launch.supervisor``) builds one :class:`WorldSpec`
per worker and installs it in the child before the user's code runs; the RPC
runtime reads it back with :func:`current` inside ``init_rpc``.

Inbox layout (one ``SimpleQueue`` per rank, plus one for the supervisor)::

    inboxes[0] .. inboxes[world_size - 1]   worker inboxes, read by each rank's reader thread
    inboxes[world_size]                     the supervisor's inbox (control messages only)

Protocol frames and control messages (``localrref.control_messages``) travel
on these queues in the transport's wire format (``localrref.transport.wire``).
Leak reports are dicts with the keys of :data:`LEAK_FIELDS`.

Data only: this module imports nothing of ours (a leaf, like ``errors``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

__all__ = ["WorldSpec", "LEAK_FIELDS", "install", "current"]

# One leaked RRef as reported by a worker; the supervisor prints these fields
# in this order. Missing keys print as "?" rather than failing the report.
LEAK_FIELDS = (
    "rref_id",
    "fork_id",
    "owner_rank",
    "holder_rank",
    "state",
    "value_type",
    "tensor_bytes",
    "creation_site",
)

# Short and shell/filename-safe: it ends up in /dev/shm names (macOS caps POSIX
# shm names at 31 characters, so the id itself stays well under that).
_WORLD_ID_RE = re.compile(r"^[a-z0-9]{1,16}$")


@dataclass(frozen=True, slots=True, kw_only=True)
class WorldSpec:
    """Everything a worker needs to join its world, handed over by the supervisor.

    Attributes:
        world_id: Unique per world (one per attempt of a run); lowercase
            alphanumerics, at most 16 characters.
        rank: This worker's rank, ``0 <= rank < world_size``.
        world_size: Number of workers (the supervisor is not counted).
        inboxes: ``world_size + 1`` ``SimpleQueue`` objects; see the module
            docstring for the layout.
        supervisor_pid: Pid of the supervising process.
        strict_leaks: A leaked RRef at shutdown fails the run.
        record_creation_sites: Record where each RRef was created, for leak reports.
        shutdown_timeout: Seconds a graceful shutdown may take before the
            supervisor escalates to signals.
    """

    world_id: str
    rank: int
    world_size: int
    inboxes: tuple[Any, ...]
    supervisor_pid: int
    strict_leaks: bool = False
    record_creation_sites: bool = False
    shutdown_timeout: float = 30.0

    def __post_init__(self) -> None:
        if not _WORLD_ID_RE.match(self.world_id):
            raise ValueError(
                f"world_id {self.world_id!r} must be 1-16 lowercase letters or digits "
                "(it becomes part of /dev/shm names)"
            )
        if self.world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside [0, {self.world_size})")
        if len(self.inboxes) != self.world_size + 1:
            raise ValueError(
                f"expected {self.world_size + 1} inboxes (one per rank plus the "
                f"supervisor's), got {len(self.inboxes)}"
            )
        if self.shutdown_timeout < 0:
            raise ValueError(f"shutdown_timeout must be >= 0, got {self.shutdown_timeout}")

    @property
    def inbox(self) -> Any:
        """This worker's own inbox."""
        return self.inboxes[self.rank]

    @property
    def supervisor_rank(self) -> int:
        """Index of the supervisor's inbox in :attr:`inboxes`."""
        return self.world_size

    @property
    def supervisor_inbox(self) -> Any:
        return self.inboxes[self.world_size]


# The one piece of process-wide state here: set once in a worker, before user
# code runs, by the supervisor's bootstrap.
_current: WorldSpec | None = None


def install(spec: WorldSpec | None) -> None:
    """Make ``spec`` this process's world (None uninstalls; tests only)."""
    global _current
    _current = spec


def current() -> WorldSpec | None:
    """The world this worker was started in, or None outside a localrref worker."""
    return _current
