"""A world of real agents in one process, without threads: h11's ConnectionPair for agents.

Every worker is a real :class:`~localrref.agent.agent.Agent` (its core, codec,
futures, jobs, handshake, shutdown machine), built with ``driver=world``: it
starts no thread, runs jobs inline, and whenever it would wait it asks the
world to make progress (:meth:`AgentWorld.run_until`). The world delivers
one frame at a time, to a rank chosen by a seeded ``random.Random`` (per-pair
FIFO, as pipes are), plays the supervisor with the real
:class:`~localrref.launch.control.ControlDispatcher`, and moves a fake clock
to the next deadline only when nothing else can happen. A schedule is a pure
function of its seed.
"""

from __future__ import annotations

import random

import localrref
from localrref.agent import current
from localrref.agent.agent import Agent
from localrref.control_messages import PeerExited
from localrref.launch.control import ControlDispatcher
from localrref.rref import RRef
from localrref.transport import wire
from localrref.transport.inproc import InprocNetwork


class Stuck(AssertionError):
    """Nothing can happen, yet what a caller waits for has not."""


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class AgentWorld:
    """``n`` agents and a supervisor in this process; see the module docstring."""

    def __init__(self, n: int, *, seed: int = 0, rpc_timeout: float = 60.0) -> None:
        self.n = n
        self.rng = random.Random(seed)
        self.clock = FakeClock()
        self.network = InprocNetwork(n + 1)  # rank n: the supervisor
        options = localrref.RpcBackendOptions(rpc_timeout=rpc_timeout)
        self.agents = [Agent(rank=r, world_size=n, name=f"worker{r}", options=options,
                             transport=self.network.endpoint(r), rref_type=RRef,
                             clock=self.clock, driver=self) for r in range(n)]
        self.alive = set(range(n))
        self.dispatcher = ControlDispatcher(n, self._from_supervisor, clock=self.clock)
        self.steps = 0
        self.trace: list[int] = []  # the rank each delivery went to
        # Frames a test delays: delivered only when nothing else can be.
        self._late_pairs: set[tuple[int, int]] = set()
        self._late: list[tuple[int, int, bytes]] = []
        self.network.route = self._route

    # -- running ---------------------------------------------------------------

    def start(self) -> "AgentWorld":
        for agent in self.agents:
            with current.using(agent):
                agent.start(init_timeout=60.0)
        return self

    def say_hello(self) -> None:
        """Every agent says hello, without waiting for answers (a handshake a test steers)."""
        for agent in self.agents:
            agent.say_hello()

    def run_until(self, predicate, timeout: float | None = None, what: str = "") -> bool:
        """Deliver frames and move time until ``predicate()``; False if ``timeout`` passed."""
        deadline = None if timeout is None else self.clock.now + timeout
        while not predicate():
            if self._deliver_one():
                continue
            wake_at = self._next_deadline()
            if deadline is not None and (wake_at is None or wake_at > deadline):
                self.clock.now = max(self.clock.now, deadline)
                self._tick()
                return bool(predicate())
            if wake_at is None:
                raise Stuck(f"nothing can happen, yet still waiting for {what or predicate}")
            self.clock.now = max(self.clock.now, wake_at)
            self._tick()
        return True

    def settle(self, *, late: bool = False) -> None:
        """Deliver every frame there is, the delayed ones too if ``late`` (no time passes)."""
        while self._deliver_one(late=late):
            pass

    def _deliver_one(self, *, late: bool = True) -> bool:
        ready = [r for r in range(self.n + 1) if self.network.pending(r)]
        if not ready:
            for rank in self.alive:
                self.agents[rank].housekeeper.take_releases_if_any()
            ready = [r for r in range(self.n + 1) if self.network.pending(r)]
        if not ready and late and self._late:
            src, dst, frame = self._late.pop(0)
            self.network.put(src, dst, frame, routed=False)
            ready = [dst]
        if not ready:
            return False
        rank = self.rng.choice(ready)
        self.steps += 1
        self.trace.append(rank)
        if rank == self.n:
            src, frame = self.network.take(rank)
            self.dispatcher.dispatch(src, wire.decode_control(frame))
            return True
        agent = self.agents[rank]
        with current.using(agent):
            agent.reader.step()
        return True

    def _next_deadline(self) -> float | None:
        times = [t for r in self.alive
                 if (t := self.agents[r].housekeeper.next_deadline()) is not None]
        machines = [a.shutdown.machine for a in self.agents if a.shutdown.machine is not None]
        times += [m.deadline for m in machines if not m.done]
        if self.dispatcher.deadline is not None:
            times.append(self.dispatcher.deadline)
        return min(times) if times else None

    def _tick(self) -> None:
        for rank in sorted(self.alive):
            agent = self.agents[rank]
            with current.using(agent):
                agent.housekeeper.pass_()
        self.dispatcher.check_deadline(self.clock.now)

    def _from_supervisor(self, rank: int, control) -> None:
        if rank in self.alive:
            self.network.put(self.n, rank, wire.encode_control(control))

    def _route(self, src: int, dst: int, frame: bytes) -> bool:
        if (src, dst) in self._late_pairs:
            self._late.append((src, dst, frame))
            return False
        return True

    # -- what a test does to the world ------------------------------------------

    def delay(self, src: int, dst: int) -> None:
        """Frames from ``src`` to ``dst`` arrive only when nothing else can happen."""
        self._late_pairs.add((src, dst))

    def kill(self, rank: int, exitcode: int = -9) -> None:
        """SIGKILL worker ``rank``: its inbox goes, the supervisor tells the others."""
        self._depart(rank, PeerExited(rank=rank, pid=10_000 + rank, exitcode=exitcode), exitcode)

    def leave_formed(self, rank: int) -> None:
        """Worker ``rank``, whose init_rpc returned, calls shutdown(graceful=False) and
        leaves, as a rendezvous supervisor reports it (``PeerExited.formed``)."""
        self._depart(rank, PeerExited(rank=rank, pid=10_000 + rank, exitcode=None, left=True,
                                      formed=True), None)

    def _depart(self, rank: int, notice: PeerExited, exitcode: int | None) -> None:
        self.alive.discard(rank)
        self.network.kill(rank)
        self.dispatcher.on_worker_exit(rank, exitcode)
        for other in sorted(self.alive):
            self._from_supervisor(other, notice)

    def shutdown(self, timeout: float = 30.0) -> list[list[dict]]:
        """Graceful shutdown on every live worker at once; their leak records."""
        live = [self.agents[r] for r in sorted(self.alive)]
        for agent in live:
            with current.using(agent):
                agent.shutdown.begin(timeout)
        self.run_until(lambda: all([a.shutdown.advance() for a in live]), None,
                       "every worker's graceful shutdown")
        for agent in live:
            if agent.shutdown.error is not None:
                raise agent.shutdown.error
        return [a.shutdown.leaks for a in live]

    def close(self) -> None:
        for agent in self.agents:
            agent.close()

    def __enter__(self) -> "AgentWorld":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
