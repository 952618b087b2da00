"""The crash matrix's worker side (test_crash_matrix.py): one world per cell.

Every cell is a world of three workers: rank 0 the caller (a user, the
parent of a fork), rank 1 the callee (the owner), rank 2 a third worker
(the child a fork goes to). One of them, the victim, SIGKILLs itself at the
cell's point (fault injection's ``kill_on``, or a user function that kills
its own process). The driver (rank 0, or rank 2 when rank 0 is the victim)
does the cell's step, checks that the affected call fails with an error
naming the victim and that the survivors still work, waits until the
owner's tables hold nothing for the dead, and reports. Every survivor then
calls ``shutdown()`` (the others wait for the driver first), which fails
naming the victim, and reports that too.
"""

from __future__ import annotations

import gc
import os
import signal
import threading
import time

import torch

import localrref as rpc
from localrref import world
from localrref.errors import WorkerGoneError

SETTLE_S = 30.0
# Under the 13 s a control message to a dead worker would spend in retries
# (torch's backoff) if it were retried instead of dropped.
TABLES_SETTLE_S = 8.0
_held: list = []
_go = threading.Event()  # the driver is done: shut down


# -- functions the cells call -----------------------------------------------------


def release():
    _go.set()


def noop(*args):
    return len(args)


def value(n=4):
    return torch.arange(n)


