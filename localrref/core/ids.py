"""Globally unique ids for RRefs and forks (torch's ``GloballyUniqueId``).

An id is ``(created_on, local_id)``: the worker that made it and a counter
local to that worker, so no coordination is needed to keep ids unique. The
same type serves as ``RRefId`` and ``ForkId``; an owner's self-fork (a
``remote()`` to itself) uses the RRef id as its fork id, as the seed does.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["GloballyUniqueId", "RRefId", "ForkId", "IdGenerator"]


@dataclass(frozen=True, slots=True, order=True)
class GloballyUniqueId:
    created_on: int
    local_id: int

    def __post_init__(self) -> None:
        if not isinstance(self.created_on, int) or self.created_on < 0:
            raise ValueError(f"created_on must be a worker id >= 0, got {self.created_on!r}")
        if not isinstance(self.local_id, int) or self.local_id < 0:
            raise ValueError(f"local_id must be an int >= 0, got {self.local_id!r}")

    def __str__(self) -> str:
        # torch's operator<< for GloballyUniqueId, so leak reports read alike.
        return f"GloballyUniqueId(created_on={self.created_on}, local_id={self.local_id})"

    __repr__ = __str__


RRefId = GloballyUniqueId
ForkId = GloballyUniqueId


class IdGenerator:
    """Per-worker id source (``RRefContext::genGloballyUniqueId``)."""

    __slots__ = ("worker_id", "_next")

    def __init__(self, worker_id: int) -> None:
        if not isinstance(worker_id, int) or worker_id < 0:
            raise ValueError(f"worker_id must be an int >= 0, got {worker_id!r}")
        self.worker_id = worker_id
        self._next = 0

    def next(self) -> GloballyUniqueId:
        gid = GloballyUniqueId(self.worker_id, self._next)
        self._next += 1
        return gid
