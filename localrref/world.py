"""What a worker process knows about the world it was started in.

The supervisor (``localrref.launch.supervisor``) builds one :class:`WorldSpec`
per worker and installs it in the child before the user's code runs; the RPC
runtime reads it back with :func:`current` inside ``init_rpc``.

Inbox layout (one ``SimpleQueue`` per rank, plus one for the supervisor)::

    inboxes[0] .. inboxes[world_size - 1]   worker inboxes, read by each rank's reader thread
    inboxes[world_size]                     the supervisor's inbox (control messages only)

Besides the runtime's protocol frames, *control tuples* travel on these
queues, as control frames in the transport's wire format (one atomic
pipe write of ``<sender rank, int32 LE> + b"C" + pickle(tuple)``; see
``localrref.transport.mpqueue`` and ``localrref.codec.frames``). Their
shapes are fixed here so every side matches on the same constants:

* supervisor -> worker: ``("__peer_exited__", rank, pid, exitcode)`` the
  moment a peer exits abnormally (``exitcode`` is negative for a signal, as
  ``multiprocessing`` reports it). Build with :func:`peer_exited_message`,
  recognise with :meth:`PeerExited.from_message`.
* the graceful-shutdown barrier the supervisor drives (torch's
  ``_wait_all_workers`` twice over, with the RRef deletion in between)::

      worker r -> supervisor: ("__shutdown_arrived__", r)
      supervisor -> all:      ("__shutdown_proceed__",)      once every rank arrived
      worker r -> supervisor: ("__shutdown_drained__", r, s, c) once r has no call or job
                                                             of its own in flight; s, c: the
                                                             calls and replies it has sent and
                                                             received so far
      supervisor -> all:      ("__shutdown_again__",)        another round, until two rounds
      supervisor -> all:      ("__shutdown_proceed__",)      show nothing in flight
      worker r -> supervisor: ("__shutdown_done__", r, [leak dict, ...])
      supervisor -> all:      ("__shutdown_proceed__",)      once every rank is done
      supervisor -> all:      ("__shutdown_failed__", reason) if a rank exits instead

* worker -> supervisor: ``("__leak_report__", rank, [leak dict, ...])`` for
  leaks found outside a graceful shutdown.

Leak dicts carry the keys in :data:`LEAK_FIELDS`.

Data only: this module imports nothing of ours (a leaf, like ``errors``).
"""

from __future__ import annotations

import re
import signal
from dataclasses import dataclass
from typing import Any

__all__ = [
    "WorldSpec",
    "PeerExited",
    "PEER_EXITED",
    "SHUTDOWN_ARRIVED",
    "SHUTDOWN_PROCEED",
    "SHUTDOWN_DONE",
    "SHUTDOWN_FINISHED",
    "SHUTDOWN_DRAINED",
    "SHUTDOWN_AGAIN",
    "shutdown_finished_message",
    "shutdown_drained_message",
    "SHUTDOWN_FAILED",
    "LEAK_REPORT",
    "LEAK_FIELDS",
    "peer_exited_message",
    "shutdown_arrived_message",
    "shutdown_done_message",
    "leak_report_message",
    "describe_exitcode",
    "install",
    "current",
]

PEER_EXITED = "__peer_exited__"
SHUTDOWN_ARRIVED = "__shutdown_arrived__"
SHUTDOWN_PROCEED = "__shutdown_proceed__"
SHUTDOWN_DONE = "__shutdown_done__"
SHUTDOWN_FINISHED = "__shutdown_finished__"
SHUTDOWN_DRAINED = "__shutdown_drained__"
SHUTDOWN_AGAIN = "__shutdown_again__"
SHUTDOWN_FAILED = "__shutdown_failed__"
LEAK_REPORT = "__leak_report__"

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

# Every /dev/shm entry a world creates starts with this; the supervisor
# unlinks whatever matches once the world is over.

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

    @property
    def shm_prefix(self) -> str:
        """Prefix every /dev/shm name of this world must start with."""
        from localrref.transport.segment import segment_prefix
        return segment_prefix(self.world_id)


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerExited:
    """A peer worker exited abnormally (decoded ``__peer_exited__`` tuple)."""

    rank: int
    pid: int
    exitcode: int

    def to_message(self) -> tuple[str, int, int, int]:
        return (PEER_EXITED, self.rank, self.pid, self.exitcode)

    @classmethod
    def from_message(cls, message: object) -> PeerExited | None:
        """Decode ``message`` if it is a ``__peer_exited__`` tuple, else return None."""
        match message:
            case (str() as tag, int() as rank, int() as pid, int() as exitcode) if tag == PEER_EXITED:
                return cls(rank=rank, pid=pid, exitcode=exitcode)
        return None

    def describe(self) -> str:
        """Human-readable cause, e.g. ``worker rank 1 (pid 42) was killed by signal SIGKILL``."""
        return f"worker rank {self.rank} (pid {self.pid}) {describe_exitcode(self.exitcode)}"


def peer_exited_message(rank: int, pid: int, exitcode: int) -> tuple[str, int, int, int]:
    """The tuple the supervisor puts into every surviving worker's inbox."""
    return PeerExited(rank=rank, pid=pid, exitcode=exitcode).to_message()


def shutdown_arrived_message(rank: int) -> tuple[str, int]:
    """Worker -> supervisor: ``rank`` has entered graceful shutdown."""
    return (SHUTDOWN_ARRIVED, rank)


def shutdown_drained_message(rank: int, sent: int, received: int) -> tuple[str, int, int, int]:
    """Worker -> supervisor: ``rank`` has no call or job of its own in flight; it has
    sent ``sent`` and received ``received`` calls and replies since ``init_rpc``."""
    return (SHUTDOWN_DRAINED, rank, sent, received)


def shutdown_done_message(rank: int, leaks: list[dict[str, Any]]) -> tuple[str, int, list[dict[str, Any]]]:
    """Worker -> supervisor: ``rank`` deleted its RRefs; ``leaks`` are what remains."""
    return (SHUTDOWN_DONE, rank, [dict(leak) for leak in leaks])


def shutdown_finished_message(rank: int) -> tuple[str, int]:
    """Worker -> supervisor: this rank finished deleting its RRefs (the last barrier)."""
    return (SHUTDOWN_FINISHED, rank)


def leak_report_message(rank: int, leaks: list[dict[str, Any]]) -> tuple[str, int, list[dict[str, Any]]]:
    """Worker -> supervisor: the RRefs ``rank`` still holds at shutdown (keys: :data:`LEAK_FIELDS`)."""
    return (LEAK_REPORT, rank, [dict(leak) for leak in leaks])


def describe_exitcode(exitcode: int) -> str:
    """``"exited with code 3"`` or ``"was killed by signal SIGKILL"`` (negative = signal)."""
    if exitcode >= 0:
        return f"exited with code {exitcode}"
    try:
        name = signal.Signals(-exitcode).name
    except ValueError:
        name = f"<unknown signal {-exitcode}>"
    return f"was killed by signal {name}"


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
