"""init_rpc's hello exchange: who the peers are (pure: no I/O, no locks).

Every agent has a serial number, unique in its process, and says hello with
it to every peer. It knows a peer once that peer has *answered this agent's
hello* with a hello-back naming the serial. A plain hello is not enough,
because an inbox outlives its agents: ``init_rpc`` after a shutdown starts a
new agent on the same inbox, and frames sent to the old one may still sit
there. Only an answer to our own hello proves that the peer's current agent
sent it.

Every hello, and the first answer from each peer agent, is answered once, so
both sides of a pair end up with an answer whichever hello got through.
Hellos do get lost: an agent that knows every peer ignores the exchange,
because any hello that reaches it then comes from a peer's *next* agent (the
peer restarted RPC first). That next agent learns about our next agent from
the answer to its own hello, which our next agent receives.

:class:`Handshake` only decides. The agent holds its lock around
:meth:`Handshake.receive` and sends what it returns.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["HELLO", "HELLO_BACK", "WorkerDesc", "Handshake"]

HELLO = "__hello__"
HELLO_BACK = "__hello_back__"


@dataclass(frozen=True, slots=True)
class WorkerDesc:
    name: str
    rank: int
    pid: int


class Handshake:
    """One agent's side of the exchange.

    Messages are tuples ``(tag, rank, name, pid, world_size, serial,
    answering)``; ``answering`` is the serial a hello-back answers (None in a
    hello).
    """

    def __init__(self, *, rank: int, name: str, pid: int, world_size: int, serial: int) -> None:
        self.rank = rank
        self.world_size = world_size
        self.serial = serial
        self._me = WorkerDesc(name, rank, pid)
        self.peers: dict[int, WorkerDesc] = {rank: self._me}
        # Peers whose world size differs from ours: rank -> the error text.
        self.mismatches: dict[int, str] = {}
        self._answered: set[tuple[int, int]] = set()  # (rank, serial) of peer agents answered

    @property
    def complete(self) -> bool:
        return len(self.peers) >= self.world_size

    def missing(self) -> list[int]:
        return sorted(set(range(self.world_size)) - set(self.peers))

    def hello(self) -> tuple:
        """The hello to send to every peer."""
        return self._message(HELLO, None)

    def receive(self, message: tuple) -> tuple | None:
        """Take a hello or hello-back; return the hello-back to send its sender, or None."""
        tag, rank, name, pid, world_size, serial, answering = message
        if self.complete:
            return None
        if world_size != self.world_size:
            self.mismatches[rank] = (
                f"world size mismatch: rank {rank} ({name!r}) called init_rpc with "
                f"world_size={world_size}, this worker has {self.world_size}")
            return None
        if tag == HELLO_BACK:
            if answering != self.serial:
                return None  # it answers a previous agent of this process
            self.peers[rank] = WorkerDesc(name, rank, pid)
        elif tag != HELLO:
            raise ValueError(f"not a handshake message: {message!r}")
        if (rank, serial) in self._answered:
            return None
        self._answered.add((rank, serial))
        return self._message(HELLO_BACK, serial)

    def _message(self, tag: str, answering: int | None) -> tuple:
        me = self._me
        return (tag, me.rank, me.name, me.pid, self.world_size, self.serial, answering)
