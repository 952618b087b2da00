"""Run the protocol simulator over many seeded schedules, or replay one.

    python tools/simulate.py --schedules 100000            # every fault knob on
    python tools/simulate.py --schedules 5000 --faults heavy
    python tools/simulate.py --replay 1234 --faults all --trace

Each schedule is a pure function of its seed (see localrref.testing.schedules):
the number of workers (2 to 5), the program, every delivery order, fault and
timer. A failing schedule prints its seed and the command that replays it.
``--jobs N`` splits the seeds over N processes (this tool is outside the
pure core, so it may).
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ProcessPoolExecutor

from localrref.testing import InvariantViolation
from localrref.testing.schedules import FAULT_PROFILES, run_schedule


def _run_range(start: int, stop: int, faults: str) -> tuple[dict, list[str]]:
    totals: dict[str, int] = {"schedules": 0}
    failures = []
    for seed in range(start, stop):
        try:
            world = run_schedule(seed, faults)
        except InvariantViolation as exc:
            failures.append(str(exc))
            continue
        totals["schedules"] += 1
        for key, value in world.stats.items():
            totals[key] = totals.get(key, 0) + value
    return totals, failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schedules", type=int, default=2000)
    parser.add_argument("--start", type=int, default=0, help="first seed")
    parser.add_argument("--faults", choices=sorted(FAULT_PROFILES), default="all")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--replay", type=int, help="run this one seed and print its trace")
    parser.add_argument("--trace", action="store_true", help="with --replay: print every step")
    args = parser.parse_args(argv)

    if args.replay is not None:
        try:
            world = run_schedule(args.replay, args.faults)
        except InvariantViolation as exc:
            print(exc)
            return 1
        if args.trace:
            print("\n".join(world.trace))
        print(f"seed {args.replay}: ok, {world.n} workers, {world.stats}")
        return 0

    started = time.perf_counter()
    step = max(1, args.schedules // (args.jobs * 8))
    ranges = [(s, min(s + step, args.start + args.schedules), args.faults)
              for s in range(args.start, args.start + args.schedules, step)]
    totals: dict[str, int] = {}
    failures: list[str] = []
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs) as pool:
            results = list(pool.map(_run_range, *zip(*ranges)))
    else:
        results = [_run_range(*r) for r in ranges]
    for part, failed in results:
        failures.extend(failed)
        for key, value in part.items():
            totals[key] = totals.get(key, 0) + value
    elapsed = time.perf_counter() - started
    print(f"{totals.get('schedules', 0)} schedules passed, {len(failures)} failed, "
          f"faults={args.faults}, seeds {args.start}..{args.start + args.schedules - 1}, "
          f"{elapsed:.1f} s")
    print("totals: " + ", ".join(f"{k}={v}" for k, v in sorted(totals.items())))
    for text in failures[:5]:
        print("\n" + text)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
