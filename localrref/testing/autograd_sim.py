"""A seeded simulator of distributed autograd's bookkeeping (``core.dist_autograd``) on N workers.

Like :mod:`simnet` for the RRef protocol: every worker is a real
:class:`~localrref.core.dist_autograd.AutogradContexts`, the network is a bag
of in-flight messages, and one ``random.Random(seed)`` decides what happens
next, so any failure replays from its seed.

The forward pass is scripted: a context is opened on worker 0, then a random
sequence of RPCs carries tensors requiring grad between workers (a send on
the sender, a recv on the receiver, delivered like any message, so it may
arrive after the context's cleanup). A local gradient pass is modelled by
reachability: the roots reach some of worker 0's recvs; a pass from send
``m`` reaches some recvs of its worker that happened before ``m``, so the
distributed graph is acyclic as a real forward pass makes it. Passes run at
random times and may fail; messages are reordered, duplicated and delayed;
a worker may die.

Invariants, checked after every step and at the end:

* every propagation of gradients is applied once, whatever is duplicated;
* ``backward`` completes exactly once, and, when it succeeds, only after
  every pass it caused has finished and every answer arrived;
* a failure anywhere (a pass that raises, a dead worker) fails ``backward``;
* after the context is released and the network drained, no worker holds it,
  and no worker that learns of it late re-creates it.
"""

from __future__ import annotations

import dataclasses

import random
from dataclasses import dataclass, field

from ..core import dist_autograd as da

__all__ = ["AutogradSim", "SimConfig", "InvariantViolation"]


class InvariantViolation(AssertionError):
    pass


@dataclass(frozen=True, slots=True)
class SimConfig:
    workers: int = 3
    rpcs: int = 8               # forward RPCs carrying tensors that require grad
    duplicate: float = 0.2      # chance a message is delivered twice
    fail_pass: float = 0.0      # chance a local pass raises
    kill: bool = False          # kill one worker (not 0) at a random step
    late_forward: float = 0.3   # chance a forward RPC is left in flight (it may land after the release)


@dataclass(frozen=True, slots=True)
class _Forward:
    """The recv side of a forward RPC, in flight."""

    context_id: int
    src: int
    message_id: int


@dataclass(slots=True)
class _World:
    alive: set[int]
    # (worker, message id of a send) -> recv message ids its pass reaches
    reach: dict[tuple[int, int], list[int]] = field(default_factory=dict)
    recv_src: dict[tuple[int, int], int] = field(default_factory=dict)
    recvs_seen: dict[int, list[int]] = field(default_factory=dict)  # worker -> recvs in order


