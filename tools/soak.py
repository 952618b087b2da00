"""soak: a long mixed workload under the leak auditor; memory, fds and threads must stay flat.

Usage::

    python tools/soak.py --seconds 600 --svg soak.svg     # the README's figures
    python tools/soak.py --seconds 60                     # a quick look

Four workers (``--workers``) each run rounds against random peers for
``--seconds``, in epochs of ``--epoch`` seconds. A round makes calls
(``rpc_sync`` and a burst of ``rpc_async``), a ``remote()`` whose RRef it
fetches and then forks to a third worker (who fetches it too), an
``async_execution`` call, and a tensor round trip whose size cycles through
4 KB, 1 MB and 16 MB (64 MB every tenth round). At the end of each epoch
every worker restarts its RPC: a graceful ``shutdown()`` (leak report
included) and ``init_rpc`` again in the same process.

The workload runs under ``tools/leak_audit.py`` (its growth mode): after
every round of every epoch but the first (a warm-up: shared-memory pools
grow to the sizes the workload needs) each worker prints a probe line (USS,
fds, threads, live RRefs), and the auditor fits their growth per round, checks that no process,
/dev/shm segment or RRef is left, and sets the exit status (0: clean; see
leak_audit.py for the bits). This script prints the auditor's report, a
table per worker (first and last epoch), and with ``--svg`` draws each
worker's USS over time (no plotting library needed).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from torch.distributed.rpc.functions import async_execution  # noqa: E402

SIZES = (4 << 10, 1 << 20, 16 << 20)
BIG = 64 << 20


# -- the workload (in the workers) --------------------------------------------------


def _noop(*args):
    return len(args)


def _tensor(n_bytes):
    return torch.ones(n_bytes // 4)


def _echo(x):
    return x


def _fetch(rref):
    return int(rref.to_here().numel())


@async_execution
def _async_square(x):
    """An async_execution function: its result comes through a future it returns."""
    future = torch.futures.Future()
    future.set_result(x * x)
    return future


def _round(rpc, rank: int, world: int, n: int, rng: random.Random) -> dict:
    peers = [r for r in range(world) if r != rank]
    a, b = rng.sample(peers, 2) if len(peers) > 1 else (peers[0], peers[0])
    wa, wb = f"worker{a}", f"worker{b}"
    rpc.rpc_sync(wa, _noop, args=(1, 2))
    futures = [rpc.rpc_async(f"worker{rng.choice(peers)}", _noop, args=(i,)) for i in range(16)]
    torch.futures.wait_all(futures)
    rref = rpc.remote(wa, _tensor, args=(4 << 10,))
    rref.to_here()
    rpc.rpc_sync(wb, _fetch, args=(rref,))  # a fork to a third worker
    del rref
    square = rpc.rpc_sync(wb, _async_square, args=(torch.full((4,), 3.0),))
    assert float(square[0]) == 9.0
    size = BIG if n % 10 == 9 else SIZES[n % len(SIZES)]
    out = rpc.rpc_sync(wa, _echo, args=(torch.ones(size // 4),))
    assert out.numel() == size // 4
    return {"calls": 20, "bytes": 2 * size}


def _worker(rank: int, world: int, seconds: float, epoch: float, metrics_path: str) -> None:
    import localrref as rpc
    from leak_audit import probe_line

    rng = random.Random(rank)
    start = time.monotonic()
    step = 0
    epochs = max(1, round(seconds / epoch))
    with open(metrics_path, "a", buffering=1) as metrics:
        for e in range(epochs):
            rpc.init_rpc(f"worker{rank}", rank=rank, world_size=world)
            ends = start + (e + 1) * seconds / epochs
            n = 0
            while time.monotonic() < ends:
                done = _round(rpc, rank, world, n, rng)
                n += 1
                step += 1
                info = rpc.get_debug_info()
                live = int(info["num_owner_rrefs"]) + int(info["num_forks"])
                line = probe_line(step, source=f"worker{rank}", live_rrefs=live)
                if e > 0 or epochs == 1:  # the first epoch warms up: pools reach their size
                    # One write per line: print() writes the line and its end
                    # apart when stdout is unbuffered (PYTHONUNBUFFERED), and
                    # another worker's line can land between the two.
                    sys.stdout.write(line + "\n")
                    sys.stdout.flush()
                point = json.loads(line.split(" ", 1)[1])
                point.update(epoch=e, t=time.monotonic() - start, **done)
                metrics.write(json.dumps(point) + "\n")
            rpc.shutdown()


def _run_workload(args) -> int:
    import localrref
    localrref.spawn(_worker, args=(args.workers, args.seconds, args.epoch, args.metrics),
                    nprocs=args.workers)
    return 0


# -- the report (in the parent) -------------------------------------------------------


def _summary(points: list[dict]) -> str:
    by_worker: dict[str, list[dict]] = {}
    for p in points:
        by_worker.setdefault(p["source"], []).append(p)
    lines = ["| worker | rounds | calls | MiB moved | USS MiB, first epoch -> last (median) | "
             "fds (min-max) | threads (min-max) |", "|---|---|---|---|---|---|---|"]
    for name in sorted(by_worker):
        ps = by_worker[name]
        first = [p["uss"] for p in ps if p["epoch"] == ps[0]["epoch"]]
        last = [p["uss"] for p in ps if p["epoch"] == ps[-1]["epoch"]]
        fds = [p["fds"] for p in ps]
        threads = [p["threads"] for p in ps]
        lines.append(
            f"| {name} | {len(ps)} | {sum(p['calls'] for p in ps):,} | "
            f"{sum(p['bytes'] for p in ps) / 2**20:,.0f} | "
            f"{statistics.median(first) / 2**20:.1f} -> {statistics.median(last) / 2**20:.1f} | "
            f"{min(fds)}-{max(fds)} | {min(threads)}-{max(threads)} |")
    return "\n".join(lines)


def _svg(points: list[dict], path: str, title: str) -> None:
    """USS over time, one polyline per worker."""
    width, height, pad = 720, 320, 48
    by_worker: dict[str, list[tuple[float, float]]] = {}
    for p in points:
        by_worker.setdefault(p["source"], []).append((p["t"], p["uss"] / 2**20))
    t_max = max(t for series in by_worker.values() for t, _ in series) or 1.0
    y_max = max(y for series in by_worker.values() for _, y in series) * 1.15 or 1.0
    sx = lambda t: pad + (width - 2 * pad) * t / t_max  # noqa: E731
    sy = lambda y: height - pad - (height - 2 * pad) * y / y_max  # noqa: E731
    colours = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b")
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="sans-serif" font-size="12">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{width / 2}" y="20" text-anchor="middle">{title}</text>',
           f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" '
           f'stroke="black"/>',
           f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="black"/>',
           f'<text x="{width / 2}" y="{height - 12}" text-anchor="middle">seconds</text>',
           f'<text x="14" y="{height / 2}" transform="rotate(-90 14 {height / 2})" '
           f'text-anchor="middle">USS, MiB</text>']
    for i in range(5):
        y = y_max * i / 4
        out.append(f'<text x="{pad - 6}" y="{sy(y) + 4:.0f}" text-anchor="end">{y:.0f}</text>')
        t = t_max * i / 4
        out.append(f'<text x="{sx(t):.0f}" y="{height - pad + 16}" '
                   f'text-anchor="middle">{t:.0f}</text>')
    for i, name in enumerate(sorted(by_worker)):
        series = by_worker[name]
        pts = " ".join(f"{sx(t):.1f},{sy(y):.1f}" for t, y in series)
        colour = colours[i % len(colours)]
        out.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.2" points="{pts}"/>')
        out.append(f'<text x="{width - pad - 70}" y="{pad + 16 * i}" fill="{colour}">{name}</text>')
    out.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--epoch", type=float, default=60.0,
                        help="seconds between RPC restarts (default 60)")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--svg", help="draw USS over time per worker to this file")
    parser.add_argument("--json", help="write the summary and the auditor's verdicts here")
    parser.add_argument("--workload", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--metrics", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.workers < 3:
        parser.error("--workers must be at least 3 (a fork needs a third worker)")
    if args.workload:
        return _run_workload(args)

    import leak_audit
    with tempfile.TemporaryDirectory(prefix="localrref-soak-") as tmp:
        metrics = os.path.join(tmp, "metrics.jsonl")
        command = [sys.executable, os.path.abspath(__file__), "--workload",
                   "--seconds", str(args.seconds), "--epoch", str(args.epoch),
                   "--workers", str(args.workers), "--metrics", metrics]
        env = {"PYTHONPATH": os.pathsep.join(filter(None, [
            os.path.dirname(os.path.abspath(__file__)), os.environ.get("PYTHONPATH")]))}
        started = time.monotonic()
        report = leak_audit.run_audit(command, growth="auto", shm_prefixes=("lrr_",),
                                      timeout=args.seconds * 2 + 300, env=env, forward=None)
        wall = time.monotonic() - started
        with open(metrics) as f:
            points = [json.loads(line) for line in f if line.strip()]
    print(report.render())
    print(f"\n{args.workers} workers, {wall:.0f} s, {len(points)} rounds, "
          f"{round(args.seconds / args.epoch)} epochs (an RPC restart each)\n")
    summary = _summary(points) if points else "(no rounds)"
    print(summary)
    if args.svg and points:
        _svg(points, args.svg, f"localrref soak: {args.workers} workers, {wall:.0f} s, "
                               f"{len(points)} rounds, USS per worker")
        print(f"\nplot: {args.svg}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"exit_code": report.exit_code, "summary": summary,
                       "report": report.to_json()}, f, indent=1, default=str)
    print(f"\nexit status {report.exit_code} ({'clean' if report.exit_code == 0 else 'see above'})")
    return report.exit_code


if __name__ == "__main__":
    sys.exit(main())
