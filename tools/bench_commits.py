"""Before and after: localrref at another commit against this checkout, on tools/bench.py.

    python tools/bench_commits.py --against HEAD~5 --repeat 3 [--rows sync,async,...]

Checks ``--against`` out into a temporary git worktree and runs each side's
own ``tools/bench.py --backends localrref`` R times, alternating (before,
after, after, before, ...). Each runs under ``python -S``, which every
worker inherits, with ``PYTHONPATH`` naming only that side's tree and
torch's site-packages: an editable install's import hook would otherwise
hand both sides this checkout's package. (Compare commits whose benchmark
code measures the same things.) Prints each row's median for
both sides and the ratio after/before, and how far apart each side's own
runs were (its spread), so a change can be told from noise.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import sysconfig
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def run_bench(package_root: str, rows: str | None, extra: list[str]) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as out:
        path = out.name
    tools = os.path.join(package_root, "tools")
    command = [sys.executable, "-S", os.path.join(tools, "bench.py"), "--backends",
               "localrref", "--json", path, *extra]
    if rows:
        command += ["--rows", rows]
    paths = sysconfig.get_paths()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [package_root, tools, paths["purelib"], paths["platlib"]])}
    subprocess.run(command, check=True, env=env, cwd=package_root, stdout=subprocess.DEVNULL)
    with open(path) as f:
        data = json.load(f)
    os.unlink(path)
    return data


def numeric_rows(data: dict) -> dict[str, tuple[float, str]]:
    """row label -> (localrref's number, which direction is better)."""
    found = {}
    for row in data.get("rows", []):
        value = row.get("values", {}).get("localrref")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            found[row["label"]] = (float(value), row.get("better", ""))
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", required=True, help="the commit to compare with")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--rows", default=None, help="passed on to bench.py --rows")
    parser.add_argument("--bench-args", default="", help="more arguments for bench.py")
    args = parser.parse_args(argv)
    extra = args.bench_args.split()
    worktree = tempfile.mkdtemp(prefix="lrr_before_")
    subprocess.run(["git", "-C", REPO, "worktree", "add", "-q", "--detach", worktree,
                    args.against], check=True)
    try:
        sides = {"before": worktree, "after": REPO}
        runs: dict[str, list[dict]] = {"before": [], "after": []}
        order = ["before", "after"]
        for i in range(args.repeat):
            for side in (order if i % 2 == 0 else order[::-1]):
                print(f"run {i + 1}/{args.repeat}: {side}", file=sys.stderr, flush=True)
                runs[side].append(numeric_rows(run_bench(sides[side], args.rows, extra)))
    finally:
        subprocess.run(["git", "-C", REPO, "worktree", "remove", "--force", worktree],
                       check=False)
    labels = [label for label in runs["after"][0] if label in runs["before"][0]]
    print(f"| row | better | before ({args.against}) | after | after/before | spread before "
          f"| spread after |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for label in labels:
        values = {side: [r[label][0] for r in runs[side] if label in r] for side in runs}
        better = runs["after"][0][label][1]
        med = {side: statistics.median(v) for side, v in values.items()}
        spread = {side: (max(v) - min(v)) / med[side] if med[side] else 0.0
                  for side, v in values.items()}
        ratio = med["after"] / med["before"] if med["before"] else float("nan")
        print(f"| {label} | {better} | {med['before']:.4g} | {med['after']:.4g} | "
              f"{ratio:.2f}x | {spread['before']:.0%} | {spread['after']:.0%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
