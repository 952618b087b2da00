"""Rendezvous decisions: which world a process joins when no localrref launcher started it.

Processes started by ``torch.multiprocessing.spawn``, ``multiprocessing.Process``,
torchrun or by hand meet the way torch's do: through an ``init_method``
(``env://`` reads ``MASTER_ADDR``/``MASTER_PORT``; ``tcp://host:port``;
``file:///path``). On one machine the rendezvous names a world record that
every joiner reads and updates under a lock (``launch/join.py`` does the
I/O); this module holds every decision about it, so tests can drive them
without processes, files or clocks::

    parse_init_method("env://", os.environ)  -> Rendezvous(key="port-29500", ...)
    decide(record | None, Arrival(...), alive) -> Create | Join | Reclaim | Wait | Refuse
    record.with_member(...) / record.leaving(rank) -> a new WorldRecord
    record.finished(alive)                      -> nobody is left to use the world

A world record is JSON (``WorldRecord.to_json`` / ``from_json``): the
world's id (it names the world's inbox directory and its /dev/shm
segments), its size, the supervisor's pid, and one :class:`Member` per rank
that has joined, with the pid and the start time of its process (a pid
alone could have been reused by a stranger since a crashed run).

Data only: imports nothing of ours.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, replace
from urllib.parse import urlsplit

__all__ = [
    "Rendezvous", "parse_init_method", "is_local_host", "Member", "WorldRecord", "Arrival",
    "Create", "Join", "Reclaim", "Wait", "Refuse", "Decision", "decide", "RECORD_VERSION",
    "REFUSAL_LINGER_S",
]

RECORD_VERSION = 1

# Hosts that are this machine whatever its addresses are.
_LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost",
                             "ip6-loopback"})


@dataclass(frozen=True, slots=True)
class Rendezvous:
    """Where a world meets, parsed from an ``init_method``.

    Attributes:
        init_method: as given (for messages).
        host: the host of ``env://`` / ``tcp://`` (None for ``file://``).
        port: their port (None for ``file://``).
        path: the file of ``file://`` (None otherwise).
        key: the name of the world's record on this machine: one per port,
            or per file; every local host name of a port is the same world.
    """

    init_method: str
    host: str | None
    port: int | None
    path: str | None
    key: str

    def describe(self) -> str:
        if self.path is not None:
            return f"{self.init_method} (file {self.path})"
        return f"{self.init_method} ({self.host}:{self.port})"


def parse_init_method(init_method: str | None, environ: Mapping[str, str]) -> Rendezvous:
    """The rendezvous an ``init_method`` names, with torch's errors for missing settings.

    Raises:
        ValueError: an unknown scheme, a missing ``MASTER_ADDR``/``MASTER_PORT``
            under ``env://``, a port that is not a number, or an empty path.
    """
    method = (init_method or "env://").strip()
    parts = urlsplit(method)
    scheme = parts.scheme.lower()
    if scheme == "env":
        host = environ.get("MASTER_ADDR", "").strip()
        port_text = environ.get("MASTER_PORT", "").strip()
        for var, value in (("MASTER_ADDR", host), ("MASTER_PORT", port_text)):
            if not value:
                # torch's wording (torch/distributed/rendezvous.py), and the fix.
                raise ValueError(
                    f"Error initializing torch.distributed using env:// rendezvous: environment "
                    f"variable {var} expected, but not set (set MASTER_ADDR=localhost and "
                    f"MASTER_PORT=<a free port> in every process, pass "
                    f"rpc_backend_options=RpcBackendOptions(init_method='tcp://localhost:PORT'), "
                    f"or start the workers with localrref.spawn or python -m localrref.launch)")
        return _host_port(method, host, port_text)
    if scheme == "tcp":
        if not parts.hostname or parts.port is None:
            raise ValueError(f"init_method {method!r} must look like tcp://HOST:PORT")
        return _host_port(method, parts.hostname, str(parts.port))
    if scheme == "file":
        path = parts.path
        if parts.netloc and parts.netloc not in ("", "localhost"):
            path = "//" + parts.netloc + path
        if not path:
            raise ValueError(f"init_method {method!r} names no file: use file:///absolute/path")
        digest = hashlib.sha256(path.encode()).hexdigest()[:16]
        return Rendezvous(method, None, None, path, f"file-{digest}")
    raise ValueError(f"init_method {method!r} is not supported: use env:// (MASTER_ADDR and "
                     f"MASTER_PORT), tcp://HOST:PORT or file:///PATH")


def _host_port(method: str, host: str, port_text: str) -> Rendezvous:
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"the port of {method!r} must be a number, got {port_text!r}") from None
    if not 0 < port < 65536:
        raise ValueError(f"the port of {method!r} must be in 1..65535, got {port}")
    return Rendezvous(method, host.strip("[]"), port, None, f"port-{port}")


def is_local_host(host: str, local_names: Collection[str], local_addresses: Collection[str]) -> bool:
    """Whether ``host`` is this machine: a loopback name or address, or one of its own.

    Args:
        host: a host name or address, as in ``MASTER_ADDR``.
        local_names: this machine's names (hostname, fully qualified name).
        local_addresses: the addresses its names resolve to and its interfaces have.
    """
    name = host.strip("[]").lower()
    if name in _LOOPBACK_NAMES or name in {n.lower() for n in local_names}:
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    return address.is_loopback or address.is_unspecified or str(address) in local_addresses


@dataclass(frozen=True, slots=True)
class Member:
    """A process that joined as ``rank``; ``started`` tells its pid from a later reuse."""

    rank: int
    name: str
    pid: int
    started: int
    left: bool = False


@dataclass(frozen=True, slots=True)
class WorldRecord:
    """What every joiner of one rendezvous reads and updates under the lock."""

    world_id: str
    world_size: int
    supervisor_pid: int
    supervisor_started: int
    members: tuple[Member, ...] = ()
    # Why this world can never form (a refused arrival left a rank empty);
    # later arrivals are refused with it rather than wait in it (see decide).
    refused: str = ""
    version: int = RECORD_VERSION

    def member(self, rank: int) -> Member | None:
        return next((m for m in self.members if m.rank == rank), None)

    def with_member(self, member: Member) -> WorldRecord:
        others = tuple(m for m in self.members if m.rank != member.rank)
        return replace(self, members=tuple(sorted((*others, member), key=lambda m: m.rank)))

    def leaving(self, rank: int, pid: int) -> WorldRecord:
        """The record once ``rank`` (this very process, ``pid``) has left the world."""
        member = self.member(rank)
        if member is None or member.pid != pid:
            return self
        return self.with_member(replace(member, left=True))

    def finished(self, alive: Callable[[int, int], bool]) -> bool:
        """Nobody will use this world again: every member left or died, and none is to come.

        A world whose members have not all arrived is not finished while any
        member waits; once every member present has left or died, ranks that
        arrive later start a new world rather than wait in a dead one.
        """
        return all(m.left or not alive(m.pid, m.started) for m in self.members)

    def to_json(self) -> str:
        return json.dumps({
            "version": self.version, "world_id": self.world_id, "world_size": self.world_size,
            "supervisor_pid": self.supervisor_pid, "supervisor_started": self.supervisor_started,
            "members": [[m.rank, m.name, m.pid, m.started, m.left] for m in self.members],
            "refused": self.refused,
        })

    @classmethod
    def from_json(cls, text: str) -> WorldRecord:
        """Raises ValueError for anything but a record this version wrote."""
        try:
            data = json.loads(text)
            if data.get("version") != RECORD_VERSION:
                raise ValueError(f"record version {data.get('version')!r}, expected "
                                 f"{RECORD_VERSION}")
            members = tuple(Member(int(r), str(n), int(p), int(s), bool(left))
                            for r, n, p, s, left in data["members"])
            return cls(world_id=str(data["world_id"]), world_size=int(data["world_size"]),
                       supervisor_pid=int(data["supervisor_pid"]),
                       supervisor_started=int(data["supervisor_started"]), members=members,
                       refused=str(data.get("refused", "")))
        except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as exc:
            raise ValueError(f"not a localrref world record: {exc}") from None


@dataclass(frozen=True, slots=True)
class Arrival:
    """A process asking to join: who it is and what it believes the world to be."""

    rank: int
    world_size: int
    name: str
    pid: int
    started: int


@dataclass(frozen=True, slots=True)
class Create:
    """No world here: start one (and its supervisor) with this member in it."""


@dataclass(frozen=True, slots=True)
class Join:
    """Join the world of the record as it is."""

    record: WorldRecord


@dataclass(frozen=True, slots=True)
class Reclaim:
    """The record is of a world that is over (or of a crashed run): remove it, then create."""

    record: WorldRecord
    stale: bool = field(default=False)  # its supervisor died without cleaning up


@dataclass(frozen=True, slots=True)
class Wait:
    """The world there is ending: ask again shortly; ``reason`` is the error if it never does."""

    reason: str


@dataclass(frozen=True, slots=True)
class Refuse:
    """Joining is an error; ``reason`` names the problem and the fix.

    ``dooms_world``: the refusal leaves a rank of the world found there that
    no process will take (a name taken twice: each process has its own
    rank, so the refused one's stays empty). Its members would wait for it
    until ``init_rpc`` timed out; they are told instead (launch/join.py).
    """

    reason: str
    dooms_world: bool = False


Decision = Create | Join | Reclaim | Wait | Refuse


# How long the supervisor of a world a refusal doomed keeps it (and so its
# record) once every member is gone: processes of one start arrive seconds
# apart (each imports torch), and a straggler must find the refusal, not an
# empty rendezvous where it would found a world and wait for ranks that
# already failed.
REFUSAL_LINGER_S = 5.0


def decide(record: WorldRecord | None, arrival: Arrival, rendezvous: Rendezvous,
           alive: Callable[[int, int], bool]) -> Decision:
    """What a process arriving at ``rendezvous`` does, given the record found there.

    Args:
        record: the record under the rendezvous, or None if there is none.
        arrival: the arriving process.
        rendezvous: for messages.
        alive: ``alive(pid, started)``: that process still runs.
    """
    if arrival.world_size < 1:
        return Refuse(f"world_size must be >= 1, got {arrival.world_size}")
    if not 0 <= arrival.rank < arrival.world_size:
        return Refuse(f"rank {arrival.rank} is outside the world of {arrival.world_size} "
                      f"workers (ranks 0..{arrival.world_size - 1}); give each process a rank "
                      f"in that range (rank=, or the RANK environment variable)")
    if record is None:
        return Create()
    supervisor_alive = alive(record.supervisor_pid, record.supervisor_started)
    where = f"the world at {rendezvous.describe()}"
    if record.refused and (supervisor_alive or not record.finished(alive)):
        # Until its supervisor removes it: stragglers of the same start fail
        # too, rather than found a world that waits for ranks already gone.
        return Refuse(f"{where} cannot form, since an earlier arrival was refused: "
                      f"{record.refused}. Start every worker again")
    if record.finished(alive):
        return Reclaim(record, stale=not supervisor_alive)
    if not supervisor_alive:
        # Members still run but nobody watches them: a world that can no
        # longer report deaths or shut down. Its members fail on their own
        # (they watch the supervisor); a newcomer must not wait in it.
        live = [m for m in record.members if not m.left and alive(m.pid, m.started)]
        return Refuse(f"the world at {rendezvous.describe()} lost its supervisor (pid "
                      f"{record.supervisor_pid}) and still has live members "
                      f"({_members(live)}); stop them, or use another rendezvous")
    if arrival.world_size != record.world_size:
        return Refuse(f"world size mismatch: this process says world_size="
                      f"{arrival.world_size} but {where} has {record.world_size} workers "
                      f"(joined: {_members(record.members)}); every process must pass the "
                      f"same world_size (or WORLD_SIZE)")
    taken = record.member(arrival.rank)
    if taken is not None and not taken.left and alive(taken.pid, taken.started):
        if taken.pid == arrival.pid:
            return Refuse(f"this process (pid {arrival.pid}) already joined {where} as rank "
                          f"{arrival.rank}; call shutdown() before init_rpc again")
        return Refuse(f"two processes claim rank {arrival.rank} in {where}: pid {taken.pid} "
                      f"({taken.name!r}) has it, pid {arrival.pid} ({arrival.name!r}) asked for "
                      f"it; give every process its own rank (rank=, or RANK)")
    if taken is not None:
        # The rank's holder left or died while others still run: this world
        # cannot be whole again (its peers saw that rank go), but it is
        # ending: after a graceful shutdown the others leave a moment later
        # (init_rpc right after shutdown() gets here), after a death they
        # fail and go. Wait for it to finish, then start a new one.
        state = "left" if taken.left else "died"
        running = [m for m in record.members
                   if m.rank != arrival.rank and not m.left and alive(m.pid, m.started)]
        return Wait(f"rank {arrival.rank} of {where} already {state} (pid {taken.pid}) while "
                    f"{_members(running)} still run in that world; a world cannot take a rank "
                    f"back: shut every worker of the old world down (or use another "
                    f"rendezvous), and a new world starts")
    for m in record.members:
        if m.name == arrival.name and not m.left and alive(m.pid, m.started):
            return Refuse(f"worker name {arrival.name!r} is not unique: it is taken in {where} "
                          f"by rank {m.rank} (pid {m.pid}); give every worker its own name",
                          dooms_world=True)
    return Join(record)


def _members(members) -> str:
    listed = [f"rank {m.rank} pid {m.pid}" for m in members]
    return ", ".join(listed) if listed else "none"
