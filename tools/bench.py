"""Side-by-side benchmark: localrref vs torch.distributed.rpc (TensorPipe on loopback).

Usage::

    python tools/bench.py                      # both backends, every row (torch: ~1 min, 2 cores)
    python tools/bench.py --quick              # fewer iterations, tensors up to 16 MB
    python tools/bench.py --backends torch --rows sync,fork --json out.json --markdown

Every workload lives once in ``bench_workloads.py`` and takes the rpc module as a
parameter; this file only launches worlds, collects what they wrote, and prints
one row per metric with each backend's number and the ratio localrref/torch.
Each row says which direction is better.

Data flow::

    main() --for each backend--> run_main_world()   one 3-worker world; rank 0 runs the
                                 |                  selected workloads -> results.json
                                 run_start_worlds() K worlds of 2 and of 4 workers that only
                                 |                  start and stop -> rank<k>.json timestamps
                                 v
                      build_rows() -> text table on stdout (+ --markdown, --json)

torch worlds start with ``torch.multiprocessing.spawn`` (MASTER_ADDR/PORT set, a
fresh free port per world); localrref worlds with ``localrref.spawn``. The
``world_forkserver`` rows start both backends' workers from one forkserver that
preloaded torch (an opt-in for either library; the server starts with the run's
first such world, and the median of K worlds leaves that one out when K >= 3).
A backend whose import fails is skipped with the reason. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

# tools/ for bench_workloads, the repo root for the tree's own localrref; spawned workers
# inherit this sys.path, so they import the same code.
_TOOLS = os.path.dirname(os.path.abspath(__file__))
for _path in (os.path.dirname(_TOOLS), _TOOLS):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import bench_workloads as wl  # noqa: E402

GROUPS = wl.IN_WORLD_GROUPS + ("world", "world_mpspawn", "world_runner", "world_forkserver")
WORLD_GROUPS = ("world", "world_mpspawn", "world_runner", "world_forkserver")
# What a forkserver imports once, before it forks any worker (opt-in fast start).
FORKSERVER_PRELOAD = ["torch", "torch.distributed.rpc", "localrref.api", "bench_workloads"]
GROUP_ALIASES = {"tensor": ("tensor_return", "tensor_arg"), "threads": ("idle",),
                 "cpu": ("idle",), "all": GROUPS}
DEFAULT_SIZES = (4 << 10, 1 << 20, 16 << 20, 64 << 20, 256 << 20)
QUICK_MAX_SIZE = 16 << 20


# ---------------------------------------------------------------------------------------------
# Configuration

@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    backends: tuple[str, ...]
    groups: tuple[str, ...]
    iters: wl.Iterations
    world_sizes: tuple[int, ...]
    worlds: int
    tp_transports: tuple[str, ...]
    tp_channels: tuple[str, ...]
    watchdog_s: float
    repeat: int = 1


def parse_size(text: str) -> int:
    """'4K', '1M', '16MB', '4096' -> bytes."""
    clean = text.strip().upper().removesuffix("B")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(clean[-1:], 1)
    digits = clean[:-1] if scale != 1 else clean
    try:
        value = int(digits) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"cannot read size {text!r}; write e.g. 4K, 1M, 256M")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size {text!r} must be positive")
    return value


def parse_groups(text: str) -> tuple[str, ...]:
    chosen: list[str] = []
    for name in filter(None, (part.strip() for part in text.split(","))):
        expanded = GROUP_ALIASES.get(name, (name,))
        for group in expanded:
            if group not in GROUPS:
                raise argparse.ArgumentTypeError(
                    f"unknown row group {name!r}; choose from {', '.join(GROUPS)} "
                    f"(aliases: {', '.join(GROUP_ALIASES)})")
            if group not in chosen:
                chosen.append(group)
    if not chosen:
        raise argparse.ArgumentTypeError("--rows selected nothing")
    return tuple(chosen)


def parse_backends(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    for name in names:
        if name not in wl.BACKENDS:
            raise argparse.ArgumentTypeError(
                f"unknown backend {name!r}; choose from {', '.join(wl.BACKENDS)}")
    if not names:
        raise argparse.ArgumentTypeError("--backends selected nothing")
    return names


def tensor_calls(nbytes: int, *, budget: int, cap: int, floor: int) -> int:
    """Calls per size: about ``budget`` bytes moved per size and direction, within [floor, cap]."""
    return max(floor, min(cap, budget // nbytes))


def make_iterations(*, quick: bool, scale: float, sizes: tuple[int, ...]) -> wl.Iterations:
    def scaled(n: int, least: int = 1) -> int:
        return max(least, round(n * scale))

    if quick:
        base = dict(warmup=20, sync=500, async_calls=3000, remote=200, fork=200,
                    drain_timeout_s=15.0)
        budget, cap, floor = 128 << 20, 100, 3
    else:
        # Sized for a 2-core machine: torch takes ~1 min here, leaving room for a slower backend
        # inside the ~6 min budget for the whole default run.
        base = dict(warmup=200, sync=5000, async_calls=30000, remote=2000, fork=2000,
                    drain_timeout_s=30.0)
        budget, cap, floor = 1 << 30, 500, 5
    tensor = {n: scaled(tensor_calls(n, budget=budget, cap=cap, floor=floor), least=floor)
              for n in sizes}
    return wl.Iterations(
        warmup=scaled(base["warmup"]), sync=scaled(base["sync"], 20),
        async_calls=scaled(base["async_calls"], 64), async_window=64,
        remote=scaled(base["remote"], 20), fork=scaled(base["fork"], 10), tensor=tensor,
        idle_s=2.0, drain_timeout_s=base["drain_timeout_s"])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tools/bench.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backends", type=parse_backends, default=wl.BACKENDS,
                   help="comma list of torch,localrref (default both)")
    p.add_argument("--rows", type=parse_groups, default=GROUPS,
                   help=f"comma list of row groups: {','.join(GROUPS)} "
                        f"(aliases: tensor, threads, cpu, all)")
    p.add_argument("--quick", action="store_true",
                   help="fewer iterations and tensors up to 16 MB (~1 min for both backends)")
    p.add_argument("--sizes", type=lambda s: tuple(parse_size(x) for x in s.split(",") if x),
                   default=None, help="tensor sizes, e.g. 4K,1M,16M (default 4K..256M)")
    p.add_argument("--repeat", type=int, default=1,
                   help="run every backend R times, alternating (torch, localrref, then "
                        "localrref, torch, ...); each number is the median of the R runs. "
                        "On a noisy machine this steadies the ratios (default 1)")
    p.add_argument("--worlds", type=int, default=None,
                   help="K worlds per start/shutdown row; the median is reported "
                        "(default 3, 1 with --quick)")
    p.add_argument("--world-sizes", type=lambda s: tuple(int(x) for x in s.split(",") if x),
                   default=(2, 4), help="worker counts for the start/shutdown rows (default 2,4)")
    p.add_argument("--scale", type=float, default=1.0,
                   help="multiply every iteration count (e.g. 0.05 for a smoke run)")
    p.add_argument("--tp-transports", default="",
                   help="TensorPipe _transports, e.g. uv or shm (default: torch's own choice)")
    p.add_argument("--tp-channels", default="",
                   help="TensorPipe _channels, e.g. basic (default: torch's own choice)")
    p.add_argument("--watchdog", type=float, default=600.0,
                   help="seconds before a hung worker dumps its stacks and exits (default 600)")
    p.add_argument("--json", metavar="PATH", help="also write every number to this JSON file")
    p.add_argument("--markdown", action="store_true",
                   help="also print a README-ready Markdown table with command and machine")
    return p


def config_from_args(args: argparse.Namespace) -> Config:
    sizes = args.sizes or DEFAULT_SIZES
    if args.quick and args.sizes is None:
        sizes = tuple(n for n in sizes if n <= QUICK_MAX_SIZE)
    if args.scale <= 0:
        raise SystemExit("--scale must be positive")
    if any(n < 2 for n in args.world_sizes):
        raise SystemExit("--world-sizes needs at least 2 workers per world")
    worlds = args.worlds if args.worlds is not None else (1 if args.quick else 3)
    if worlds < 1:
        raise SystemExit("--worlds must be at least 1")
    if args.repeat < 1:
        raise SystemExit("--repeat must be at least 1")
    split = lambda s: tuple(x.strip() for x in s.split(",") if x.strip())  # noqa: E731
    return Config(backends=args.backends, groups=args.rows,
                  iters=make_iterations(quick=args.quick, scale=args.scale, sizes=sizes),
                  world_sizes=args.world_sizes, worlds=worlds,
                  tp_transports=split(args.tp_transports), tp_channels=split(args.tp_channels),
                  watchdog_s=args.watchdog, repeat=args.repeat)


# ---------------------------------------------------------------------------------------------
# Launching worlds

def backend_problem(backend: str) -> str | None:
    """Why ``backend`` cannot run here, or None when it can."""
    try:
        rpc = wl.load_rpc(backend)
    except Exception as exc:  # noqa: BLE001 -- any import failure means "skip, and say why"
        return f"import failed: {type(exc).__name__}: {exc}"
    if backend == "torch":
        return None if rpc.is_available() else "torch was built without distributed RPC"
    needed = ("spawn", "init_rpc", "rpc_sync", "rpc_async", "remote", "shutdown",
              "get_debug_info")
    missing = [name for name in needed if not hasattr(rpc, name)]
    return f"localrref lacks {', '.join(missing)}" if missing else None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(backend: str, entry: Callable, plan: wl.WorldPlan,
           start_method: str = "spawn", torch_launcher: bool = False) -> None:
    """Start ``plan.world_size`` workers running ``entry(rank, plan)`` and wait for all.

    ``start_method="forkserver"``: both backends fork their workers from one
    server that imported :data:`FORKSERVER_PRELOAD` once (it starts with the
    first such world of the run and serves every later one).
    ``torch_launcher``: localrref's workers too are started by
    ``torch.multiprocessing`` and meet through MASTER_ADDR/MASTER_PORT, as an
    unmodified torch program starts them.
    """
    if start_method == "forkserver":
        import multiprocessing
        multiprocessing.set_forkserver_preload(FORKSERVER_PRELOAD)
    if backend == "torch" or torch_launcher:
        import torch.multiprocessing as mp

        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(plan.port)
        mp.start_processes(entry, args=(plan,), nprocs=plan.world_size, join=True,
                           start_method=start_method)
    else:
        import localrref

        localrref.spawn(entry, args=(plan,), nprocs=plan.world_size, start_method=start_method)


@dataclass(frozen=True, slots=True, kw_only=True)
class WorldRun:
    t_spawn: float
    t_return: float
    results: dict            # rank 0's results.json ({} for a start/shutdown world)
    ranks: list[dict]        # every rank's timestamps, by rank
    error: str | None


def run_world(cfg: Config, backend: str, entry: Callable, *, world_size: int,
              groups: tuple[str, ...], start_method: str = "spawn",
              torch_launcher: bool = False, runner: bool = False) -> WorldRun:
    """``runner``: localrref's world, but the workers run the torch backend's code
    under ``python -m localrref.run`` (``bench_runner_world.py``)."""
    outdir = tempfile.mkdtemp(prefix=f"bench-{backend}-")
    try:
        plan = wl.WorldPlan(backend="torch" if runner else backend, world_size=world_size,
                            outdir=outdir, groups=groups, iters=cfg.iters,
                            port=free_port() if backend == "torch" or torch_launcher else 0,
                            tp_transports=cfg.tp_transports, tp_channels=cfg.tp_channels,
                            watchdog_s=cfg.watchdog_s)
        error = None
        t_spawn = time.monotonic()
        try:
            if runner:
                t_spawn = _run_under_runner(plan)
            else:
                launch(backend, entry, plan, start_method, torch_launcher)
        except Exception as exc:  # noqa: BLE001 -- a failed world is reported, not fatal
            error = f"world died: {_last_line(exc)}"
            _progress(f"[{backend}] world of {world_size} failed:\n{exc}")
        t_return = time.monotonic()
        results = _read_json(os.path.join(outdir, "results.json")) or {}
        ranks = [_read_json(os.path.join(outdir, f"rank{r}.json")) for r in range(world_size)]
        return WorldRun(t_spawn=t_spawn, t_return=t_return, results=results,
                        ranks=[r for r in ranks if r is not None], error=error)
    finally:
        shutil.rmtree(outdir, ignore_errors=True)


def _run_under_runner(plan: wl.WorldPlan) -> float:
    """Run one world of ``plan`` as an unmodified torch program under ``python -m
    localrref.run``; returns the moment its workers were started (time.monotonic())."""
    plan_path = os.path.join(plan.outdir, "plan.pickle")
    with open(plan_path, "wb") as fh:
        pickle.dump(plan, fh)
    done = subprocess.run([sys.executable, "-m", "localrref.run",
                           os.path.join(_TOOLS, "bench_runner_world.py"), plan_path],
                          capture_output=True, text=True, timeout=plan.watchdog_s + 60)
    if done.returncode != 0:
        raise RuntimeError(f"exit code {done.returncode}\n{done.stderr}")
    return _read_json(os.path.join(plan.outdir, "t_spawn.json"))["t_spawn"]


def run_main_world(cfg: Config, backend: str) -> dict:
    groups = tuple(g for g in wl.IN_WORLD_GROUPS if g in cfg.groups)
    _progress(f"[{backend}] main world: {wl.MAIN_WORLD_SIZE} workers, rows {','.join(groups)}")
    run = run_world(cfg, backend, wl.main_world_entry, world_size=wl.MAIN_WORLD_SIZE,
                    groups=groups)
    out = dict(run.results)
    if run.error:
        out["errors"] = {g: run.error for g in groups if g not in run.results}
    return out


def run_start_worlds(cfg: Config, backend: str, start_method: str = "spawn",
                     torch_launcher: bool = False, runner: bool = False) -> dict:
    """K worlds per size: spawn -> every init_rpc returned, and last shutdown call -> all done."""
    by_size: dict[str, dict] = {}
    for size in cfg.world_sizes:
        starts, stops, errors = [], [], []
        for k in range(cfg.worlds):
            how = (", python -m localrref.run" if runner
                   else ", torch.multiprocessing" if torch_launcher else "")
            _progress(f"[{backend}] start/shutdown world {k + 1}/{cfg.worlds}, {size} workers "
                      f"({start_method}{how})")
            run = run_world(cfg, backend, wl.start_world_entry, world_size=size, groups=(),
                            start_method=start_method, torch_launcher=torch_launcher,
                            runner=runner)
            if run.error or len(run.ranks) != size:
                errors.append(run.error or f"only {len(run.ranks)} of {size} ranks reported")
                continue
            starts.append((max(r["init_done"] for r in run.ranks) - run.t_spawn) * 1e3)
            stops.append((max(r["shutdown_done"] for r in run.ranks)
                          - max(r["shutdown_start"] for r in run.ranks)) * 1e3)
            _progress(f"[{backend}]   start {starts[-1]:.0f} ms, shutdown {stops[-1]:.0f} ms")
        by_size[str(size)] = {"start_ms": starts, "shutdown_ms": stops, "errors": errors}
    return by_size


def run_backend(cfg: Config, backend: str) -> dict:
    results: dict = {}
    if any(g in cfg.groups for g in wl.IN_WORLD_GROUPS):
        results.update(run_main_world(cfg, backend))
    if "world" in cfg.groups:
        results["world"] = run_start_worlds(cfg, backend)
    if "world_mpspawn" in cfg.groups:
        # torch's workers always start this way: its "world" rows are these.
        results["world_mpspawn"] = (results["world"] if backend == "torch" and "world" in results
                                    else run_start_worlds(cfg, backend, torch_launcher=True))
    if "world_runner" in cfg.groups:
        # The same program on torch is its plain torch.multiprocessing.spawn world.
        if backend == "torch":
            results["world_runner"] = results.get("world") or run_start_worlds(cfg, backend)
        else:
            results["world_runner"] = run_start_worlds(cfg, backend, torch_launcher=True,
                                                       runner=True)
    if "world_forkserver" in cfg.groups:
        results["world_forkserver"] = run_start_worlds(cfg, backend, "forkserver")
    return results


# ---------------------------------------------------------------------------------------------
# Rows

@dataclass(frozen=True, slots=True, kw_only=True)
class Row:
    key: str
    group: str
    label: str
    unit: str
    better: str                          # "lower", "higher" or "yes"
    pick: Callable[[dict], object]       # backend results -> number, "yes"/"no", or None


def _get(*path: str) -> Callable[[dict], object]:
    def pick(res: dict) -> object:
        node: object = res
        for part in path:
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        return node
    return pick


def _yes_no(group: str) -> Callable[[dict], object]:
    def pick(res: dict) -> object:
        table = _get(group, "independent")(res)
        if not isinstance(table, dict):
            return None
        failing = [wl._human(int(n)) for n, ok in table.items() if not ok]
        return "yes" if not failing else f"no ({', '.join(failing)})"
    return pick


def _aggregate(group: str, field_name: str, how: Callable) -> Callable[[dict], object]:
    def pick(res: dict) -> object:
        values = _get(group, field_name)(res)
        return how(values) if values else None
    return pick


def _world_median(size: int, field_name: str, group: str = "world") -> Callable[[dict], object]:
    def pick(res: dict) -> object:
        values = _get(group, str(size), field_name)(res)
        return statistics.median(values) if values else None
    return pick


# Sizes from which the tensor rows are also shown against one memcpy.
MEMCPY_ROW_MIN = 64 << 20


def _per_memcpy(group: str, nbytes: int) -> Callable[[dict], object]:
    def pick(res: dict) -> object:
        return ratio(_get(group, "p50_ms", str(nbytes))(res),
                     _get(group, "memcpy_ms", str(nbytes))(res))
    return pick


def _drained(res: dict) -> object:
    drained = _get("fork", "drained")(res)
    if drained is None:
        return None
    return "yes" if drained else f"no ({_get('fork', 'tables')(res)})"


def build_rows(cfg: Config) -> list[Row]:
    sizes = sorted(cfg.iters.tensor)
    rows = [
        Row(key="sync_p50", group="sync", label="rpc_sync no-op latency p50", unit="us",
            better="lower", pick=_get("sync", "p50_us")),
        Row(key="sync_p99", group="sync", label="rpc_sync no-op latency p99", unit="us",
            better="lower", pick=_get("sync", "p99_us")),
        Row(key="async_tput", group="async",
            label=f"rpc_async throughput, {cfg.iters.async_window} in flight", unit="calls/s",
            better="higher", pick=_get("async", "calls_per_s")),
        Row(key="remote_p50", group="remote", label="remote() + to_here() latency p50",
            unit="us", better="lower", pick=_get("remote", "p50_us")),
        Row(key="fork_ops", group="fork", label="RRef fork churn (create, pass, drop)",
            unit="ops/s", better="higher", pick=_get("fork", "ops_per_s")),
        Row(key="fork_drained", group="fork", label="RRef tables back to zero after churn",
            unit="", better="yes", pick=_drained),
        Row(key="fork_drain_ms", group="fork", label="time for the tables to drain",
            unit="ms", better="lower", pick=_get("fork", "drain_ms")),
    ]
    for group, verb in (("tensor_return", "tensor return"), ("tensor_arg", "tensor argument")):
        rows += [Row(key=f"{group}_{n}", group=group, label=f"{verb} {wl._human(n)} p50",
                     unit="ms", better="lower", pick=_get(group, "p50_ms", str(n)))
                 for n in sizes]
        # The floor for the big sizes: one memcpy of that size, timed in
        # the same world right after the trips.
        rows += [Row(key=f"{group}_{n}_per_memcpy", group=group,
                     label=f"{verb} {wl._human(n)} p50 / one memcpy of {wl._human(n)}",
                     unit="x", better="lower", pick=_per_memcpy(group, n))
                 for n in sizes if n >= MEMCPY_ROW_MIN]
        rows.append(Row(key=f"{group}_independent", group=group,
                        label=f"{verb}: receiver's copy independent of sender's", unit="",
                        better="yes", pick=_yes_no(group)))
    for n in cfg.world_sizes:
        rows += [
            Row(key=f"world_start_{n}", group="world",
                label=f"world start, {n} workers (spawn -> init_rpc returned)", unit="ms",
                better="lower", pick=_world_median(n, "start_ms")),
            Row(key=f"world_shutdown_{n}", group="world",
                label=f"graceful shutdown, {n} workers", unit="ms", better="lower",
                pick=_world_median(n, "shutdown_ms")),
        ]
    for n in cfg.world_sizes:
        rows += [
            Row(key=f"world_mp_start_{n}", group="world_mpspawn",
                label=f"world start, {n} workers, plain torch.multiprocessing.spawn + MASTER_ADDR",
                unit="ms", better="lower", pick=_world_median(n, "start_ms", "world_mpspawn")),
            Row(key=f"world_mp_shutdown_{n}", group="world_mpspawn",
                label=f"graceful shutdown, {n} workers, plain torch.multiprocessing.spawn",
                unit="ms", better="lower", pick=_world_median(n, "shutdown_ms", "world_mpspawn")),
        ]
    rows += [
        Row(key=f"world_run_start_{n}", group="world_runner",
            label=f"world start, {n} workers, torch.multiprocessing.spawn under "
                  f"python -m localrref.run",
            unit="ms", better="lower", pick=_world_median(n, "start_ms", "world_runner"))
        for n in cfg.world_sizes]
    rows += [
        Row(key=f"world_fs_start_{n}", group="world_forkserver",
            label=f"world start, {n} workers, opt-in forkserver, torch preloaded",
            unit="ms", better="lower", pick=_world_median(n, "start_ms", "world_forkserver"))
        for n in cfg.world_sizes]
    rows += [
        Row(key="threads", group="idle",
            label=f"threads per worker (mean of {wl.MAIN_WORLD_SIZE})", unit="threads",
            better="lower", pick=_aggregate("idle", "threads", statistics.mean)),
        Row(key="idle_cpu", group="idle", label="idle world CPU per worker, 2 s (mean)",
            unit="% core", better="lower", pick=_aggregate("idle", "cpu_pct", statistics.mean)),
    ]
    return [row for row in rows if row.group in cfg.groups]


def cell(row: Row, res: dict | None) -> object:
    """A row's value for one backend: number, text, 'error: ...', or None (not run)."""
    if res is None:
        return None
    value = row.pick(res)
    if value is None:
        group_result = res.get(row.group)
        error = group_result.get("error") if isinstance(group_result, dict) else None
        error = error or res.get("errors", {}).get(row.group)
        if row.group in WORLD_GROUPS:
            size = row.key.rsplit("_", 1)[-1]
            error = error or next(iter(_get(row.group, size, "errors")(res) or []), None)
        if error:
            return f"error: {error}"
    return value


