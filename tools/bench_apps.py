"""Whole programs, side by side: localrref against torch.distributed.rpc (TensorPipe).

    python tools/bench_apps.py --repeat 3 --markdown
    python tools/bench_apps.py --apps rl,ps --world-sizes 3 --scale 0.2   # a quick look

The programs are the ones torch's RPC tutorials teach, written once against
an ``rpc`` module (``rpc = torch.distributed.rpc`` or ``localrref``):

* ``rl``: an agent holds RRefs to N-1 observers and drives episodes through
  the RRef proxies; every observer calls the agent back, through a proxy,
  for each action and each reward (``rpc_sync().select_action``,
  ``rpc_sync().report_reward``); REINFORCE after each episode.
* ``batch_rl``: the same, but the agent picks actions for all observers at
  once: ``select_action`` is an ``@async_execution`` method that swaps a
  future under a lock when the last observer of a step has asked.
* ``ps``: a synchronous parameter server: each of N-1 trainers fetches the
  model, computes the gradients of a small MLP and pushes them to an
  ``@async_execution`` method that averages a step's gradients, updates the
  model and answers every trainer with it.
* ``ps_big``: the same with about 68 MiB of parameters.
* ``split``: a model split across workers, trained with distributed
  autograd and ``DistributedOptimizer`` (torch's pipeline tutorial): one
  stage per worker 1..N-1, a ``Linear`` + ``ReLU`` each, chained through
  RRefs (``stage.remote().forward(rref)``, each stage fetching its input
  with ``to_here()``), the head and the loss on the driver; about 100 k
  parameters in all.
* ``split_big``: the same with 64 MiB of parameters.

Each runs at each world size, R times per backend, alternating (torch,
localrref, localrref, torch, ...), in a fresh world each time. Reported, as
medians over the R runs: steps per second (environment steps, or trainer
steps), the CPU seconds per step of the driver (rank 0) and of the other
processes (user + system, all their threads), the minor page faults per
step of all processes together, and where the wall time of a step goes (the
client side of the calls, and local compute).

Page faults are where programs that allocate big tensors every step lose
time to the allocator rather than to RPC: a fresh gradient of 32 MiB costs
8,192 faults, several milliseconds of system time, on either engine.

Where the time goes in one step, across processes: ``BENCH_APPS_TIMELINE=<dir>``
records a timeline of the measured run in every localrref worker, and
``tools/timeline.py <dir> --phase ...`` prints it (see there);
``BENCH_APPS_PROFILE=<dir>`` writes a yappi profile of each process.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass

import torch
# localrref.functions.async_execution is this very decorator.
from torch.distributed.rpc.functions import async_execution

APPS = ("rl", "batch_rl", "ps", "ps_big", "split", "split_big")
BACKENDS = ("torch", "localrref")


# ----------------------------------------------------------------------- plumbing

@dataclass(frozen=True, slots=True)
class Plan:
    backend: str
    app: str
    world_size: int
    steps: int
    outdir: str
    port: int


def _rpc(backend: str):
    if backend == "torch":
        import torch.distributed.rpc as rpc
        return rpc
    import localrref
    return localrref


def _split_api(backend: str):
    """(autograd module, DistributedOptimizer) of ``backend``."""
    if backend == "torch":
        import torch.distributed.autograd as autograd
        from torch.distributed.optim import DistributedOptimizer
        return autograd, DistributedOptimizer
    import localrref.autograd as autograd
    from localrref.optim import DistributedOptimizer
    return autograd, DistributedOptimizer


RPC = None  # the module under test, in every worker
TIMELINE = None  # tools/timeline.py, in every localrref worker when BENCH_APPS_TIMELINE is set


def _name(rank: int) -> str:
    return f"worker{rank}"


class Phases:
    """Seconds spent per phase in this process (threads add up)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.seconds: dict[str, float] = {}

    def add(self, phase: str, seconds: float) -> None:
        with self._lock:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds


PHASES = Phases()


