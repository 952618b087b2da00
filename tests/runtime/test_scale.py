"""Scale: 10,000 calls in flight to one worker (CI); a million live RRefs owned by one
worker and a 32-worker world on this 2-core machine (``slow``:
``python -m pytest -m slow tests/runtime/test_scale.py -s``).
"""

import threading

import pytest

import localrref
import scale_scenarios as scenarios
from world import running

pytestmark = [pytest.mark.processes]


@pytest.fixture(scope="module")
def world(leak_free):
    with running(2) as w:
        yield w


@pytest.mark.timeout(180)
def test_ten_thousand_calls_in_flight_to_one_worker_all_complete_and_leave_nothing(world):
    seen = world.run(scenarios.ten_thousand_calls_in_flight, timeout=150)
    assert seen["caller"] == {
        "num_outstanding_requests": "0", "num_running_jobs": "0", "agent.num_pending_calls": "0"}
    assert seen["callee"] == {  # its one running job: the query itself
        "num_outstanding_requests": "0", "num_running_jobs": "1", "agent.num_pending_calls": "0"}
    # Bounded: whatever the callee kept for 10,000 calls is not kept per call.
    assert seen["callee_uss_growth_mib"] < 64, seen


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_million_live_rrefs_owned_by_one_worker_are_held_then_all_deleted(world, capsys):
    # The user drops a million RRefs at once: a million RREF_USER_DELETEs
    # one way and as many acks the other, far more than the two pipes hold
    # (this deadlocked when a full pipe blocked the thread reading the
    # other inbox: see transport/outbox.py).
    seen = world.run(scenarios.a_million_live_rrefs, timeout=800)
    assert seen["table"] == (1_000_000, 1_000_000)  # one owner entry and one fork each
    assert seen["values"] == [0, 249_999]  # held[0], held[500_000], held[999_999]
    assert seen["emptied"] is True
    assert seen["owner_threads"] < 12, seen
    with capsys.disabled():
        print(f"\n1,000,000 live RRefs: made and sent in {seen['make_s']:.1f} s, deleted in "
              f"{seen['delete_s']:.1f} s; owner {seen['owner_bytes_per_rref']:.0f} B/RRef, "
              f"user {seen['user_bytes_per_rref']:.0f} B/RRef")


def _thirty_two(rank, results):
    localrref.init_rpc(f"worker{rank}")
    if rank == 0:
        futures = [localrref.rpc_async(f"worker{r}", scenarios.noop, args=(r,))
                   for r in range(32)]
        results.put(sum(f.wait() for f in futures))
    localrref.shutdown()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_32_worker_world_starts_serves_and_shuts_down_cleanly(leak_free, capsys):
    import multiprocessing
    import time

    results = multiprocessing.get_context("spawn").SimpleQueue()
    started = time.monotonic()
    localrref.spawn(_thirty_two, args=(results,), nprocs=32)
    elapsed = time.monotonic() - started
    assert results.get() == sum(range(32))
    results.close()
    with capsys.disabled():
        print(f"\n32 workers: start, one call to each, graceful shutdown: {elapsed:.1f} s")
    assert threading.active_count() < 10