def ratio(a: object, b: object) -> float | None:
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (a, b))
    return a / b if numeric and b else None


# ---------------------------------------------------------------------------------------------
# Output

def fmt(value: object, *, width: int = 60) -> str:
    if value is None:
        return "—"
    if isinstance(value, str) and len(value) > width:
        return value[:width - 1] + "…"  # the JSON keeps the whole message
    if isinstance(value, float):
        mag = abs(value)
        if mag >= 100:
            return f"{value:,.0f}"
        if mag >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}" if mag >= 1 else f"{value:.3f}"
    return str(value)


def fmt_ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}×"


def table_cells(rows: list[Row], results: dict[str, dict | None]) -> list[list[str]]:
    lines = []
    for row in rows:
        torch_v, local_v = cell(row, results.get("torch")), cell(row, results.get("localrref"))
        label = f"{row.label} ({row.unit})" if row.unit else row.label
        lines.append([label, row.better, fmt(torch_v), fmt(local_v),
                      fmt_ratio(ratio(local_v, torch_v))])
    return lines


HEADER = ["row", "better", "torch", "localrref", "localrref/torch"]


def render_text(rows: list[Row], results: dict[str, dict | None]) -> str:
    lines = [HEADER] + table_cells(rows, results)
    widths = [max(len(line[i]) for line in lines) for i in range(len(HEADER))]
    out = []
    for i, line in enumerate(lines):
        out.append("  ".join(c.ljust(w) if j < 2 else c.rjust(w)
                             for j, (c, w) in enumerate(zip(line, widths))))
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def render_markdown(rows: list[Row], results: dict[str, dict | None], meta: dict) -> str:
    out = [
        f"Command: `{meta['command']}`",
        "",
        f"Machine: {meta['nproc']} CPUs ({meta['cpu_model']}), {meta['platform']}, "
        f"Python {meta['python']}, torch {meta['torch']}; TensorPipe transports: "
        f"{meta['tp_transports']}, channels: {meta['tp_channels']}; "
        f"1-min load average at start {meta.get('loadavg_1min_at_start', '?')}.",
        f"In-world rows use one {wl.MAIN_WORLD_SIZE}-worker world; start/shutdown rows are the "
        f"median of {meta['worlds']} world(s)"
        + (f"; every number is the median of {meta['repeat']} runs per backend, the backends "
           f"alternating" if meta.get("repeat", 1) > 1 else "")
        + ". Ratio = localrref / torch; the \"better\" column says which direction wins.",
        "",
        "| " + " | ".join(HEADER) + " |",
        "|---|---|---:|---:|---:|",
    ]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in line) + " |"
            for line in table_cells(rows, results)]
    skipped = meta.get("skipped", {})
    if skipped:
        out += [""] + [f"{name} not run: {why}" for name, why in skipped.items()]
    return "\n".join(out)


