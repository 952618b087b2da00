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


def _deliver_first(world, predicate):
    for index, msg in enumerate(world.in_flight):
        if predicate(msg):
            world.deliver(index)
            return msg
    raise AssertionError(f"no such message in flight: {[m.message.type.value for m in world.in_flight]}")


def test_a_job_keeps_each_argument_rref_while_it_waits_for_the_others():
    # torch's test_py_rref_args_user_share: worker 0 passes two RRefs owned by
    # worker 1 to worker 2. Worker 2's job waits until both forks are
    # confirmed; the first confirmation must not let that user be deleted
    # (its pending hold goes, the job's hold stays).
    world = SimWorld(3, seed=0)
    world.op_remote(0, 1, [], SimCall("store"), 0.0)
    world.op_remote(0, 1, [], SimCall("store"), 0.0)
    world.run_until_quiescent()
    a, b = world.handles[0]
    world.op_rpc(0, 2, [a, b], SimCall("keep"), 0.0)
    _deliver_first(world, lambda m: m.message.type.value == "PYTHON_CALL")
    fork_a = _deliver_first(world, lambda m: m.message.type.value == "RREF_FORK_REQUEST"
                            and m.message.rref_id == a.rref_id)
    _deliver_first(world, lambda m: m.message.type.value == "RREF_ACK" and m.dst == 2
                   and m.message.request_id == fork_a.message.request_id)
    users_on_2 = {r.rref_id: r for r in world.ctx[2].confirmed_users.values()}
    user_a = users_on_2.get(a.rref_id)
    assert user_a is not None and not user_a.deleted_on_owner, \
        "the first confirmed argument was deleted while its job waited for the second"
    assert user_a.holds == 1  # the waiting job's
    world.check()
    world.run_until_quiescent()  # the job runs; it checks that no argument was deleted
    assert world.stats["jobs"] >= 3
    world.check_no_leak()
