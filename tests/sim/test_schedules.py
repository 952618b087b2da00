"""Thousands of seeded random schedules over 2 to 5 workers, every fault knob on.

A failure names its seed and the command that replays it
(``python tools/simulate.py --replay SEED --faults PROFILE``).
"""

import pytest

from localrref.testing import Faults, InvariantViolation, SimCall, SimWorld, run_schedule
from localrref.testing.schedules import FAULT_PROFILES

# CI's budget: 3,000 schedules with every knob on, plus lighter and heavier
# profiles; about 15 s on one core.
SCHEDULES = {"all": 3000, "heavy": 500, "none": 500}


@pytest.mark.parametrize("profile", sorted(SCHEDULES))
@pytest.mark.parametrize("chunk", range(5))
def test_random_schedules_keep_every_invariant(profile, chunk):
    total = SCHEDULES[profile]
    start, stop = chunk * total // 5, (chunk + 1) * total // 5
    workers = set()
    for seed in range(start, stop):
        world = run_schedule(seed, profile)
        workers.add(world.n)
    assert workers == {2, 3, 4, 5}


def test_fault_knobs_really_fire():
    totals = {}
    for seed in range(200):
        for key, value in run_schedule(seed, "all").stats.items():
            totals[key] = totals.get(key, 0) + value
    for key in ("failed_sends", "duplicates", "timeouts", "failures", "refused_forks",
                "completions"):
        assert totals[key] > 0, (key, totals)


def test_a_schedule_is_a_pure_function_of_its_seed():
    first, second = run_schedule(77, "all"), run_schedule(77, "all")
    assert first.trace == second.trace and first.stats == second.stats
    assert run_schedule(78, "all").trace != first.trace


def test_profiles_turn_on_every_knob():
    faults = FAULT_PROFILES["all"]
    assert faults.fail_sends and faults.duplicate and faults.delay


@pytest.mark.parametrize("knob,kind", [("duplicate", "PYTHON_CALL"),
                                       ("fail_sends", "PYTHON_REMOTE_CALL"),
                                       ("duplicate", "RREF_FORK_REQUEST")])
def test_faults_refuse_knobs_the_protocol_does_not_tolerate(knob, kind):
    with pytest.raises(ValueError, match=f"{knob} cannot apply to {kind}"):
        Faults(**{knob: {kind: 0.5}})


def test_a_violation_names_the_seed_and_the_replay_command():
    world = SimWorld(2, seed=4242)
    world.op_remote(0, 1, [], SimCall("store"), 0.0)
    world.handles[0][0].holds += 1  # corrupt a hold count behind the core's back
    with pytest.raises(InvariantViolation) as info:
        world.check()
    text = str(info.value)
    assert "seed=4242" in text
    assert "python tools/simulate.py --replay 4242" in text


def test_remote_to_self_and_back_leaves_nothing():
    world = SimWorld(3, seed=1)
    world.op_remote(0, 0, [], SimCall("store"), 0.0)
    owner = world.handles[0][0]
    world.op_rpc(0, 1, [owner], SimCall("echo"), 0.0)    # owner -> user -> back to owner
    world.op_rpc(0, 0, [owner], SimCall("keep"), 0.0)    # owner -> self
    world.run_until_quiescent()
    world.op_rpc(1, 2, list(world.handles[1]), SimCall("keep"), 0.0)
    world.check_no_leak()
