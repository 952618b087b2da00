"""Control messages: what workers and their supervisor tell each other besides RPCs.

One frozen record per kind, gathered in the union :data:`Control`, matched
by type on both sides (the agent in ``localrref.agent``, the supervisor's
dispatcher in ``localrref.launch.control``). They travel as control frames
(``localrref.transport.wire``): one pickled record per atomic pipe write.

Who sends what::

    worker -> worker      Hello, HelloBack                 init_rpc's handshake (agent/handshake.py)
    supervisor -> worker  PeerExited                       a peer died: fail what depended on it
    worker -> supervisor  ShutdownArrived, ShutdownDrained, ShutdownDone, ShutdownFinished
    supervisor -> worker  ShutdownProceed, ShutdownAgain, ShutdownFailed
    worker -> supervisor  LeakReport                       leaks found outside a graceful shutdown
    worker -> supervisor  Joined, Leaving                  a world met through a rendezvous
                                                           (launch/join.py): who to watch, and
                                                           which exits are not deaths
    refused -> supervisor ArrivalRefused                   a process the rendezvous refused
    supervisor -> worker                                   left a rank empty: init_rpc fails

The graceful-shutdown barrier (``launch/control.py`` drives it)::

    every worker: ShutdownArrived      -> all: ShutdownProceed
    drain rounds: ShutdownDrained      -> all: ShutdownAgain, until a round proves
                                          nothing in flight -> all: ShutdownProceed
    every worker: ShutdownDone(leaks)  -> all: ShutdownProceed
    every worker: ShutdownFinished     -> all: ShutdownProceed
    a worker exits or a phase times out -> all: ShutdownFailed(reason)

A leaf: imports nothing of ours, so the torch-free supervisor and every
layer of a worker may use it.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from typing import Any

__all__ = [
    "Hello", "HelloBack", "PeerExited", "ShutdownArrived", "ShutdownDrained", "ShutdownDone",
    "ShutdownFinished", "ShutdownProceed", "ShutdownAgain", "ShutdownFailed", "LeakReport",
    "Joined", "Leaving", "ArrivalRefused", "Control", "CONTROL_TYPES", "describe_exitcode",
]

_RECORD = dict(frozen=True, slots=True, kw_only=True)


def _rank(value: object, what: str = "rank") -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{what} must be an int >= 0, got {value!r}")


@dataclass(**_RECORD)
class Hello:
    """init_rpc: "I am ``name`` at ``rank``", from the agent numbered ``serial`` in its process."""

    rank: int
    name: str
    pid: int
    world_size: int
    serial: int

    def __post_init__(self) -> None:
        _rank(self.rank)


@dataclass(**_RECORD)
class HelloBack:
    """The answer to the hello of the agent numbered ``answering`` (see agent/handshake.py)."""

    rank: int
    name: str
    pid: int
    world_size: int
    serial: int
    answering: int

    def __post_init__(self) -> None:
        _rank(self.rank)


@dataclass(**_RECORD)
class PeerExited:
    """Worker ``rank`` (pid ``pid``) exited abnormally; ``exitcode`` < 0 is a signal.

    In a world met through a rendezvous the supervisor is not the workers'
    parent: ``exitcode`` is then None (unknown), and ``left`` says the
    worker left the world without a graceful shutdown (its process may
    still run) rather than vanished. ``formed``: it left after its
    ``init_rpc`` returned, so every peer had answered its hello and the
    world had formed: its departure is an ordinary death even to a peer
    whose own ``init_rpc`` still waits for others.
    """

    rank: int
    pid: int
    exitcode: int | None
    left: bool = False
    formed: bool = False

    def __post_init__(self) -> None:
        _rank(self.rank)

    def how(self) -> str:
        """``was killed by signal SIGKILL``, ``left the world without a graceful shutdown``..."""
        if self.left:
            return "left the world without a graceful shutdown"
        return describe_exitcode(self.exitcode)

    def describe(self) -> str:
        """``worker rank 1 (pid 42) was killed by signal SIGKILL``."""
        return f"worker rank {self.rank} (pid {self.pid}) {self.how()}"


@dataclass(**_RECORD)
class ShutdownArrived:
    """Worker ``rank`` has entered graceful shutdown."""

    rank: int

    def __post_init__(self) -> None:
        _rank(self.rank)


@dataclass(**_RECORD)
class ShutdownDrained:
    """Worker ``rank`` has no call or job of its own in flight; it has sent and
    received ``sent`` and ``received`` calls and replies since ``init_rpc``."""

    rank: int
    sent: int
    received: int

    def __post_init__(self) -> None:
        _rank(self.rank)
        _rank(self.sent, "sent")
        _rank(self.received, "received")


@dataclass(**_RECORD)
class _Leaks:
    """Worker ``rank`` and the RRefs it still holds (leak dicts, keys ``world.LEAK_FIELDS``)."""

    rank: int
    leaks: tuple[dict[str, Any], ...] = ()

    def __post_init__(self) -> None:
        _rank(self.rank)
        object.__setattr__(self, "leaks", tuple(dict(leak) for leak in self.leaks))


@dataclass(**_RECORD)
class ShutdownDone(_Leaks):
    """Worker ``rank`` reports what it still holds, in the graceful shutdown's leak phase."""


