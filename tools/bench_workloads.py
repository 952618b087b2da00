"""Worker side of ``tools/bench.py``: every workload, written once against an ``rpc`` module.

The same code runs on ``torch.distributed.rpc`` (TensorPipe on loopback) and on
``localrref``; the only backend-specific lines are in :func:`load_rpc`,
:func:`init_worker` and :func:`debug_counts`.

Data flow of one world::

    bench.py (parent)
      | spawn(entry, (WorldPlan,), nprocs)        torch.multiprocessing.spawn or localrref.spawn
      v
    worker k, k = 0 .. N-1 (main thread only, plus the backend's own threads)
      init_rpc -> ring warm-up (rpc_sync to worker k+1)
      rank 0 of a "main" world: runs the plan's workloads, calling the module-level
              functions below on worker1 / worker2; rewrites <outdir>/results.json
              after every row, so a crash later keeps the rows already measured
      every rank: shutdown() -> writes <outdir>/rank<k>.json (its monotonic timestamps)
      ^
      | the parent reads those files after spawn returns; time.monotonic() is
      | CLOCK_MONOTONIC, one clock for every process of the machine.

A worker that hangs is ended by a faulthandler watchdog (``WorldPlan.watchdog_s``):
it dumps every thread's stack to stderr and exits, and the launcher then reports
the world as failed instead of the benchmark sitting silent.
"""

from __future__ import annotations

import ctypes
import faulthandler
import json
import math
import os
import re
import sys
import threading
import time
import traceback
import warnings
from dataclasses import dataclass, field
from types import ModuleType

# At the top, as in the programs these workers stand for: a spawned worker
# imports this module (and so torch) before its entry function runs. Both
# backends' workers import torch anyway; under localrref that import runs
# with the collector paused (localrref/launch/paused_gc.py).
import torch

BACKENDS = ("torch", "localrref")
# Rows that run inside the long-lived 3-worker "main" world; "world" has worlds of its own.
IN_WORLD_GROUPS = ("idle", "sync", "async", "remote", "fork", "tensor_return", "tensor_arg")
MAIN_WORLD_SIZE = 3  # fork churn needs a creator (0), an owner (1) and a receiver (2)
_REMOTE_HEADER = re.compile(r"^(\w+: )?On (WorkerInfo\(|worker)")


@dataclass(frozen=True, slots=True, kw_only=True)
class Iterations:
    """How many samples each workload takes (bench.py scales these for --quick / --scale)."""

    warmup: int = 100
    sync: int = 3000
    async_calls: int = 20000
    async_window: int = 64
    remote: int = 1000
    fork: int = 1000
    # tensor size in bytes -> calls per direction; sizes not listed are skipped.
    tensor: dict[int, int] = field(default_factory=dict)
    idle_s: float = 2.0
    drain_timeout_s: float = 30.0


@dataclass(frozen=True, slots=True, kw_only=True)
class WorldPlan:
    """Everything a worker needs; pickled once per world by the launcher."""

    backend: str
    world_size: int
    outdir: str
    groups: tuple[str, ...] = ()        # workloads rank 0 runs; () for a start/shutdown world
    iters: Iterations = field(default_factory=Iterations)
    port: int = 0                       # TensorPipe rendezvous port (torch only)
    tp_transports: tuple[str, ...] = ()  # () keeps TensorPipe's own choice
    tp_channels: tuple[str, ...] = ()
    watchdog_s: float = 600.0

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; expected one of {BACKENDS}")
        unknown = set(self.groups) - set(IN_WORLD_GROUPS)
        if unknown:
            raise ValueError(f"groups {sorted(unknown)} do not run inside a world")
        if self.groups and self.world_size < MAIN_WORLD_SIZE:
            raise ValueError(f"workloads need {MAIN_WORLD_SIZE} workers, got {self.world_size}")


def worker_name(rank: int) -> str:
    return f"worker{rank}"


# ---------------------------------------------------------------------------------------------
# Backend seams: the only lines that know which rpc module is underneath.

def load_rpc(backend: str) -> ModuleType:
    """Import the module that plays ``torch.distributed.rpc`` for ``backend``."""
    if backend == "torch":
        import torch.distributed.rpc as rpc

        return rpc
    import localrref

    return localrref