class AutogradSim:
    def __init__(self, seed: int, config: SimConfig = SimConfig()) -> None:
        self.rng = random.Random(seed)
        self.seed = seed
        self.config = config
        n = config.workers
        self.workers = [da.AutogradContexts(w, n) for w in range(n)]
        self.world = _World(alive=set(range(n)))
        self.network: list[tuple[int, int, object]] = []   # (src, dst, message)
        self.pending_passes: list[tuple[int, da.RunPass]] = []
        self.applied: dict[int, int] = {}                  # propagation id -> times applied
        self.propagation_context: dict[int, int] = {}
        self.done: list[da.BackwardDone] = []
        self.released: set[int] = set()
        self.context_id: int | None = None
        self.failed_a_pass = False
        self.killed: int | None = None
        self.late: list[tuple[int, int, object]] = []

    # ------------------------------------------------------------ driving

    def _drain_effects(self, worker: int) -> None:
        for effect in self.workers[worker].take_effects():
            match effect:
                case da.SendMessage(dst=dst, message=message):
                    if isinstance(message, da.PropagateGradients):
                        self.propagation_context[message.propagation_id] = message.context_id
                    self._send(worker, dst, message)
                case da.RunPass():
                    self.pending_passes.append((worker, effect))
                case da.BackwardDone():
                    self._on_backward_done(worker, effect)
                case da.ContextReleased():
                    pass
                case _:
                    raise InvariantViolation(f"unknown effect {effect!r}")

    def _send(self, src: int, dst: int, message: object) -> None:
        copies = 2 if self.rng.random() < self.config.duplicate else 1
        for _ in range(copies):
            self.network.append((src, dst, message))

    def _on_backward_done(self, worker: int, done: da.BackwardDone) -> None:
        if any(d.token == done.token for d in self.done):
            raise InvariantViolation(f"backward {done.token} completed twice (seed {self.seed})")
        self.done.append(done)
        if done.error is None:
            busy = [p for w, p in self.pending_passes if p.context_id == self.context_id]
            # A duplicate of a propagation already applied is harmless: it
            # gets the same answer, which nobody waits for any more.
            flying = [m for src, _, m in self.network
                      if isinstance(m, da.PropagateGradients)
                      and m.context_id == self.context_id
                      and (src, m.propagation_id) not in self.applied]
            if busy or flying:
                raise InvariantViolation(
                    f"backward completed while passes {busy} / propagations {flying} were "
                    f"still to run (seed {self.seed})")

    def _run_pass(self, worker: int, run: da.RunPass) -> None:
        if worker not in self.world.alive:
            return
        match run.start:
            case da.FromRoots():
                reached = self.world.reach.get((worker, -1), [])
            case da.FromSend(message_id=message_id):
                # grads carry the propagation id so the simulator can count applications
                propagation_id = run.start.grads
                self.applied[propagation_id] = self.applied.get(propagation_id, 0) + 1
                if self.applied[propagation_id] > 1:
                    raise InvariantViolation(
                        f"propagation {propagation_id} applied twice (seed {self.seed})")
                reached = self.world.reach.get((worker, message_id), [])
        if self.rng.random() < self.config.fail_pass:
            self.failed_a_pass = True
            self.workers[worker].pass_finished(run.pass_id, error="a pass raised")
        else:
            outgoing = []
            for recv in reached:
                src = self.world.recv_src[(worker, recv)]
                outgoing.append(da.Outgoing(src=src, message_id=recv, grads=None))
            self.workers[worker].pass_finished(run.pass_id, tuple(outgoing))
        self._drain_effects(worker)

    def _deliver(self, index: int) -> None:
        src, dst, message = self.network.pop(index)
        if dst not in self.world.alive:
            return
        if isinstance(message, _Forward):
            joined = self.workers[dst].record_recv(message.context_id, message.src,
                                                   message.message_id)
            if joined:
                self.world.recvs_seen.setdefault(dst, []).append(message.message_id)
                self.world.recv_src[(dst, message.message_id)] = message.src
            return
        if isinstance(message, da.PropagateGradients):
            # Stamp the propagation id into grads: what _run_pass counts.
            message = dataclasses.replace(message, grads=(src, message.propagation_id))
        self.workers[dst].on_message(src, message)
        self._drain_effects(dst)

    def _kill(self, worker: int) -> None:
        self.killed = worker
        self.world.alive.discard(worker)
        self.network = [(s, d, m) for s, d, m in self.network if s != worker and d != worker]
        self.pending_passes = [(w, p) for w, p in self.pending_passes if w != worker]
        for other in sorted(self.world.alive):
            self.workers[other].worker_died(worker)
            self._drain_effects(other)

    def step(self) -> bool:
        """Do one thing; False when nothing is left to do."""
        choices = []
        if self.network:
            choices.append("deliver")
        if self.pending_passes:
            choices.append("pass")
        if not choices:
            return False
        if self.rng.choice(choices) == "deliver":
            self._deliver(self.rng.randrange(len(self.network)))
        else:
            worker, run = self.pending_passes.pop(self.rng.randrange(len(self.pending_passes)))
            self._run_pass(worker, run)
        return True

    def drain(self, kill_at: int | None = None) -> None:
        for count in range(100_000):
            if kill_at is not None and count == kill_at and self.killed is None:
                self._kill(self.rng.randrange(1, self.config.workers))
            if not self.step():
                return
        raise InvariantViolation(f"no quiescence after 100000 steps (seed {self.seed})")

    # ------------------------------------------------------------ the scenario

    def run(self) -> None:
        """Forward, backward, release; check every invariant."""
        cfg, rng = self.config, self.rng
        root = self.workers[0]
        context_id = self.context_id = root.new_context()
        holders = {0}  # workers the forward pass has reached: they may call on
        sends: list[tuple[int, int]] = []
        for _ in range(cfg.rpcs):
            src = rng.choice(sorted(holders))
            dst = rng.choice([w for w in range(cfg.workers) if w != src])
            if not self.workers[src].has_context(context_id):
                continue
            message_id = self.workers[src].record_send(context_id, dst)
            earlier = list(self.world.recvs_seen.get(src, []))
            self.world.reach[(src, message_id)] = rng.sample(earlier, rng.randint(0, len(earlier)))
            sends.append((src, message_id))
            # A synchronous call lands before the script goes on; a late one
            # (an rpc_async nobody waited for) is still in flight when the
            # context is released, and may land after its cleanup.
            if rng.random() < cfg.late_forward:
                self.late.append((src, dst, _Forward(context_id, src, message_id)))
                continue
            self._send(src, dst, _Forward(context_id, src, message_id))
            while self.network:
                self._deliver(0)
            holders.add(dst)
        recvs0 = list(self.world.recvs_seen.get(0, []))
        self.world.reach[(0, -1)] = rng.sample(recvs0, rng.randint(0, len(recvs0)))
        token = ("backward", self.seed)
        root.backward(context_id, token)
        self._drain_effects(0)
        self.drain(kill_at=rng.randrange(0, 40) if cfg.kill else None)
        self.check_backward(token)
        root.release_context(context_id)
        self._drain_effects(0)
        self.network.extend(m for m in self.late if m[1] in self.world.alive)
        self.drain()
        self.check_released(context_id)

    def check_backward(self, token) -> None:
        finished = [d for d in self.done if d.token == token]
        if len(finished) != 1:
            raise InvariantViolation(f"backward finished {len(finished)} times (seed {self.seed})")
        if (self.failed_a_pass or self.killed is not None) is False and finished[0].error:
            raise InvariantViolation(f"backward failed without a failure: {finished[0].error} "
                                     f"(seed {self.seed})")
        for propagation_id, times in self.applied.items():
            if times != 1:
                raise InvariantViolation(f"propagation {propagation_id} applied {times} times")

    def check_released(self, context_id: int) -> None:
        for worker in sorted(self.world.alive):
            if self.workers[worker].has_context(context_id):
                raise InvariantViolation(
                    f"worker {worker} still holds context {context_id} after its release "
                    f"(seed {self.seed})")
            info = self.workers[worker].debug_info()
            if info["num_autograd_contexts"] or info["num_current_backward_passes"]:
                raise InvariantViolation(f"worker {worker}: {info} (seed {self.seed})")
