"""What the core asks its driver to do.

The core never acts: every public entry point of :class:`RRefContext` leaves
effects behind, and the driver (the runtime's agent, or the simulator) takes
them with ``take_effects()`` and carries them out in order, outside any lock.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Union

from .messages import Message

__all__ = [
    "Send", "Execute", "JobKind", "Complete", "Fail", "CreationSettled", "Released", "Log",
    "Effect", "RemoteFailure",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class Send:
    """Put ``message`` on the wire to worker ``dst`` (which may be this worker)."""

    dst: int
    message: Message


class JobKind(str, enum.Enum):
    CALL = "CALL"          # PYTHON_CALL: run payload, reply with finish_call / fail_job
    REMOTE = "REMOTE"      # PYTHON_REMOTE_CALL: run payload, keep result: finish_remote / fail_job
    FETCH = "FETCH"        # PYTHON_RREF_FETCH_CALL: serialise owner's value: finish_call / fail_job


@dataclass(frozen=True, slots=True, kw_only=True)
class Execute:
    """Run a job for worker ``src``; every RRef among its arguments is confirmed.

    ``rrefs`` are the records for the RRefs that rode in the request (in the
    order of the message's rrefs table); each UserRRef among them carries one
    hold that now belongs to the driver, released with ``RRefContext.release``.
    ``owner`` is the OwnerRRef a REMOTE job fills, or a FETCH job reads.
    """

    job_id: int
    kind: JobKind
    src: int
    payload: object
    rrefs: tuple = ()
    owner: object = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Complete:
    """Request ``request_id`` (rpc or fetch) returned ``payload``.

    ``rrefs`` as in :class:`Execute`: one driver-owned hold per UserRRef.
    """

    request_id: int
    payload: object
    rrefs: tuple = ()


@dataclass(frozen=True, slots=True)
class RemoteFailure:
    """An error that happened on another worker; ``payload`` as that worker sent it."""

    payload: object


@dataclass(frozen=True, slots=True, kw_only=True)
class Fail:
    """Request ``request_id`` failed with ``error``.

    ``error`` is an exception from :mod:`localrref.errors` (timeouts, a
    failed creation) or a :class:`RemoteFailure` carrying the remote payload.
    """

    request_id: int
    error: object


@dataclass(frozen=True, slots=True, kw_only=True)
class CreationSettled:
    """The ``remote()`` that created ``rref`` finished; ``error`` is None on success."""

    rref: object
    error: object = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Released:
    """The owner table let go of ``rref_id``: its value may now be freed."""

    rref_id: object


@dataclass(frozen=True, slots=True, kw_only=True)
class Log:
    """Something worth a log line (the seed's ``LOG(...)``); ``level`` is a logging name."""

    level: str
    text: str


Effect = Union[Send, Execute, Complete, Fail, CreationSettled, Released, Log]