def init_worker(rpc: ModuleType, plan: WorldPlan, rank: int) -> None:
    name = worker_name(rank)
    if plan.backend == "torch":
        extra = {}
        if plan.tp_transports:
            extra["_transports"] = list(plan.tp_transports)
        if plan.tp_channels:
            extra["_channels"] = list(plan.tp_channels)
        options = rpc.TensorPipeRpcBackendOptions(
            init_method=f"tcp://127.0.0.1:{plan.port}", num_worker_threads=16, **extra)
        rpc.init_rpc(name, rank=rank, world_size=plan.world_size, rpc_backend_options=options)
    else:
        rpc.init_rpc(name, rank=rank, world_size=plan.world_size)


def debug_counts(backend: str) -> dict[str, int]:
    """This worker's integer debug counters (num_owner_rrefs, num_forks, ...).

    Runs on the worker it describes (called through rpc_sync). On torch the agent's
    own ``get_debug_info()`` has only thread and call counts; the RRef tables
    (num_owner_rrefs, num_forks, num_pending_users) come from the RRef context, which
    ``torch.distributed.rpc._get_debug_info()`` merges in.
    """
    if backend == "torch":
        from torch.distributed import rpc

        info = dict(rpc._rref_context_get_debug_info())
        info.update(rpc.api._get_current_rpc_agent().get_debug_info())
    else:
        import localrref

        info = localrref.get_debug_info()
    return _int_entries(info)


def _int_entries(info: dict, prefix: str = "") -> dict[str, int]:
    out: dict[str, int] = {}
    for key, value in info.items():
        if isinstance(value, dict):
            out.update(_int_entries(value, f"{prefix}{key}."))
            continue
        try:
            out[f"{prefix}{key}"] = int(value)
        except (TypeError, ValueError):
            pass  # torch reports every counter as a string; anything else is not a counter
    return out


# ---------------------------------------------------------------------------------------------
# Functions executed on the callee. Module-level so both backends pickle them by name.

def noop() -> None:
    return None


def one() -> int:
    return 1


def drop_rref(rref) -> None:
    # The receiver's fork dies with this frame: that delete is the churn being measured.
    del rref


_SENT: dict[int, object] = {}   # nbytes -> tensor this worker returns, built once per size
_KEPT: list = []                # the tensor argument kept for the value-semantics check


def tensor_of(nbytes: int):

    tensor = _SENT.get(nbytes)
    if tensor is None:
        tensor = _SENT[nbytes] = torch.ones(nbytes, dtype=torch.uint8)
    return tensor


def take_tensor(tensor) -> int:
    return tensor.numel()


def sent_is_all(nbytes: int, value: int) -> bool:
    return bool((_SENT[nbytes] == value).all())


def fill_sent(nbytes: int, value: int) -> None:
    _SENT[nbytes].fill_(value)


def forget_sent() -> None:
    _SENT.clear()


def keep_tensor(tensor) -> None:
    _KEPT[:] = [tensor]


def kept_is_all(value: int) -> bool:
    return bool((_KEPT[0] == value).all())


def fill_kept(value: int) -> None:
    _KEPT[0].fill_(value)


def forget_kept() -> None:
    _KEPT.clear()


def idle_probe(seconds: float) -> dict[str, float]:
    """Thread count now, then this process's CPU use over ``seconds`` of doing nothing."""
    import psutil

    proc = psutil.Process()
    threads = proc.num_threads()
    before, t0 = proc.cpu_times(), time.monotonic()
    time.sleep(seconds)  # the idle window itself; nothing waits on it
    after, t1 = proc.cpu_times(), time.monotonic()
    used = (after.user - before.user) + (after.system - before.system)
    return {"threads": threads, "cpu_pct": 100.0 * used / (t1 - t0), "pid": proc.pid}


# ---------------------------------------------------------------------------------------------
# Workloads (run on rank 0). Each takes the rpc module and returns a JSON-able dict.

def percentile(samples: list[float], q: float) -> float:
    """Nearest-rank percentile: the smallest sample with at least q% of samples <= it."""
    if not samples:
        raise ValueError("percentile of no samples")
    ordered = sorted(samples)
    index = max(0, math.ceil(q / 100.0 * len(ordered)) - 1)
    return ordered[index]


def _timed_calls(call, count: int) -> list[float]:
    samples = []
    for _ in range(count):
        t0 = time.perf_counter()
        call()
        samples.append(time.perf_counter() - t0)
    return samples


