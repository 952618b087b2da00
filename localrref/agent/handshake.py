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

from ..control_messages import Hello, HelloBack

__all__ = ["WorkerDesc", "Handshake"]


@dataclass(frozen=True, slots=True)
class WorkerDesc:
    name: str
    rank: int
    pid: int


class Handshake:
    """One agent's side of the exchange (:class:`Hello` and :class:`HelloBack` records)."""

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

    def hello(self) -> Hello:
        """The hello to send to every peer."""
        me = self._me
        return Hello(rank=me.rank, name=me.name, pid=me.pid, world_size=self.world_size,
                     serial=self.serial)

    def receive(self, message: Hello | HelloBack) -> HelloBack | None:
        """Take a hello or hello-back; return the hello-back to send its sender, or None."""
        if not isinstance(message, (Hello, HelloBack)):
            raise TypeError(f"not a handshake message: {message!r}")
        if self.complete:
            return None
        rank = message.rank
        if message.world_size != self.world_size:
            self.mismatches[rank] = (
                f"world size mismatch: rank {rank} ({message.name!r}) called init_rpc with "
                f"world_size={message.world_size}, this worker has {self.world_size}")
            return None
        if isinstance(message, HelloBack):
            if message.answering != self.serial:
                return None  # it answers a previous agent of this process
            self.peers[rank] = WorkerDesc(message.name, rank, message.pid)
        if (rank, message.serial) in self._answered:
            return None
        self._answered.add((rank, message.serial))
        me = self._me
        return HelloBack(rank=me.rank, name=me.name, pid=me.pid, world_size=self.world_size,
                         serial=self.serial, answering=message.serial)
