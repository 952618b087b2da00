"""Worker functions for the spawn tests (stdlib only: each worker imports this).

The module name is unique across tests/ on purpose: with pytest's default
import mode every test directory shares one module namespace.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import sys
import threading

from localrref import world
from localrref.codec import frames
from localrref.transport.mpqueue import Endpoint


# A spawned worker imports this module while unpickling its job, before fn runs.
_COLLECTOR_ON_AT_IMPORT = gc.isenabled()


def _endpoint() -> Endpoint:
    spec = world.current()
    return Endpoint(spec.rank, list(spec.inboxes))


def _next_control(endpoint: Endpoint) -> tuple:
    """The next control tuple in this rank's inbox, as the agent's reader thread would decode it."""
    while True:
        item = endpoint.recv()
        if item is not None:
            kind, obj = frames.decode(item[1])
            assert kind == "control", kind
            return obj


def _to_supervisor(endpoint: Endpoint, control: tuple) -> None:
    endpoint.send(world.current().supervisor_rank, frames.encode_control(control))


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
        "shm_prefix": spec.shm_prefix, "ppid": os.getppid(), "pid": os.getpid(),
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
    _write(out_dir, f"inbox{rank}.json", list(_next_control(_endpoint())))


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
    _to_supervisor(endpoint, world.shutdown_arrived_message(rank))
    first = _next_control(endpoint)
    while True:  # the drain: rounds until two show nothing in flight
        _to_supervisor(endpoint, world.shutdown_drained_message(rank, 0, 0))
        if _next_control(endpoint) == first:
            break
    leaks = [{"rref_id": f"{rank}:{i}", "fork_id": f"{rank}:{i + 100}", "owner_rank": rank,
              "holder_rank": (rank + 1) % spec.world_size, "state": "CONFIRMED",
              "value_type": "Tensor", "tensor_bytes": 64, "creation_site": f"test.py:{i}"}
             for i in range(leaks_per_rank)]
    _to_supervisor(endpoint, world.shutdown_done_message(rank, leaks))
    second = _next_control(endpoint)
    _to_supervisor(endpoint, world.shutdown_finished_message(rank))
    third = _next_control(endpoint)
    assert third == second, (second, third)
    if out_dir is not None:
        _write(out_dir, f"barrier{rank}.json", [list(first), list(second)])


def skip_shutdown_in_rank(rank: int, skipping_rank: int, out_dir: str, recorded) -> None:
    """``skipping_rank`` exits cleanly without the barrier; the others record what they get.

    ``recorded`` is a barrier of the recording ranks: the first exit(4) makes
    the supervisor stop the rest, so none exits before all have written."""
    if rank == skipping_rank:
        return
    endpoint = _endpoint()
    _to_supervisor(endpoint, world.shutdown_arrived_message(rank))
    _write(out_dir, f"barrier{rank}.json", list(_next_control(endpoint)))
    recorded.wait(30)
    sys.exit(4)


def leave_shm_entry(rank: int) -> None:
    spec = world.current()
    with open(f"/dev/shm/{spec.shm_prefix}rank{rank}", "wb") as fh:
        fh.write(b"x")


def wait_for_event(rank: int, event) -> None:
    event.wait()


def print_ready_and_block(rank: int) -> None:
    # One write of less than PIPE_BUF bytes: lines of different workers never interleave.
    os.write(1, f"ready {rank} {os.getpid()}\n".encode())
    threading.Event().wait()