def sync_latency(rpc: ModuleType, it: Iterations) -> dict:
    call = lambda: rpc.rpc_sync("worker1", noop)  # noqa: E731
    _timed_calls(call, it.warmup)
    samples = _timed_calls(call, it.sync)
    return {"p50_us": percentile(samples, 50) * 1e6, "p99_us": percentile(samples, 99) * 1e6,
            "calls": len(samples)}


def async_throughput(rpc: ModuleType, it: Iterations) -> dict:
    """Keep ``async_window`` rpc_async calls in flight until ``async_calls`` have completed."""
    slots = threading.Semaphore(it.async_window)
    errors: list[BaseException] = []

    def done(fut) -> None:
        try:
            fut.wait()
        except BaseException as exc:  # noqa: BLE001 -- reported below, whatever it is
            errors.append(exc)
        slots.release()

    def run(calls: int) -> float:
        t0 = time.perf_counter()
        for _ in range(calls):
            slots.acquire()
            rpc.rpc_async("worker1", noop).add_done_callback(done)
        for _ in range(it.async_window):  # drain: every slot back means every call finished
            slots.acquire()
        elapsed = time.perf_counter() - t0
        for _ in range(it.async_window):
            slots.release()
        return elapsed

    run(min(it.async_calls, max(it.warmup, it.async_window)))
    elapsed = run(it.async_calls)
    if errors:
        raise RuntimeError(f"{len(errors)} of {it.async_calls} rpc_async calls failed; "
                           f"first: {errors[0]!r}")
    return {"calls_per_s": it.async_calls / elapsed, "calls": it.async_calls,
            "window": it.async_window}


def remote_latency(rpc: ModuleType, it: Iterations) -> dict:
    def call() -> None:
        rref = rpc.remote("worker1", one)
        if rref.to_here() != 1:
            raise RuntimeError("remote(one).to_here() did not return 1")

    _timed_calls(call, it.warmup)
    samples = _timed_calls(call, it.remote)
    return {"p50_us": percentile(samples, 50) * 1e6, "p99_us": percentile(samples, 99) * 1e6,
            "calls": len(samples)}


def _table_sizes(backend: str, rpc: ModuleType) -> dict[str, int]:
    """RRef table sizes that must return to zero: the owner's, and forks/pending anywhere."""
    per_worker = {rank: rpc.rpc_sync(worker_name(rank), debug_counts, args=(backend,))
                  for rank in range(MAIN_WORLD_SIZE)}
    if not any("num_owner_rrefs" in counts for counts in per_worker.values()):
        raise RuntimeError(f"{backend} debug info has no num_owner_rrefs counter: "
                           f"{sorted(per_worker[1])}")
    sizes = {"owner.num_owner_rrefs": per_worker[1].get("num_owner_rrefs", 0)}
    for key in ("num_forks", "num_pending_users", "num_pending_futures"):
        sizes[f"all.{key}"] = sum(counts.get(key, 0) for counts in per_worker.values())
    return sizes


def fork_churn(rpc: ModuleType, it: Iterations, backend: str) -> dict:
    """remote() on worker1, fork to worker2 (which drops it), drop; then wait for the tables."""
    def one_op() -> None:
        rref = rpc.remote("worker1", one)
        rpc.rpc_sync("worker2", drop_rref, args=(rref,))
        del rref

    for _ in range(it.warmup):
        one_op()
    t0 = time.perf_counter()
    for _ in range(it.fork):
        one_op()
    elapsed = time.perf_counter() - t0

    # Deletes travel after the calls return, so poll -- with a deadline -- until they land.
    start = time.monotonic()
    deadline = start + it.drain_timeout_s
    while True:
        sizes = _table_sizes(backend, rpc)
        drained = not any(sizes.values())
        if drained or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    return {"ops_per_s": it.fork / elapsed, "ops": it.fork, "drained": drained,
            "drain_ms": (time.monotonic() - start) * 1e3, "tables": sizes}


def _size_key(nbytes: int) -> str:
    return str(nbytes)


def memcpy_ms(nbytes: int, reps: int) -> float:
    """The median time of one ``memcpy`` of ``nbytes`` into memory already touched,
    on this thread: the floor a tensor's trip is compared with, measured in the
    same world and run as the trip."""
    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.zeros(nbytes, dtype=torch.uint8)
    samples = _timed_calls(lambda: ctypes.memmove(dst.data_ptr(), src.data_ptr(), nbytes),
                           max(3, reps))
    return percentile(samples, 50) * 1e3