class timed:
    __slots__ = ("phase", "start")

    def __init__(self, phase: str) -> None:
        self.phase = phase

    def __enter__(self):
        if TIMELINE is not None:
            TIMELINE.event("T>", self.phase.replace(" ", "_"))
        self.start = time.perf_counter()

    def __exit__(self, *exc):
        PHASES.add(self.phase, time.perf_counter() - self.start)
        if TIMELINE is not None:
            TIMELINE.event("T<", self.phase.replace(" ", "_"))


_MARKS: dict[str, tuple[float, int]] = {}


def reset_phases() -> None:
    PHASES.seconds.clear()


def mark(label: str) -> None:
    """Record this process's CPU time (all threads) and page faults under ``label``."""
    _MARKS[label] = (time.process_time(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt)


def report() -> dict:
    (cpu0, faults0), (cpu1, faults1) = _MARKS.get("start", (0.0, 0)), _MARKS.get("end", (0.0, 0))
    return {"cpu_s": cpu1 - cpu0, "faults": faults1 - faults0, "phases": dict(PHASES.seconds)}


def _entry(rank: int, plan: Plan) -> None:
    global RPC, TIMELINE
    torch.set_num_threads(1)
    RPC = _rpc(plan.backend)
    if os.environ.get("BENCH_APPS_TIMELINE") and plan.backend == "localrref":
        import timeline
        timeline.install()
        TIMELINE = timeline
    if plan.backend == "torch":
        options = RPC.TensorPipeRpcBackendOptions(init_method=f"tcp://127.0.0.1:{plan.port}",
                                                  num_worker_threads=16, rpc_timeout=300)
        RPC.init_rpc(_name(rank), rank=rank, world_size=plan.world_size,
                     rpc_backend_options=options)
    else:
        RPC.init_rpc(_name(rank), rank=rank, world_size=plan.world_size,
                     rpc_backend_options=RPC.RpcBackendOptions(rpc_timeout=300))
    if rank == 0:
        result = DRIVERS[plan.app](plan)
        with open(os.path.join(plan.outdir, "result.json"), "w") as f:
            json.dump(result, f)
    RPC.shutdown()


def _on_all(plan: Plan, fn, *args) -> list:
    futures = [RPC.rpc_async(_name(r), fn, args=args) for r in range(1, plan.world_size)]
    return [fn(*args)] + [f.wait() for f in futures]


def profile(action: str) -> None:
    """With BENCH_APPS_PROFILE=<dir>: yappi over every thread of this process
    during the measured run, written to <dir>/rank<k>.txt (for where the CPU goes)."""
    out = os.environ.get("BENCH_APPS_PROFILE")
    if not out:
        return
    import yappi
    if action == "start":
        yappi.set_clock_type("cpu")
        yappi.start()
        return
    yappi.stop()
    stats = yappi.get_func_stats()
    stats.sort("ttot")
    rank = RPC.get_worker_info().id
    with open(os.path.join(out, f"rank{rank}.txt"), "w") as f:
        for s in list(stats)[:80]:
            f.write(f"{s.ttot * 1e3:10.1f} ms {s.tsub * 1e3:10.1f} ms {s.ncall:8d} "
                    f"{s.module.split('/')[-1]}:{s.name}\n")


def record_timeline(action: str) -> None:
    """With BENCH_APPS_TIMELINE=<dir> (localrref only): this process's timeline
    of the measured run, written to <dir>/rank<k>.txt (see tools/timeline.py)."""
    if TIMELINE is None:
        return
    if action == "start":
        TIMELINE.start()
        return
    TIMELINE.stop()
    rank = RPC.get_worker_info().id
    TIMELINE.write(os.path.join(os.environ["BENCH_APPS_TIMELINE"], f"rank{rank}.txt"))


def _measure(plan: Plan, run, steps_of) -> dict:
    """Warm up, then time ``run()`` with every process's CPU marked around it."""
    run(warmup=True)
    _on_all(plan, reset_phases)
    _on_all(plan, mark, "start")
    _on_all(plan, profile, "start")
    _on_all(plan, record_timeline, "start")
    started = time.perf_counter()
    run(warmup=False)
    wall = time.perf_counter() - started
    _on_all(plan, record_timeline, "stop")
    _on_all(plan, profile, "stop")
    _on_all(plan, mark, "end")
    reports = _on_all(plan, report)
    steps = steps_of()
    return {"steps": steps, "wall_s": wall, "steps_per_s": steps / wall,
            "cpu_per_step_driver_ms": 1000 * reports[0]["cpu_s"] / steps,
            "cpu_per_step_others_ms": 1000 * sum(r["cpu_s"] for r in reports[1:]) / steps,
            "faults_per_step": sum(r["faults"] for r in reports) / steps,
            "phases_per_step_us": _phases_per_step(reports, steps)}


def _phases_per_step(reports: list[dict], steps: int) -> dict:
    total: dict[str, float] = {}
    for rep in reports:
        for phase, seconds in rep["phases"].items():
            total[phase] = total.get(phase, 0.0) + seconds
    return {phase: 1e6 * seconds / steps for phase, seconds in sorted(total.items())}


# ----------------------------------------------------------------------- RL (1) and (2)

class Policy(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.affine1 = torch.nn.Linear(4, 128)
        self.affine2 = torch.nn.Linear(128, 2)

    def forward(self, x):
        return torch.softmax(self.affine2(torch.relu(self.affine1(x))), dim=-1)


class DummyEnv:
    """CartPole's shapes without gym: a state of 4 floats, reward 1 per step."""

    def __init__(self, seed: int) -> None:
        self.gen = torch.Generator().manual_seed(seed)
        self.state = torch.zeros(4)

    def reset(self):
        self.state = torch.randn(4, generator=self.gen) * 0.05
        return self.state

    def step(self, action: int):
        push = 0.02 if action else -0.02
        self.state = self.state * 0.99 + push + torch.randn(4, generator=self.gen) * 0.01
        return self.state, 1.0


class Observer:
    def __init__(self) -> None:
        self.id = RPC.get_worker_info().id
        self.env = DummyEnv(self.id)

    def run_episode(self, agent_rref, n_steps: int) -> int:
        state = self.env.reset()
        for _ in range(n_steps):
            with timed("observer: select_action call"):
                action = agent_rref.rpc_sync().select_action(self.id, state)
            with timed("observer: env step"):
                state, reward = self.env.step(action)
            with timed("observer: report_reward call"):
                agent_rref.rpc_sync().report_reward(self.id, reward)
        return n_steps


class Agent:
    def __init__(self, world_size: int) -> None:
        torch.manual_seed(0)
        self.ob_rrefs = [RPC.remote(_name(r), Observer) for r in range(1, world_size)]
        self.agent_rref = RPC.RRef(self)
        self.policy = Policy()
        self.optimizer = torch.optim.Adam(self.policy.parameters(), lr=1e-2)
        self.lock = threading.Lock()
        self.saved_log_probs: dict[int, list] = {r: [] for r in range(1, world_size)}
        self.rewards: dict[int, list] = {r: [] for r in range(1, world_size)}
        self.steps = 0

    def select_action(self, ob_id: int, state):
        with timed("agent: policy"):
            probs = self.policy(state.unsqueeze(0))
            m = torch.distributions.Categorical(probs)
            action = m.sample()
        self.saved_log_probs[ob_id].append(m.log_prob(action))
        return action.item()

    def report_reward(self, ob_id: int, reward: float) -> None:
        self.rewards[ob_id].append(reward)

    def run_episode(self, n_steps: int) -> None:
        futures = [ob.rpc_async().run_episode(self.agent_rref, n_steps) for ob in self.ob_rrefs]
        self.steps += sum(torch.futures.wait_all(futures))

    def finish_episode(self) -> None:
        with timed("agent: REINFORCE update"):
            loss = []
            for ob_id in self.rewards:
                returns, R = [], 0.0
                for r in reversed(self.rewards[ob_id]):
                    R = r + 0.99 * R
                    returns.insert(0, R)
                returns = torch.tensor(returns)
                returns = (returns - returns.mean()) / (returns.std() + 1e-6)
                loss += [-lp * ret for lp, ret in zip(self.saved_log_probs[ob_id], returns)]
                self.saved_log_probs[ob_id].clear()
                self.rewards[ob_id].clear()
            self.optimizer.zero_grad()
            torch.cat(loss).sum().backward()
            self.optimizer.step()


class BatchAgent(Agent):
    """The agent of torch's batch-RL tutorial: one policy pass for every observer."""

    def __init__(self, world_size: int) -> None:
        super().__init__(world_size)
        self.n_obs = world_size - 1
        self.pending = self.n_obs
        self.states = torch.zeros(self.n_obs, 4)
        self.future_actions = torch.futures.Future()

    @async_execution
    def select_action(self, ob_id: int, state):
        index = ob_id - 1
        self.states[index].copy_(state)
        answer = self.future_actions.then(lambda fut: int(fut.wait()[index]))
        with self.lock:
            self.pending -= 1
            if self.pending == 0:
                self.pending = self.n_obs
                with timed("agent: batched policy"):
                    probs = self.policy(self.states)
                    m = torch.distributions.Categorical(probs)
                    actions = m.sample()
                    log_probs = m.log_prob(actions)
                for i in range(self.n_obs):
                    self.saved_log_probs[i + 1].append(log_probs[i:i + 1])
                # The policy saved these states for the backward pass: the next
                # step's go into a new tensor.
                self.states = torch.zeros_like(self.states)
                ready, self.future_actions = self.future_actions, torch.futures.Future()
                ready.set_result(actions)
        return answer


def _rl_driver(agent_type):
    def drive(plan: Plan) -> dict:
        agent = agent_type(plan.world_size)
        episode_steps = 50

        def run(warmup: bool) -> None:
            episodes = 2 if warmup else max(1, plan.steps // episode_steps)
            if not warmup:
                agent.steps = 0
            for _ in range(episodes):
                agent.run_episode(episode_steps)
                agent.finish_episode()

        result = _measure(plan, run, lambda: agent.steps)
        agent.ob_rrefs.clear()
        agent.agent_rref = None  # it points back at the agent: a cycle
        return result
    return drive


# ----------------------------------------------------------------------- PS (3) and (4)

def _mlp(big: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    if big:  # 68.0 MiB of float32 parameters
        return torch.nn.Sequential(torch.nn.Linear(1024, 4096), torch.nn.ReLU(),
                                   torch.nn.Linear(4096, 3072), torch.nn.ReLU(),
                                   torch.nn.Linear(3072, 10))
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(),
                               torch.nn.Linear(64, 10))


class BatchUpdateParameterServer:
    """torch's batch-updating parameter server tutorial."""

    def __init__(self, batch_update_size: int, big: bool) -> None:
        self.model = _mlp(big)
        self.lock = threading.Lock()
        self.future_model = torch.futures.Future()
        self.batch_update_size = batch_update_size
        self.curr_update_size = 0
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.001, momentum=0.9)
        for p in self.model.parameters():
            p.grad = torch.zeros_like(p)

    def get_model(self):
        return self.model

    @staticmethod
    @async_execution
    def update_and_fetch_model(ps_rref, grads):
        self = ps_rref.local_value()
        with self.lock:
            self.curr_update_size += 1
            for p, g in zip(self.model.parameters(), grads):
                p.grad += g
            fut = self.future_model
            if self.curr_update_size >= self.batch_update_size:
                with timed("ps: optimizer step"):
                    for p in self.model.parameters():
                        p.grad /= self.batch_update_size
                    self.curr_update_size = 0
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=False)
                fut.set_result(self.model)
                self.future_model = torch.futures.Future()
        return fut


class Trainer:
    def __init__(self, ps_rref, big: bool) -> None:
        self.ps_rref = ps_rref
        self.loss_fn = torch.nn.MSELoss()
        self.in_features = 1024 if big else 32
        self.steps = 0

    def train(self, n_steps: int) -> int:
        with timed("trainer: fetch model"):
            model = self.ps_rref.rpc_sync().get_model()
        for _ in range(n_steps):
            with timed("trainer: forward and backward"):
                inputs = torch.randn(16, self.in_features)
                labels = torch.randn(16, 10)
                self.loss_fn(model(inputs), labels).backward()
                grads = [p.grad for p in model.parameters()]
            with timed("trainer: push gradients, get the model"):
                model = RPC.rpc_sync(self.ps_rref.owner(),
                                     BatchUpdateParameterServer.update_and_fetch_model,
                                     args=(self.ps_rref, grads))
        return n_steps


def _ps_driver(big: bool):
    def drive(plan: Plan) -> dict:
        n_trainers = plan.world_size - 1
        ps_rref = RPC.RRef(BatchUpdateParameterServer(n_trainers, big))
        trainers = [RPC.remote(_name(r), Trainer, args=(ps_rref, big))
                    for r in range(1, plan.world_size)]
        done = [0]

        def run(warmup: bool) -> None:
            steps = 2 if warmup else plan.steps
            futures = [t.rpc_async().train(steps) for t in trainers]
            total = sum(torch.futures.wait_all(futures))
            if not warmup:
                done[0] = total

        result = _measure(plan, run, lambda: done[0])
        del ps_rref, trainers
        return result
    return drive


# ----------------------------------------------------------------------- split model (5)

SPLIT_PARAMS = {False: 100_000, True: 16 * 1024 * 1024}  # float32: 64 MiB for the big one
SPLIT_BATCH = 32


class Stage(torch.nn.Module):
    """One stage of the pipeline tutorial: it fetches its input from an RRef."""

    def __init__(self, width: int, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.linear = torch.nn.Linear(width, width)

    def forward(self, x_rref):
        return torch.relu(self.linear(x_rref.to_here()))


def _param_rrefs(module_rref) -> list:
    return [RPC.RRef(p) for p in module_rref.local_value().parameters()]


def _split_driver(big: bool):
    def drive(plan: Plan) -> dict:
        autograd, DistributedOptimizer = _split_api(plan.backend)
        n_stages = plan.world_size - 1
        width = int((SPLIT_PARAMS[big] / n_stages) ** 0.5)
        stages = [RPC.remote(_name(r), Stage, args=(width, r)) for r in range(1, plan.world_size)]
        torch.manual_seed(0)
        head = torch.nn.Linear(width, 10)
        params = [RPC.RRef(p) for p in head.parameters()]
        for stage in stages:
            params += RPC.rpc_sync(stage.owner(), _param_rrefs, args=(stage,))
        optimizer = DistributedOptimizer(torch.optim.SGD, params, lr=0.01)
        done = [0]

        def step() -> None:
            x = torch.randn(SPLIT_BATCH, width)
            y = torch.randn(SPLIT_BATCH, 10)
            with autograd.context() as context_id:
                with timed("driver: forward through the stages"):
                    ref = RPC.RRef(x)
                    for stage in stages[:-1]:
                        ref = stage.remote().forward(ref)
                    out = stages[-1].rpc_sync().forward(ref)
                    loss = torch.nn.functional.mse_loss(head(out), y)
                with timed("driver: distributed backward"):
                    autograd.backward(context_id, [loss])
                with timed("driver: optimizer step"):
                    optimizer.step(context_id)

        def run(warmup: bool) -> None:
            steps = 2 if warmup else plan.steps
            for _ in range(steps):
                step()
            if not warmup:
                done[0] = steps

        result = _measure(plan, run, lambda: done[0])
        del stages, params, optimizer
        return result
    return drive


DRIVERS = {"rl": _rl_driver(Agent), "batch_rl": _rl_driver(BatchAgent),
           "ps": _ps_driver(False), "ps_big": _ps_driver(True),
           "split": _split_driver(False), "split_big": _split_driver(True)}
# Steps per measured run at scale 1: about 5-20 s of torch on 2 cores.
STEPS = {"rl": 2000, "batch_rl": 2000, "ps": 600, "ps_big": 40, "split": 600, "split_big": 60}


# ----------------------------------------------------------------------- the parent

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_one(backend: str, app: str, world_size: int, steps: int) -> dict:
    outdir = tempfile.mkdtemp(prefix=f"bench-apps-{backend}-")
    plan = Plan(backend=backend, app=app, world_size=world_size, steps=steps, outdir=outdir,
                port=_free_port())
    started = time.monotonic()
    try:
        if backend == "torch":
            import torch.multiprocessing as mp
            os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(plan.port)
            mp.start_processes(_entry, args=(plan,), nprocs=world_size, join=True,
                               start_method="spawn")
        else:
            import localrref
            localrref.spawn(_entry, args=(plan,), nprocs=world_size)
        with open(os.path.join(outdir, "result.json")) as f:
            result = json.load(f)
    finally:
        shutil.rmtree(outdir, ignore_errors=True)
    result["world_s"] = time.monotonic() - started
    return result


def _median(results: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in results)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--apps", default=",".join(APPS))
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--world-sizes", default="3,5")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every step count")
    parser.add_argument("--json", help="also write every number to this file")
    parser.add_argument("--markdown", action="store_true", help="print a README table")
    args = parser.parse_args(argv)
    apps = [a for a in args.apps.split(",") if a]
    backends = [b for b in args.backends.split(",") if b]
    sizes = [int(n) for n in args.world_sizes.split(",")]
    results: dict = {}
    for app in apps:
        for size in sizes:
            steps = max(4, int(STEPS[app] * args.scale))
            for i in range(args.repeat):
                order = backends if i % 2 == 0 else backends[::-1]
                for backend in order:
                    res = run_one(backend, app, size, steps)
                    results.setdefault((app, size, backend), []).append(res)
                    print(f"[{app} x{size}] {backend}: {res['steps_per_s']:.1f} steps/s, "
                          f"cpu/step driver {res['cpu_per_step_driver_ms']:.2f} ms, others "
                          f"{res['cpu_per_step_others_ms']:.2f} ms, page faults/step "
                          f"{res['faults_per_step']:,.0f}", file=sys.stderr,
                          flush=True)
    rows = []
    for app in apps:
        for size in sizes:
            row = {"app": app, "world_size": size}
            for backend in backends:
                runs = results.get((app, size, backend), [])
                if not runs:
                    continue
                row[backend] = {
                    "steps_per_s": _median(runs, "steps_per_s"),
                    "spread": (max(r["steps_per_s"] for r in runs)
                               - min(r["steps_per_s"] for r in runs))
                    / _median(runs, "steps_per_s"),
                    "cpu_per_step_driver_ms": _median(runs, "cpu_per_step_driver_ms"),
                    "cpu_per_step_others_ms": _median(runs, "cpu_per_step_others_ms"),
                    "faults_per_step": _median(runs, "faults_per_step"),
                    "phases_per_step_us": runs[len(runs) // 2]["phases_per_step_us"],
                }
            if "torch" in row and "localrref" in row:
                row["ratio"] = row["localrref"]["steps_per_s"] / row["torch"]["steps_per_s"]
            rows.append(row)
    for row in rows:
        print(f"\n{row['app']} x{row['world_size']}" + (
            f": localrref/torch {row['ratio']:.2f}x" if "ratio" in row else ""))
        for backend in backends:
            if backend in row:
                r = row[backend]
                print(f"  {backend:9s} {r['steps_per_s']:9.1f} steps/s (spread {r['spread']:.0%})"
                      f"  cpu/step: driver {r['cpu_per_step_driver_ms']:.2f} ms, others "
                      f"{r['cpu_per_step_others_ms']:.2f} ms; page faults/step, all "
                      f"processes: {r['faults_per_step']:,.0f}")
                for phase, us in r["phases_per_step_us"].items():
                    print(f"      {phase:45s} {us:10.1f} us/step")
    if args.markdown:
        print("\n| program | workers | torch steps/s | localrref steps/s | localrref/torch |"
              " CPU ms/step, torch | CPU ms/step, localrref | page faults/step, torch |"
              " page faults/step, localrref |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for row in rows:
            if "ratio" not in row:
                continue
            t, lo = row["torch"], row["localrref"]
            print(f"| {row['app']} | {row['world_size']} | {t['steps_per_s']:,.1f} | "
                  f"{lo['steps_per_s']:,.1f} | {row['ratio']:.2f}x | "
                  f"{t['cpu_per_step_driver_ms'] + t['cpu_per_step_others_ms']:.2f} | "
                  f"{lo['cpu_per_step_driver_ms'] + lo['cpu_per_step_others_ms']:.2f} | "
                  f"{t['faults_per_step']:,.0f} | {lo['faults_per_step']:,.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"argv": sys.argv, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
