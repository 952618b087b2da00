"""Scale scenarios (test_scale.py): many calls in flight, many live RRefs."""

from __future__ import annotations

import gc
import time

import psutil
import torch

import localrref as rpc


def noop(i):
    return i


def rss() -> int:
    return psutil.Process().memory_full_info().uss


def ten_thousand_calls_in_flight(n=10_000):
    """n calls to one worker, all sent before any is waited for; every one answered once."""
    before = rpc.rpc_sync("worker1", rss)
    futures = [rpc.rpc_async("worker1", noop, args=(i,)) for i in range(n)]
    values = torch.futures.wait_all(futures)
    assert values == list(range(n))
    del futures, values
    gc.collect()
    after = rpc.rpc_sync("worker1", rss)
    tables = rpc.rpc_sync("worker1", _debug)
    # A call leaves the caller's table just after its waiter wakes (once its
    # future's callbacks have run): wait for that, on progress events.
    agent = rpc.api.current.require()
    assert agent.block_until(lambda: agent.active_work() == 0, 30.0, "calls to settle")
    return {"callee_uss_growth_mib": (after - before) / 2 ** 20, "callee": tables,
            "caller": _debug()}


def _debug():
    info = rpc.get_debug_info()
    return {k: info[k] for k in ("num_outstanding_requests", "num_running_jobs",
                                 "agent.num_pending_calls")}


def owned_rrefs(n):
    """n RRefs owned by this worker, to be sent to the caller (each one a fork)."""
    return [rpc.RRef(i) for i in range(n)]


def owner_table():
    agent = rpc.api.current.require()
    with agent.lock:
        return len(agent.core.owners), sum(len(f) for f in agent.core.forks.values())


def wait_owner_table_empty(timeout):
    """On the owner: wait until every RRef it owned was deleted by its users."""
    agent = rpc.api.current.require()
    core = agent.core
    # Checked after every frame handled: O(1), not a count over the table.
    return agent.block_until(lambda: not core.owners and not core.forks, timeout,
                             "the users' deletes")


def a_million_live_rrefs(total=1_000_000, batch=250_000):
    """The caller holds ``total`` RRefs owned by worker1, then drops them all."""
    gc.collect()
    owner_before = rpc.rpc_sync("worker1", rss)
    user_before = rss()
    started = time.monotonic()
    held = []
    for _ in range(total // batch):
        held.extend(rpc.rpc_sync("worker1", owned_rrefs, args=(batch,), timeout=300))
    made = time.monotonic() - started
    assert len(held) == total
    table = rpc.rpc_sync("worker1", owner_table)
    owner_after = rpc.rpc_sync("worker1", rss)
    user_after = rss()
    values = {held[i].to_here() for i in (0, total // 2, total - 1)}
    started = time.monotonic()
    del held
    gc.collect()
    emptied = rpc.rpc_sync("worker1", wait_owner_table_empty, args=(600,), timeout=700)
    deleted = time.monotonic() - started
    return {"table": table, "emptied": emptied, "values": sorted(values),
            "owner_bytes_per_rref": (owner_after - owner_before) / total,
            "user_bytes_per_rref": (user_after - user_before) / total,
            "make_s": made, "delete_s": deleted,
            "owner_threads": rpc.rpc_sync("worker1", _threads)}


def _threads():
    import threading
    return threading.active_count()
