"""Random schedules: one seed decides the world, the program and every fault.

``run_schedule(seed)`` is what CI runs by the thousand and what
``tools/simulate.py --replay SEED`` replays; the seed alone fixes the number of
workers (2 to 5), the length of the program, whether it ends by dropping every
reference or by a graceful shutdown with users alive, and every scheduling
and fault decision.
"""

from __future__ import annotations

import random

from ..core.rref_context import RetryPolicy
from .simnet import Faults, InvariantViolation, SimWorld

__all__ = ["FAULT_PROFILES", "run_schedule", "run_schedules"]

FAULT_PROFILES = {
    "none": Faults.none(),
    "all": Faults.all_on(0.2),
    "heavy": Faults.all_on(0.45),
}


def run_schedule(seed: int, faults: str = "all", *, check: bool = True) -> SimWorld:
    """Run one random schedule; raise InvariantViolation (naming the seed) on failure."""
    shape = random.Random(seed ^ 0x5EED)
    world = SimWorld(shape.randint(2, 5), seed=seed, faults=FAULT_PROFILES[faults],
                     faults_name=faults, retry=RetryPolicy(ack_timeout=60.0))
    try:
        world.run_program(shape.randint(5, 40), check=check)
        if shape.random() < 0.5:
            world.check_no_leak()
        else:
            world.shutdown(check=check)
    except InvariantViolation:
        raise
    except Exception as exc:
        # An internal assertion of the core (or any crash) is a failed
        # schedule too, and must name its seed.
        raise world._violation(f"{type(exc).__name__}: {exc}") from exc
    return world


def run_schedules(seeds, faults: str = "all") -> dict:
    totals: dict[str, int] = {"schedules": 0}
    for seed in seeds:
        world = run_schedule(seed, faults)
        totals["schedules"] += 1
        for key, value in world.stats.items():
            totals[key] = totals.get(key, 0) + value
    return totals