@dataclass(**_RECORD)
class ShutdownFinished:
    """Worker ``rank`` has deleted its RRefs (the last barrier)."""

    rank: int

    def __post_init__(self) -> None:
        _rank(self.rank)


@dataclass(**_RECORD)
class ShutdownProceed:
    """Every worker reached the current barrier."""


@dataclass(**_RECORD)
class ShutdownAgain:
    """The drain is not proven yet: wait for your own calls again and report again."""


@dataclass(**_RECORD)
class ShutdownFailed:
    """The barrier cannot complete; ``reason`` names who and why."""

    reason: str


@dataclass(**_RECORD)
class LeakReport(_Leaks):
    """Worker ``rank`` reports RRefs it still holds, outside a graceful shutdown."""


@dataclass(**_RECORD)
class Joined:
    """Worker ``rank`` is process ``pid``, started at ``started`` (clock ticks since boot)."""

    rank: int
    pid: int
    started: int

    def __post_init__(self) -> None:
        _rank(self.rank)


@dataclass(**_RECORD)
class Leaving:
    """Worker ``rank`` leaves the world now; ``graceful``: after a graceful shutdown.

    Its exit is then no death: peers are told only if it left without a
    graceful shutdown while they still run (their calls to it must fail).
    ``formed``: its ``init_rpc`` had returned (see ``PeerExited.formed``).
    """

    rank: int
    graceful: bool
    formed: bool = False

    def __post_init__(self) -> None:
        _rank(self.rank)


@dataclass(**_RECORD)
class ArrivalRefused:
    """The process (``pid``) arriving as rank ``rank`` was refused: this world cannot form.

    Sent by that process to its world's supervisor (launch/join.py), which passes
    it on to every member; their ``init_rpc`` would otherwise wait for the rank
    until it timed out.
    """

    rank: int
    pid: int
    reason: str

    def __post_init__(self) -> None:
        _rank(self.rank)


Control = (Hello | HelloBack | PeerExited | ShutdownArrived | ShutdownDrained | ShutdownDone
           | ShutdownFinished | ShutdownProceed | ShutdownAgain | ShutdownFailed | LeakReport
           | Joined | Leaving | ArrivalRefused)

CONTROL_TYPES = (Hello, HelloBack, PeerExited, ShutdownArrived, ShutdownDrained, ShutdownDone,
                 ShutdownFinished, ShutdownProceed, ShutdownAgain, ShutdownFailed, LeakReport,
                 Joined, Leaving, ArrivalRefused)


def describe_exitcode(exitcode: int | None) -> str:
    """``"exited with code 3"`` or ``"was killed by signal SIGKILL"`` (negative = signal)."""
    if exitcode is None:
        return "is gone (it exited or was killed before a graceful shutdown)"
    if exitcode >= 0:
        return f"exited with code {exitcode}"
    try:
        name = signal.Signals(-exitcode).name
    except ValueError:
        name = f"<unknown signal {-exitcode}>"
    return f"was killed by signal {name}"
