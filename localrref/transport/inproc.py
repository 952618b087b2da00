"""Inboxes inside one process: agents of a test world talk through deques.

The in-process twin of :mod:`localrref.transport.mpqueue`: an
:class:`InprocNetwork` holds one FIFO per rank (workers, then the
supervisor), and :meth:`InprocNetwork.endpoint` gives each rank the same
interface as an ``Endpoint`` (``send``, ``recv``, ``nudge``, ``wake``,
``close``). Frames are bytes, as on the wire, so everything above the
transport (the codec, the agent, the supervisor's dispatcher) runs as it
does between processes. There is no size limit and no shared memory: a test
world passes no pool, and tensors travel inline.

Threads: any thread may send; ``recv`` waits on the network's condition.
A test world without threads calls ``recv(0)`` only after
:meth:`InprocNetwork.pending` said a frame is there.
"""

from __future__ import annotations

import collections
import threading
import time

from localrref.errors import WorkerClosedError, WorkerGoneError

__all__ = ["InprocNetwork", "InprocEndpoint"]


class InprocNetwork:
    """``size`` inboxes in this process (see the module docstring)."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"a network needs at least one inbox, got {size}")
        self.size = size
        self._inboxes = [collections.deque() for _ in range(size)]
        self._gone: set[int] = set()
        self._cond = threading.Condition()
        # A test's routing hook (trio's FakeNet): route(src, dst, frame) returns
        # False to take the frame out of the network (to deliver it later with
        # put, or never).
        self.route = None

    def endpoint(self, rank: int) -> "InprocEndpoint":
        if not 0 <= rank < self.size:
            raise ValueError(f"rank {rank} has no inbox: there are {self.size}")
        return InprocEndpoint(self, rank)

    def pending(self, rank: int) -> int:
        """Frames waiting in ``rank``'s inbox."""
        return len(self._inboxes[rank])

    def take(self, rank: int) -> tuple[int, bytes] | None:
        """Remove and return the next ``(src, frame)`` of ``rank``'s inbox (a test's supervisor)."""
        with self._cond:
            inbox = self._inboxes[rank]
            return inbox.popleft() if inbox else None

    def put(self, src: int, dst: int, frame, *, routed: bool = True) -> None:
        """Append a frame to ``dst``'s inbox, as ``src`` (a test's supervisor sends this way).

        ``routed``: ask the routing hook first (False: deliver as is).
        """
        frame = bytes(frame)
        if routed and self.route is not None and not self.route(src, dst, frame):
            return
        with self._cond:
            if dst in self._gone:
                raise WorkerGoneError(f"cannot send to rank {dst}: it is gone", rank=dst)
            self._inboxes[dst].append((src, frame))
            self._cond.notify_all()

    def kill(self, rank: int) -> None:
        """Rank ``rank`` died: its inbox is gone, and sends to it fail."""
        with self._cond:
            self._gone.add(rank)
            self._inboxes[rank].clear()
            self._cond.notify_all()


class InprocEndpoint:
    """One rank's view of an :class:`InprocNetwork`: the interface of ``mpqueue.Endpoint``."""

    def __init__(self, network: InprocNetwork, rank: int) -> None:
        self.network = network
        self.rank = rank
        self._closed = False
        self._woken = False

    def send(self, dst: int, frame) -> None:
        if self._closed:
            raise WorkerClosedError(f"cannot send to rank {dst}: the endpoint of rank "
                                    f"{self.rank} is closed")
        if not 0 <= dst < self.network.size:
            raise ValueError(f"no rank {dst}: ranks are 0..{self.network.size - 1}")
        self.network.put(self.rank, dst, frame)

    def recv(self, timeout: float | None = None) -> tuple[int, bytes] | None:
        network = self.network
        deadline = None if timeout is None else time.monotonic() + timeout
        with network._cond:
            inbox = network._inboxes[self.rank]
            while True:
                if self._closed:
                    raise WorkerClosedError(f"the endpoint of rank {self.rank} is closed")
                if self._woken:
                    self._woken = False
                    return None
                if inbox:
                    return inbox.popleft()
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return None
                network._cond.wait(left)

    def nudge(self) -> bool:
        return False  # nobody spins here: callers fall back to wake()

    def wake(self) -> None:
        with self.network._cond:
            self._woken = True
            self.network._cond.notify_all()

    def close(self) -> None:
        with self.network._cond:
            self._closed = True
            self.network._cond.notify_all()
