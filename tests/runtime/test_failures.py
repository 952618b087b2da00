"""Failure paths over real processes: dead peers, shutdown, re-init, bad worlds."""

import multiprocessing

import pytest
from torch.multiprocessing.spawn import ProcessExitedException, ProcessRaisedException

import failure_workers as fw
import localrref
from localrref.launch.supervisor import start_processes
from localrref.transport.shm import world_segments

pytestmark = [pytest.mark.processes, pytest.mark.timeout(120)]


@pytest.fixture
def results(leak_free):
    queue = multiprocessing.get_context("spawn").SimpleQueue()
    yield queue
    queue.close()


def drain(queue):
    out = []
    while not queue.empty():
        out.append(queue.get())
    return out


def test_killed_peer_fails_pending_calls_at_once_naming_it(results):
    with pytest.raises(ProcessExitedException) as info:
        localrref.spawn(fw.kill_peer_during_call, args=(results,), nprocs=2)
    assert info.value.error_index == 1 and "SIGKILL" in str(info.value)
    got = {item[0]: item[1:] for item in drain(results)}
    message, rank, same_pid, exitcode = got["gone"]
    assert rank == 1 and same_pid and exitcode == -9
    assert "rank 1 ('worker1')" in message and "was killed by signal SIGKILL" in message
    assert "WorkerGoneError: worker rank 1 ('worker1')" in got["future gone"][0]
    assert "SIGKILL" in got["future gone"][0]
    assert "SIGKILL" in got["to_here gone"][0]
    assert "worker1" in got["later call gone"][0]
    assert "shutdown failed" in got and "rank 1" in got["shutdown failed"][0]


def test_a_peer_killed_in_its_backward_pass_fails_the_backward_at_once_naming_it(results):
    with pytest.raises(ProcessExitedException) as info:
        localrref.spawn(fw.kill_peer_during_backward, args=(results,), nprocs=2)
    assert info.value.error_index == 1 and "SIGKILL" in str(info.value)
    got = dict(drain(results))
    assert "worker 1 died during the distributed backward pass" in got["backward failed"]
    assert got["contexts"] == "1" and got["contexts after"] == "0"
    assert "rank 1" in got["shutdown failed"]


def test_a_peer_that_leaves_without_a_graceful_shutdown_fails_calls_to_it(results):
    # It exits with 0, but the world never shut down: to its peers that is
    # a death like any other.
    localrref.spawn(fw.peer_leaves_without_graceful_shutdown, args=(results,), nprocs=2)
    got = dict(drain(results))
    assert "worker rank 1 ('worker1')" in got["gone"] and "exited with code 0" in got["gone"]
    assert "rank 1" in got["shutdown failed"]


def test_init_rpc_works_again_after_a_clean_shutdown(results):
    localrref.spawn(fw.reinit_after_shutdown, args=(results,), nprocs=2)
    by_rank = dict(drain(results))
    for rank in (0, 1):
        first, after_rref, after_rpc, again = by_rank[rank]
        assert first == 2.0 and again == 3.0
        assert "used after shutdown" in after_rref or "shut down" in after_rref
        assert "RPC has not been initialized" in after_rpc



def test_a_restart_whose_hello_the_peers_old_agent_read_still_meets_the_peer(results):
    hello_sent, first_done = (multiprocessing.get_context("spawn").Event() for _ in range(2))
    localrref.spawn(fw.restart_while_the_peer_still_reads, args=(results, hello_sent, first_done),
                    nprocs=2)
    assert dict(drain(results)) == {r: (2.0, ["again0", "again1"], 3.0) for r in (0, 1)}

def test_duplicate_names_are_refused(results):
    localrref.spawn(fw.duplicate_names, args=(results,), nprocs=2)
    messages = dict(drain(results))
    assert all("'same' is not unique" in m for m in messages.values()), messages


def test_world_size_mismatch_is_refused(results):
    localrref.spawn(fw.wrong_world_size, args=(results,), nprocs=2)
    messages = dict(drain(results))
    assert all("world size mismatch" in m for m in messages.values()), messages


def test_a_worker_that_never_reaches_shutdown_is_named(results):
    context = start_processes(fw.never_reaches_shutdown, args=(results,), nprocs=2, join=False,
                              shutdown_timeout=2.0)
    with pytest.raises(ProcessRaisedException) as info:
        while not context.join():
            pass
    assert info.value.error_index == 0
    (message,) = drain(results)
    assert "worker rank(s) [1] did not reach shutdown() within 2 s" in message


def test_no_shm_segment_outlives_a_killed_worker(results):
    with pytest.raises(ProcessExitedException):
        localrref.spawn(fw.kill_peer_during_call, args=(results,), nprocs=2)
    # That world's own segments only: other runs may share this /dev/shm.
    (world_id,) = {item[0]: item[1:] for item in drain(results)}["world"]
    assert world_segments(world_id) == []