def tensor_return(rpc: ModuleType, it: Iterations) -> dict:
    """Callee returns a tensor of N bytes; then check the two copies are independent."""
    p50_ms, independent, memcpy = {}, {}, {}
    for nbytes, calls in sorted(it.tensor.items()):
        got = rpc.rpc_sync("worker1", tensor_of, args=(nbytes,))  # builds it, warms the path
        if got.numel() != nbytes:
            raise RuntimeError(f"tensor_of({nbytes}) came back with {got.numel()} elements")
        samples = _timed_calls(lambda n=nbytes: rpc.rpc_sync("worker1", tensor_of, args=(n,)),
                               calls)
        p50_ms[_size_key(nbytes)] = percentile(samples, 50) * 1e3
        # Value semantics: a write on either side must not show on the other.
        got = rpc.rpc_sync("worker1", tensor_of, args=(nbytes,))
        got.fill_(7)
        callee_untouched = rpc.rpc_sync("worker1", sent_is_all, args=(nbytes, 1))
        rpc.rpc_sync("worker1", fill_sent, args=(nbytes, 9))
        caller_untouched = bool((got == 7).all())
        independent[_size_key(nbytes)] = bool(callee_untouched and caller_untouched)
        del got
        rpc.rpc_sync("worker1", forget_sent)  # free the callee's copy before the next size
        memcpy[_size_key(nbytes)] = memcpy_ms(nbytes, calls)
        _progress(f"  return {_human(nbytes)}: p50 {p50_ms[_size_key(nbytes)]:.3f} ms "
                  f"({calls} calls), one memcpy {memcpy[_size_key(nbytes)]:.3f} ms, "
                  f"independent={independent[_size_key(nbytes)]}")
    return {"p50_ms": p50_ms, "independent": independent, "memcpy_ms": memcpy}


def tensor_arg(rpc: ModuleType, it: Iterations) -> dict:
    """Caller sends a tensor of N bytes; then check the two copies are independent."""

    p50_ms, independent, memcpy = {}, {}, {}
    for nbytes, calls in sorted(it.tensor.items()):
        sent = torch.ones(nbytes, dtype=torch.uint8)
        if rpc.rpc_sync("worker1", take_tensor, args=(sent,)) != nbytes:
            raise RuntimeError(f"worker1 received a tensor of the wrong size for {nbytes} bytes")
        samples = _timed_calls(lambda t=sent: rpc.rpc_sync("worker1", take_tensor, args=(t,)),
                               calls)
        p50_ms[_size_key(nbytes)] = percentile(samples, 50) * 1e3
        rpc.rpc_sync("worker1", keep_tensor, args=(sent,))
        sent.fill_(7)
        callee_untouched = rpc.rpc_sync("worker1", kept_is_all, args=(1,))
        rpc.rpc_sync("worker1", fill_kept, args=(9,))
        caller_untouched = bool((sent == 7).all())
        independent[_size_key(nbytes)] = bool(callee_untouched and caller_untouched)
        rpc.rpc_sync("worker1", forget_kept)
        del sent
        memcpy[_size_key(nbytes)] = memcpy_ms(nbytes, calls)
        _progress(f"  arg {_human(nbytes)}: p50 {p50_ms[_size_key(nbytes)]:.3f} ms "
                  f"({calls} calls), one memcpy {memcpy[_size_key(nbytes)]:.3f} ms, "
                  f"independent={independent[_size_key(nbytes)]}")
    return {"p50_ms": p50_ms, "independent": independent, "memcpy_ms": memcpy}


def idle_world(rpc: ModuleType, it: Iterations, world_size: int) -> dict:
    """Threads per worker and CPU of the whole world while nobody calls anybody."""
    futures = [rpc.rpc_async(worker_name(rank), idle_probe, args=(it.idle_s,))
               for rank in range(1, world_size)]
    mine = idle_probe(it.idle_s)  # rank 0 idles in its own main thread meanwhile
    probes = [mine] + [fut.wait() for fut in futures]
    return {"threads": [p["threads"] for p in probes], "cpu_pct": [p["cpu_pct"] for p in probes],
            "idle_s": it.idle_s, "world_size": world_size}


# ---------------------------------------------------------------------------------------------
# Entry points handed to spawn.

