"""The torch.distributed.rpc API over real worker processes (one world, many scenarios)."""

import threading

import pytest

import scenarios
from world import World

pytestmark = [pytest.mark.processes, pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def world(leak_free):
    baseline_threads = threading.active_count()
    w = World(3)
    try:
        yield w
    finally:
        w.close()
    assert threading.active_count() <= baseline_threads + 1


def test_basic_calls(world):
    assert world.run(scenarios.basic_calls)


def test_remote_and_rref_api(world):
    assert world.run(scenarios.remote_and_rref_api).startswith("UserRRef(RRefId = ")


def test_remote_exception_keeps_type_and_traceback(world):
    assert world.run(scenarios.remote_exception_keeps_type_and_traceback)


def test_timeouts(world):
    assert world.run(scenarios.timeouts)


def test_failed_remote_poisons_every_use(world):
    assert world.run(scenarios.failed_remote_poisons_every_use)


def test_timed_out_remote_wakes_blocked_to_here(world):
    assert world.run(scenarios.timed_out_remote_wakes_blocked_to_here)


def test_rrefs_as_arguments_and_results(world):
    assert world.run(scenarios.rrefs_as_arguments_and_results)


def test_fork_churn_returns_to_zero(world):
    assert world.run(scenarios.fork_churn_returns_to_zero) == 0


def test_nested_calls_do_not_deadlock(world):
    assert world.run(scenarios.nested_calls_do_not_deadlock) == ["worker1", "worker2"]


def test_blocked_functions_do_not_stall_the_inbox(world):
    assert world.run(scenarios.blocked_functions_do_not_stall_the_inbox)


def test_a_caller_that_blocks_elsewhere_still_serves(world):
    assert world.run(scenarios.a_caller_that_blocks_elsewhere_still_serves)


def test_a_function_that_calls_out_reads_its_own_replies(world):
    assert world.run(scenarios.a_function_that_calls_out_reads_its_own_replies)


def test_a_fetch_that_reaches_a_waiting_caller_is_served_by_it(world):
    assert world.run(scenarios.a_fetch_that_reaches_a_waiting_caller_is_served_by_it)


def test_replies_to_several_waits_are_completed_by_the_waiting_thread(world):
    assert world.run(scenarios.replies_to_several_waits_are_completed_by_the_waiting_thread)


def test_many_threads_at_once(world):
    assert world.run(scenarios.many_threads_at_once) == 400


def test_async_execution_chains(world):
    assert world.run(scenarios.async_execution_chains) == 50


def test_tensors_keep_value_semantics(world):
    assert world.run(scenarios.tensors_keep_value_semantics)


def test_bad_input_gets_clear_errors(world):
    assert world.run(scenarios.bad_input_gets_clear_errors)


def test_exceptions_at_every_stage_of_a_call_fail_only_that_call(world):
    assert world.run(scenarios.exceptions_at_every_stage_of_a_call)


def test_threads_per_worker_stay_few(world):
    assert world.run(scenarios.threads_and_debug_info) <= 20


def test_thousands_of_tensors_in_flight_do_not_exhaust_fds(world):
    (fds0, fds1), (after0, after1) = world.run(scenarios.thousands_of_tensors_in_flight)
    assert after0 - fds0 < 64 and after1 - fds1 < 64, ((fds0, fds1), (after0, after1))


def test_rrefs_dropped_anywhere_are_deleted(world):
    assert world.run(scenarios.rrefs_dropped_anywhere_are_deleted)


def test_zero_copy_opt_in_is_copy_on_write_for_receivers(world):
    assert world.run(scenarios.zero_copy_opt_in_is_copy_on_write_for_receivers)


def test_growth_mode_catches_one_leaked_rref_per_step_and_nothing_else(world):
    leaky = world.run(scenarios.growth_of_live_rrefs_per_step, True, timeout=120)
    clean = world.run(scenarios.growth_of_live_rrefs_per_step, False, timeout=120)
    assert leaky["leaked RRef"].lower().startswith("leak"), leaky
    assert clean["leaked RRef"].lower().startswith("clean"), clean
    assert clean["fd growth"].lower().startswith("clean"), clean