def machine_meta(cfg: Config, argv: list[str], loadavg: float) -> dict:
    import torch

    cpu_model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as fh:
            cpu_model = next((line.split(":", 1)[1].strip() for line in fh
                              if line.startswith("model name")), cpu_model)
    except OSError:
        pass
    return {
        "command": " ".join(["python tools/bench.py", *map(shlex.quote, argv)]),
        "nproc": os.cpu_count(), "cpu_model": cpu_model,
        "platform": f"{platform.system()} {platform.machine()}",
        "python": platform.python_version(), "torch": torch.__version__,
        "tp_transports": ",".join(cfg.tp_transports) or "torch default",
        "tp_channels": ",".join(cfg.tp_channels) or "torch default",
        "worlds": cfg.worlds, "repeat": cfg.repeat, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        # Other work on a small machine moves every number; the load says how busy it was.
        "loadavg_1min_at_start": round(loadavg, 2),
    }


def to_json(rows: list[Row], results: dict[str, dict | None], meta: dict, cfg: Config) -> dict:
    table = []
    for row in rows:
        values = {b: cell(row, results.get(b)) for b in wl.BACKENDS}
        table.append({"key": row.key, "group": row.group, "label": row.label, "unit": row.unit,
                      "better": row.better, "values": values,
                      "ratio_localrref_over_torch": ratio(values["localrref"], values["torch"])})
    iters = asdict(cfg.iters)
    iters["tensor"] = {str(k): v for k, v in iters["tensor"].items()}
    return {"meta": meta, "iterations": iters, "rows": table, "raw": results}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    loadavg = os.getloadavg()[0]
    compile_worker_code()
    runs: dict[str, list[dict]] = {}
    skipped: dict[str, str] = {}
    for backend in cfg.backends:
        problem = backend_problem(backend)
        if problem:
            skipped[backend] = problem
            _progress(f"[{backend}] skipped: {problem}")
        else:
            runs[backend] = []
    for round_ in range(cfg.repeat):
        # Alternate the order, so neither backend always runs first.
        order = list(runs) if round_ % 2 == 0 else list(reversed(runs))
        for backend in order:
            t0 = time.monotonic()
            runs[backend].append(run_backend(cfg, backend))
            _progress(f"[{backend}] run {round_ + 1}/{cfg.repeat} done in "
                      f"{time.monotonic() - t0:.1f} s")
    results: dict[str, dict | None] = {b: merge_runs(r) for b, r in runs.items()}
    rows = build_rows(cfg)
    meta = machine_meta(cfg, argv, loadavg) | {"skipped": skipped}
    print(render_text(rows, results))
    for name, why in skipped.items():
        print(f"{name} not run: {why}")
    if args.markdown:
        print()
        print(render_markdown(rows, results, meta))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(to_json(rows, results, meta, cfg), fh, indent=2)
    ran = [b for b in cfg.backends if b in results]
    return 0 if ran else 2