def main_world_entry(rank: int, plan: WorldPlan) -> None:
    """One long-lived world: rank 0 runs every selected workload, the rest serve."""
    rpc, stamps = _enter(rank, plan)
    if rank == 0:
        results: dict = {}
        path = os.path.join(plan.outdir, "results.json")
        for group in IN_WORLD_GROUPS:
            if group not in plan.groups:
                continue
            _progress(f"[{plan.backend}] {group} ...")
            t0 = time.monotonic()
            try:
                results[group] = _run_group(group, rpc, plan)
            except Exception as exc:  # noqa: BLE001 -- one failing row must not hide the others
                traceback.print_exc()
                results[group] = {"error": f"{type(exc).__name__}: {_first_line(exc)}"}
            _progress(f"[{plan.backend}] {group}: {_summary(group, results[group])} "
                      f"({time.monotonic() - t0:.1f} s)")
            _write_json(path, results)
    _leave(rank, plan, rpc, stamps)


def start_world_entry(rank: int, plan: WorldPlan) -> None:
    """A world that only starts, says hello around the ring, and shuts down."""
    rpc, stamps = _enter(rank, plan)
    _leave(rank, plan, rpc, stamps)


def _run_group(group: str, rpc: ModuleType, plan: WorldPlan) -> dict:
    it = plan.iters
    match group:
        case "idle":
            return idle_world(rpc, it, plan.world_size)
        case "sync":
            return sync_latency(rpc, it)
        case "async":
            return async_throughput(rpc, it)
        case "remote":
            return remote_latency(rpc, it)
        case "fork":
            return fork_churn(rpc, it, plan.backend)
        case "tensor_return":
            return tensor_return(rpc, it)
        case "tensor_arg":
            return tensor_arg(rpc, it)
    raise ValueError(f"no workload named {group!r}")


def _enter(rank: int, plan: WorldPlan) -> tuple[ModuleType, dict[str, float]]:
    faulthandler.dump_traceback_later(plan.watchdog_s, exit=True)
    # torch's own init_rpc emits this deprecation warning from inside c10d on every worker.
    warnings.filterwarnings("ignore", message="You are using a Backend")
    stamps = {"process_start": time.monotonic()}
    rpc = load_rpc(plan.backend)
    stamps["imported"] = time.monotonic()
    init_worker(rpc, plan, rank)
    stamps["init_done"] = time.monotonic()
    # Every worker makes one call, so each has used its outgoing path before any measurement.
    rpc.rpc_sync(worker_name((rank + 1) % plan.world_size), noop)
    stamps["warm"] = time.monotonic()
    return rpc, stamps


def _leave(rank: int, plan: WorldPlan, rpc: ModuleType, stamps: dict[str, float]) -> None:
    stamps["shutdown_start"] = time.monotonic()
    rpc.shutdown()
    stamps["shutdown_done"] = time.monotonic()
    _write_json(os.path.join(plan.outdir, f"rank{rank}.json"), {"rank": rank, **stamps})
    faulthandler.cancel_dump_traceback_later()


def _write_json(path: str, payload: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        json.dump(payload, fh)
    os.replace(tmp, path)  # the parent never reads a half-written file


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _human(nbytes: int) -> str:
    for unit, shift in (("GB", 30), ("MB", 20), ("KB", 10)):
        if nbytes >= 1 << shift and nbytes % (1 << shift) == 0:
            return f"{nbytes >> shift} {unit}"
    return f"{nbytes} B"


def _first_line(exc: BaseException) -> str:
    # Remote errors open with an "On WorkerInfo(...):" (torch) or "On worker1 (rank 1):"
    # (localrref) header line; the line after it names the cause.
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    causes = [line for line in lines if not _REMOTE_HEADER.match(line)]
    return (causes or lines or [""])[0][:200]


def _summary(group: str, res: dict) -> str:
    if "error" in res:
        return f"FAILED: {res['error']}"
    match group:
        case "idle":
            return f"threads {res['threads']}, idle cpu % {[round(c, 1) for c in res['cpu_pct']]}"
        case "sync" | "remote":
            return f"p50 {res['p50_us']:.0f} us, p99 {res['p99_us']:.0f} us"
        case "async":
            return f"{res['calls_per_s']:.0f} calls/s"
        case "fork":
            return (f"{res['ops_per_s']:.0f} ops/s, drained={res['drained']} "
                    f"in {res['drain_ms']:.0f} ms, tables {res['tables']}")
    return "done"


__all__ = ["BACKENDS", "IN_WORLD_GROUPS", "MAIN_WORLD_SIZE", "Iterations", "WorldPlan",
           "load_rpc", "main_world_entry", "start_world_entry", "percentile"]