def big(n_bytes):
    return torch.ones(n_bytes // 4)


def die_now():
    """Kill this process while its inbox's reader runs this very function."""
    os.kill(os.getpid(), signal.SIGKILL)


def fetch(rref):
    return rref.to_here()


def hold(rref):
    """Keep a fork (the child's side of a fork), and use it."""
    _held.append(rref)
    return rref.to_here()


def use_held_then_drop():
    out = [r.to_here() for r in _held]
    _held.clear()
    gc.collect()
    return [t.tolist() for t in out]


def tables():
    info = rpc.get_debug_info()
    return {k: int(info[k]) for k in (
        "num_owner_rrefs", "num_forks", "num_pending_users", "num_pending_children",
        "num_pending_futures", "num_outstanding_requests", "num_pending_owners")}


def settled_tables(dead: int):
    """On any worker: wait until its tables hold nothing (the dead worker's share
    released, every delete acknowledged); return them as they are then."""
    _wait_dead(rpc.api.current.require(), dead)
    gc.collect()
    rpc.api._wait_until_tables_empty(TABLES_SETTLE_S)
    return tables()


def _wait_dead(agent, rank: int) -> None:
    agent.block_until(lambda: rank in agent.dead, SETTLE_S, f"rank {rank}'s death notice")


# -- the cells: what the driver does -----------------------------------------------

def _expect_gone(what, fn):
    """Run ``fn``; it must fail naming the victim. Returns a report line."""
    started = time.monotonic()
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - the test checks the text
        return {"step": what, "error": f"{type(exc).__name__}: {exc}",
                "seconds": time.monotonic() - started}
    return {"step": what, "error": None, "seconds": time.monotonic() - started}


def drive(cell: dict, me: int) -> dict:
    """The driver's part of ``cell``; returns what it saw."""
    victim, step = cell["victim"], cell["step"]
    agent = rpc.api.current.require()
    out: dict = {"driver": me}
    w = lambda r: f"worker{r}"  # noqa: E731

    if me == 2:  # rank 0 is the victim: watch it die, then check what it left
        _wait_dead(agent, 0)
        if step == "child accept":
            out["held"] = use_held_then_drop()  # the child's fork outlives its parent
        out["survivor call"] = rpc.rpc_sync(w(1), noop, args=(1, 2))
        out["owner tables"] = rpc.rpc_sync(w(1), settled_tables, args=(0,))
        return out

    rref = None
    if step == "call":
        out["failed"] = _expect_gone(step, lambda: rpc.rpc_sync(w(1), noop))
    elif step == "remote":
        out["failed"] = _expect_gone(step,
                                     lambda: rpc.remote(w(1), value).to_here())
    elif step in ("fork request", "child accept"):
        rref = rpc.remote(w(1), value)
        rref.to_here()
        # Passing rank 1's RRef to rank 2 forks it: rank 2 asks the owner
        # (RREF_FORK_REQUEST), the owner acks, rank 2 runs hold() and its
        # reply tells us the child is accepted.
        out["failed"] = _expect_gone(step,
                                     lambda: rpc.rpc_sync(w(2), hold, args=(rref,)))
    elif step == "to_here":
        rref = rpc.remote(w(1), value)
        out["failed"] = _expect_gone(step, rref.to_here)
    elif step == "user delete":
        rref = rpc.remote(w(1), value)
        rref.to_here()
        rref = None
        gc.collect()  # the delete goes now; the owner dies on it
        _wait_dead(agent, victim)
        out["failed"] = _expect_gone(step, lambda: rpc.rpc_sync(w(1), noop))
    elif step == "copy":
        out["failed"] = _expect_gone(step,
                                     lambda: rpc.rpc_sync(w(1), big, args=(64 << 20,)))
    elif step == "reader runs the victim's function":
        out["failed"] = _expect_gone(step, lambda: rpc.rpc_sync(w(1), die_now))
    else:
        raise ValueError(f"no step {step!r}")
    survivor = 2 if victim == 1 else 1
    out["survivor call"] = rpc.rpc_sync(w(survivor), noop, args=(1, 2))
    del rref
    gc.collect()
    if victim != 1:  # the owner lives: it must hold nothing for anyone now
        out["owner tables"] = rpc.rpc_sync(w(1), settled_tables, args=(victim,))
    out["my tables"] = settled_tables(victim)
    return out


def worker(rank: int, cell: dict, results, arrived, go) -> None:
    options = dict(rpc_timeout=0)  # no timeout: only a death notice can end a call
    if rank == cell["victim"] and cell.get("kill_on"):
        opts = rpc.FaultyRpcBackendOptions(kill_on=cell["kill_on"],
                                           kill_after=cell.get("kill_after", 1), **options)
    else:
        opts = rpc.RpcBackendOptions(**options)
    # The supervisor stops the survivors once the victim dies and this
    # function returns (torch's spawn does too): they report first.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    rpc.init_rpc(f"worker{rank}", rpc_backend_options=opts)
    # No one starts its step before every init_rpc returned: a peer still
    # meeting the others when the victim dies fails its init_rpc instead.
    # (Not a barrier of RPCs: those would pass the kill points.)
    arrived.put(rank)
    go[rank].get()  # the test puts one in each worker's queue once all three arrived
    report: dict = {"rank": rank, "world": world.current().world_id}
    victim = cell["victim"]
    driver = 2 if victim == 0 else 0
    try:
        if rank == driver and cell["step"] not in SHUTDOWN_STEPS:
            report.update(drive(cell, rank))
        elif rank == victim and cell["step"] in ("fork request", "child accept", "call",
                                                   "remote", "to_here", "user delete", "copy"):
            if victim == 0:  # the caller dies in its own step
                _victim_caller(cell)
    except Exception as exc:  # noqa: BLE001 - reported, the test fails on it
        report["driver error"] = f"{type(exc).__name__}: {exc}"
    # The others serve until the driver is done: a worker in shutdown()
    # fails it at once once a peer died, and stops serving.
    if rank == driver and cell["step"] not in SHUTDOWN_STEPS:
        for other in set(range(3)) - {rank, victim}:
            rpc.rpc_sync(f"worker{other}", release)
    elif cell["step"] not in SHUTDOWN_STEPS:
        _go.wait(SETTLE_S * 3)
    started = time.monotonic()
    try:
        if cell["step"] in SHUTDOWN_STEPS and rank == 0:
            # Something for the DELETING phase: a user RRef to delete.
            _held.append(rpc.remote("worker1", value))
            _held[-1].to_here()
        rpc.shutdown()
        report["shutdown"] = "ok"
    except Exception as exc:  # noqa: BLE001
        report["shutdown"] = f"{type(exc).__name__}: {exc}"
    report["shutdown seconds"] = time.monotonic() - started
    _held.clear()
    results.put(report)


def _victim_caller(cell: dict) -> None:
    """Rank 0 as the victim: start the step; it is killed inside it."""
    step = cell["step"]
    if step == "call":
        rpc.rpc_sync("worker1", noop)
    elif step == "remote":
        rpc.remote("worker1", value)
    elif step in ("fork request", "child accept"):
        rref = rpc.remote("worker1", value)
        rref.to_here()
        rpc.rpc_sync("worker2", hold, args=(rref,))
    elif step == "to_here":
        rpc.remote("worker1", value).to_here()
    elif step == "user delete":
        rref = rpc.remote("worker1", value)
        rref.to_here()
        del rref
        gc.collect()
    elif step == "copy":
        rpc.rpc_sync("worker1", noop, args=(torch.ones(16 << 20),))
    threading.Event().wait(SETTLE_S)  # the kill comes (or the test times out)
    raise AssertionError(f"rank 0 was not killed during {step!r}")


SHUTDOWN_STEPS = ("shutdown: arriving", "shutdown: draining", "shutdown: reporting",
                  "shutdown: deleting", "shutdown: finishing")
