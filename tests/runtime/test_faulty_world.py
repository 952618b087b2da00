"""The runtime under injected faults: a 3-worker world whose every worker fails its first
RRef control sends (retried), delays, duplicates and reorders others (seeded).

The same scenarios as test_world.py must give the same answers, the RRef
tables must drain to zero, and the world must shut down cleanly with no leak.
"""

import pytest

import scenarios
from localrref import FaultyRpcBackendOptions
from world import running

pytestmark = [pytest.mark.processes, pytest.mark.timeout(180)]

FAULTS = FaultyRpcBackendOptions(
    rpc_timeout=60,
    num_fail_sends=2,  # of each of torch's retryable types: RREF_FORK_REQUEST, ...
    # Short: a scenario makes hundreds of calls one after another; later
    # frames overtake a delayed one all the same.
    messages_to_delay={"PYTHON_CALL": 0.0005, "REMOTE_RET": 0.001, "RREF_USER_DELETE": 0.002},
    messages_to_duplicate=["RREF_ACK", "RREF_CHILD_ACCEPT", "RREF_USER_DELETE", "REMOTE_RET"],
    messages_to_reorder=["PYTHON_RET", "RREF_ACK", "PYTHON_RREF_FETCH_RET"],
    fault_probability=0.5, fault_seed=11)


@pytest.fixture(scope="module")
def world(leak_free):
    with running(3, options=FAULTS) as w:
        yield w


# Each scenario and what it returns on a world without faults (test_world.py).
@pytest.mark.parametrize("scenario, expected", [
    (scenarios.basic_calls, True),
    (scenarios.remote_and_rref_api, "UserRRef(RRefId = "),
    (scenarios.rrefs_as_arguments_and_results, True),
    (scenarios.fork_churn_returns_to_zero, 0),
    (scenarios.rrefs_dropped_anywhere_are_deleted, True),
    (scenarios.async_execution_chains, 50),
    (scenarios.nested_calls_do_not_deadlock, ["worker1", "worker2"]),
], ids=lambda item: getattr(item, "__name__", ""))
def test_scenarios_hold_under_injected_faults(world, scenario, expected):
    got = world.run(scenario, timeout=120)
    if isinstance(expected, str):
        assert got.startswith(expected)
    else:
        assert got == expected


def test_the_faults_happened_and_the_protocol_absorbed_them(world):
    assert world.run(scenarios.counters_everywhere, ("retries",)) > 0
    assert world.run(scenarios.counters_everywhere, (
        "duplicate_user_deletes", "duplicate_child_accepts", "duplicate_fork_requests",
        "late_replies")) > 0