def compile_worker_code() -> None:
    """Give the modules the workers import their bytecode, as ``pip install`` gave torch's.

    Under PYTHONDONTWRITEBYTECODE (set on some machines and CI runners), or in a
    checkout whose modules were never imported, every worker would compile
    localrref from source: about 40 ms of CPU per worker here, which the start
    rows would charge to localrref although an installed copy never pays it.
    compileall writes the files whatever that variable says.
    """
    import compileall
    import importlib.util

    package = importlib.util.find_spec("localrref").submodule_search_locations[0]
    compileall.compile_dir(package, quiet=1)
    for name in ("bench.py", "bench_workloads.py"):  # both backends' workers import these
        compileall.compile_file(os.path.join(_TOOLS, name), quiet=1)


def merge_runs(runs: list):
    """One backend's repeated results as one: numbers -> median, lists -> joined
    (their rows take a median themselves), yes/no -> all, anything else -> the first."""
    if len(runs) == 1:
        return runs[0]
    present = [r for r in runs if r is not None]
    if not present:
        return None
    first = present[0]
    if isinstance(first, dict):
        keys = list(dict.fromkeys(k for r in present if isinstance(r, dict) for k in r))
        return {k: merge_runs([r.get(k) for r in present if isinstance(r, dict) and k in r])
                for k in keys}
    if isinstance(first, bool):
        return all(bool(r) for r in present)
    if isinstance(first, (int, float)) and all(isinstance(r, (int, float)) for r in present):
        return statistics.median(present)
    if isinstance(first, list):
        return [item for r in present if isinstance(r, list) for item in r]
    return first


def _read_json(path: str) -> dict | None:
    try:
        with open(path) as fh:
            return json.load(fh)
    except FileNotFoundError:
        return None


def _last_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
