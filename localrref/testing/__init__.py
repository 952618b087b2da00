"""Deterministic test tools shipped with localrref (in the spirit of ``trio.testing``).

:class:`SimWorld` runs N real protocol cores against a seeded scheduler and a
fault-injecting bag of messages; see :mod:`localrref.testing.simnet`.
"""

from .simnet import Faults, InvariantViolation, SimCall, SimWorld, replay_command
from .schedules import run_schedule, run_schedules

__all__ = ["Faults", "InvariantViolation", "SimCall", "SimWorld", "replay_command",
           "run_schedule", "run_schedules"]
