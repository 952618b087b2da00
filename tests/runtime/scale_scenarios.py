"""Scale scenarios (test_scale.py): many calls in flight."""

from __future__ import annotations

import gc

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
