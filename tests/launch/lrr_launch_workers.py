"""Worker functions for the spawn tests (stdlib only: each worker imports this).

The module name is unique across tests/ on purpose: with pytest's default
import mode every test directory shares one module namespace.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import signal
import sys
import threading

from localrref import control_messages as cm
from localrref import world
from localrref.transport import wire
from localrref.transport.mpqueue import Endpoint
from localrref.transport.segment import segment_prefix


# A spawned worker imports this module while unpickling its job, before fn runs.
_COLLECTOR_ON_AT_IMPORT = gc.isenabled()


def _endpoint() -> Endpoint:
    spec = world.current()
    return Endpoint(spec.rank, list(spec.inboxes))


def _next_control(endpoint: Endpoint):
    """The next control record in this rank's inbox, as the agent's reader would decode it."""
    while True:
        item = endpoint.recv()
        if item is not None:
            return wire.decode_control(item[1])


def _as_json(control) -> list:
    """A control record as JSON: its type name, then its fields."""
    return [type(control).__name__, *dataclasses.astuple(control)]


def _to_supervisor(endpoint: Endpoint, control) -> None:
    endpoint.send(world.current().supervisor_rank, wire.encode_control(control))


def _write(out_dir: str, name: str, data: object) -> None:
    path = os.path.join(out_dir, name)
    with open(path + ".tmp", "w") as fh:
        json.dump(data, fh)
    os.replace(path + ".tmp", path)  # a reader never sees half a file


def report_world(rank: int, out_dir: str) -> None:
    spec = world.current()
    _write(out_dir, f"rank{rank}.json", {
        "rank": spec.rank, "world_size": spec.world_size, "world_id": spec.world_id,
        "supervisor_pid": spec.supervisor_pid, "inboxes": len(spec.inboxes),
        "shm_prefix": segment_prefix(spec.world_id), "ppid": os.getppid(), "pid": os.getpid(),
        "strict_leaks": spec.strict_leaks, "record_creation_sites": spec.record_creation_sites,
        "shutdown_timeout": spec.shutdown_timeout,
        "collector_on_at_import": _COLLECTOR_ON_AT_IMPORT, "collector_on": gc.isenabled(),
        "frozen_objects": gc.get_freeze_count(),
    })


def _block_on_inbox() -> None:
    endpoint = _endpoint()
    while True:
        _next_control(endpoint)


def raise_in_rank(rank: int, bad_rank: int) -> None:
    if rank == bad_rank:
        raise ValueError(f"boom from rank {rank}")
    _block_on_inbox()


def exit_in_rank(rank: int, bad_rank: int, how: str, out_dir: str) -> None:
    """``bad_rank`` dies (SIGKILL or exit code 3); the others record what their inbox receives."""
    if rank == bad_rank:
        if how == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        os._exit(3)
    _write(out_dir, f"inbox{rank}.json", _as_json(_next_control(_endpoint())))


def ignore_sigterm_then_block(rank: int, bad_rank: int, ignoring) -> None:
    if rank == bad_rank:
        ignoring.wait()  # exiting sooner, we could be stopped before the others ignore SIGTERM
        sys.exit(2)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    ignoring.set()
    threading.Event().wait()


def graceful_shutdown(rank: int, leaks_per_rank: int, out_dir: str | None = None) -> None:
    """The worker side of the shutdown barrier, as the agent runs it, reporting some leaks."""
    spec = world.current()
    endpoint = _endpoint()
    _to_supervisor(endpoint, cm.ShutdownArrived(rank=rank))
    first = _next_control(endpoint)
    while True:  # the drain: rounds until two show nothing in flight
        _to_supervisor(endpoint, cm.ShutdownDrained(rank=rank, sent=0, received=0))
        if _next_control(endpoint) == first:
            break
    leaks = [{"rref_id": f"{rank}:{i}", "fork_id": f"{rank}:{i + 100}", "owner_rank": rank,
              "holder_rank": (rank + 1) % spec.world_size, "state": "CONFIRMED",
              "value_type": "Tensor", "tensor_bytes": 64, "creation_site": f"test.py:{i}"}
             for i in range(leaks_per_rank)]
    _to_supervisor(endpoint, cm.ShutdownDone(rank=rank, leaks=leaks))
    second = _next_control(endpoint)
    _to_supervisor(endpoint, cm.ShutdownFinished(rank=rank))
    third = _next_control(endpoint)
    assert third == second, (second, third)
    if out_dir is not None:
        _write(out_dir, f"barrier{rank}.json", [_as_json(first), _as_json(second)])


def skip_shutdown_in_rank(rank: int, skipping_rank: int, out_dir: str, recorded) -> None:
    """``skipping_rank`` exits cleanly without the barrier; the others record what they get.

    ``recorded`` is a barrier of the recording ranks: the first exit(4) makes
    the supervisor stop the rest, so none exits before all have written."""
    if rank == skipping_rank:
        return
    endpoint = _endpoint()
    _to_supervisor(endpoint, cm.ShutdownArrived(rank=rank))
    # A clean exit without a completed shutdown is a death to the peers
    # (their calls to it must fail): its PeerExited may come first.
    notices = []
    control = _next_control(endpoint)
    while isinstance(control, cm.PeerExited):
        notices.append(_as_json(control)[:2])
        control = _next_control(endpoint)
    _write(out_dir, f"barrier{rank}.json", [_as_json(control), notices])
    recorded.wait(30)
    sys.exit(4)


def leave_shm_entry(rank: int) -> None:
    spec = world.current()
    with open(f"/dev/shm/{segment_prefix(spec.world_id)}rank{rank}", "wb") as fh:
        fh.write(b"x")


def wait_for_event(rank: int, event) -> None:
    event.wait()


def print_ready_and_block(rank: int) -> None:
    # One write of less than PIPE_BUF bytes: lines of different workers never interleave.
    os.write(1, f"ready {rank} {os.getpid()}\n".encode())
    threading.Event().wait()
