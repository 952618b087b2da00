"""Programs that start their workers the way torch RPC programs do, for test_rendezvous_worlds.

Each worker writes ``<outdir>/rank<r>.json`` with what it saw. Run as a
script (``python lrr_rdv_programs.py SCENARIO OUTDIR``) a process takes its
rank and world size from ``RANK``/``WORLD_SIZE``, as under torchrun or when
started by hand.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time

import torch

import localrref as rpc


def _options(init_method):
    return None if init_method is None else rpc.RpcBackendOptions(init_method=init_method,
                                                                  init_timeout=60)


def _membership():
    from localrref import api
    return api._membership


def _dump(outdir, rank, record):
    path = os.path.join(outdir, f"rank{rank}.json")
    # A temporary name per thread: kill_a_rank's victim writes its record
    # from its main thread and from a call it serves, perhaps at once.
    tmp = f"{path}.{threading.get_ident()}.tmp"
    with open(tmp, "w") as f:
        json.dump(record, f)
    os.replace(tmp, path)


def _total(rref):
    return rref.to_here().sum().item()


def _round(rank, world_size, name_prefix, init_method):
    """One world: init, calls from rank 0 to every peer (rpc_sync, remote, an RRef argument), shutdown."""
    rpc.init_rpc(f"{name_prefix}{rank}", rank=rank, world_size=world_size,
                 rpc_backend_options=_options(init_method))
    membership = _membership()
    seen = {"world_id": membership.spec.world_id, "supervisor_pid": membership.spec.supervisor_pid}
    if rank == 0:
        sums = []
        for peer in range(1, world_size):
            value = rpc.rpc_sync(f"{name_prefix}{peer}", torch.add, args=(torch.ones(4), peer))
            rref = rpc.remote(f"{name_prefix}{peer}", torch.full, args=((1000,), float(peer)))
            # An RRef as an argument: the peer fetches it back from its owner.
            total = rpc.rpc_sync(f"{name_prefix}{peer}", _total, args=(rref,))
            sums.append([value.tolist(), rref.to_here().sum().item(), total])
        seen["sums"] = sums
    rpc.shutdown()
    return seen


def basic(rank, world_size, outdir, init_method=None, rounds=2):
    """``rounds`` worlds in a row in the same processes (init_rpc after shutdown works again)."""
    rounds = int(rounds)
    record = {"rank": rank, "pid": os.getpid(), "rounds": []}
    for i in range(rounds):
        record["rounds"].append(_round(rank, world_size, f"w{i}-", init_method))
    _dump(outdir, rank, record)


def _die():
    os.kill(os.getpid(), signal.SIGKILL)


def _identity(rank):
    return {"rank": rank, "supervisor_pid": _membership().spec.supervisor_pid,
            "world_id": _membership().spec.world_id}


def _record_here(outdir, rank):
    _dump(outdir, rank, _identity(rank))


def duplicate_name(rank, world_size, outdir):
    """The last rank takes rank 0's name: every init_rpc fails, long before its timeout."""
    name = f"worker{rank % (world_size - 1)}"
    options = rpc.RpcBackendOptions(init_timeout=20)
    start = time.monotonic()
    try:
        rpc.init_rpc(name, rank=rank, world_size=world_size, rpc_backend_options=options)
    except RuntimeError as exc:
        record = {"error": str(exc)}
    else:
        record = {"error": None}
        rpc.shutdown()
    record["failed_after_s"] = time.monotonic() - start
    _dump(outdir, rank, record)


def kill_a_rank(rank, world_size, outdir, victim):
    """The victim is SIGKILLed inside a call; its peers' calls to it fail at once, naming it."""
    rpc.init_rpc(f"worker{rank}", rank=rank, world_size=world_size)
    record = _identity(rank)
    if rank != victim:
        start = time.monotonic()
        pending = rpc.rpc_async(f"worker{victim}", time.sleep, args=(60,))
        caller = 0 if victim != 0 else 1
        try:
            if rank == caller:
                # The victim serves calls before its own init_rpc returns: make
                # it write its record before it is killed, whenever that is.
                rpc.rpc_sync(f"worker{victim}", _record_here, args=(outdir, victim))
                rpc.rpc_sync(f"worker{victim}", _die)
            pending.wait()
        except Exception as exc:  # noqa: BLE001 - the test reads the message
            record["call_error"] = f"{type(exc).__name__}: {exc}"
        record["failed_after_s"] = time.monotonic() - start
        try:
            rpc.shutdown()
        except Exception as exc:  # noqa: BLE001
            record["shutdown_error"] = str(exc)
        _dump(outdir, rank, record)
    else:
        _dump(outdir, rank, record)
        while True:  # until killed
            time.sleep(1)


_told = None


def _go_on():
    _told.set()


def kill_the_supervisor(rank, world_size, outdir):
    """The supervisor is SIGKILLed: calls still work, graceful shutdown fails at once, naming it."""
    global _told
    import threading
    _told = threading.Event()
    rpc.init_rpc(f"worker{rank}", rank=rank, world_size=world_size)
    membership = _membership()
    record = {"rank": rank, "supervisor_pid": membership.spec.supervisor_pid,
              "world_id": membership.spec.world_id}
    if rank == 1:
        _told.wait(60)  # rank 0's calls after the kill must find us serving
    if rank == 0:
        pidfd = os.pidfd_open(membership.spec.supervisor_pid)
        os.kill(membership.spec.supervisor_pid, signal.SIGKILL)
        import select
        select.select([pidfd], [], [])
        os.close(pidfd)
        record["after"] = rpc.rpc_sync("worker1", torch.add, args=(torch.ones(2), 1)).tolist()
        rpc.rpc_sync("worker1", _go_on)
    start = time.monotonic()
    try:
        rpc.shutdown()
    except Exception as exc:  # noqa: BLE001
        import traceback
        record["shutdown_error"] = str(exc)
        record["traceback"] = traceback.format_exc()
    record["shutdown_s"] = time.monotonic() - start
    _dump(outdir, rank, record)


SCENARIOS = {"basic": basic}

if __name__ == "__main__":
    scenario, outdir = sys.argv[1], sys.argv[2]
    extra = sys.argv[3:]
    SCENARIOS[scenario](int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), outdir, *extra)
