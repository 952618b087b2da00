"""Inboxes and Endpoint: in one process where possible, spawned peers otherwise.

Every frame is one atomic pipe write and no writer takes a lock; frames over
MAX_INLINE bytes travel as blobs through the sender's shared-memory pool.
"""

from __future__ import annotations

import fcntl
import gc
import logging
import multiprocessing as mp
import os
import signal
import struct
import termios
import threading
import time

import pytest
from transport_workers import (STORM, Peers, check_flood_frame, check_storm_frame, echo_peer,
                               flood, send_storm)

from localrref.errors import WorkerClosedError, WorkerGoneError
from localrref.launch.inbox import bounded_send
from localrref.transport import wire
from localrref.transport.mpqueue import (MAX_INLINE, PIPE_BUF, Endpoint, close_inboxes,
                                         make_inboxes)
from localrref.transport.shm import (ShmMapper, ShmPool, new_world_id, sweep_world_segments,
                                     world_segments)


@pytest.fixture
def inboxes():
    boxes = make_inboxes(mp.get_context("spawn"), 1)
    yield boxes
    close_inboxes(boxes)


@pytest.fixture
def blob_pool(world_id):
    pool = ShmPool(world_id, 0, threshold=1)
    yield pool
    pool.close()


@pytest.fixture(scope="module")
def echo_peers(peers_world):
    peers = Peers(echo_peer, 2, peers_world, blob_world=peers_world)
    yield peers
    peers.stop()


def pipe_bytes(inbox) -> int:
    """Bytes waiting in ``inbox``'s pipe."""
    raw = fcntl.ioctl(inbox._reader.fileno(), termios.FIONREAD, b"\0\0\0\0")
    return struct.unpack("i", raw)[0]


def test_make_inboxes_has_one_per_worker_plus_supervisor(inboxes):
    assert len(inboxes) == 2
    with pytest.raises(ValueError, match="n_workers"):
        make_inboxes(mp.get_context("spawn"), -1)


def test_send_to_self_keeps_order_and_source(inboxes, blob_pool):
    mapper = ShmMapper()
    ep = Endpoint(1, inboxes, blob_pool=blob_pool, blob_mapper=mapper)
    frames = [b"", b"a", bytearray(b"bytearray"), memoryview(b"view"), b"i" * MAX_INLINE,
              b"b" * (MAX_INLINE + 1), bytearray(b"z" * 100_000), memoryview(b"w" * 100_000),
              bytes(range(256)) * (3 << 12)]
    for frame in frames:
        ep.send(1, frame)
    assert [ep.recv(5) for _ in frames] == [(1, bytes(f)) for f in frames]
    assert blob_pool.stats().blocks_in_use == 0
    ep.close()
    # The endpoint leaves a mapper it was given to its owner.
    assert mapper.import_bytes(blob_pool.export_bytes(b"still open")) == b"still open"
    mapper.close()


def test_frames_up_to_max_inline_are_one_pipe_buf_write_bigger_ones_blobs(inboxes, blob_pool):
    assert MAX_INLINE + 8 == PIPE_BUF  # length header and sender rank
    ep = Endpoint(1, inboxes, blob_pool=blob_pool)
    ep.send(1, b"i" * MAX_INLINE)
    assert pipe_bytes(inboxes[1]) == PIPE_BUF
    assert blob_pool.stats().blocks_in_use == 0
    ep.send(1, b"b" * (MAX_INLINE + 1))
    assert PIPE_BUF < pipe_bytes(inboxes[1]) < PIPE_BUF + 100  # only a handle
    assert blob_pool.stats().blocks_in_use == 1
    assert ep.recv(5) == (1, b"i" * MAX_INLINE)
    assert ep.recv(5) == (1, b"b" * (MAX_INLINE + 1))
    assert blob_pool.stats().blocks_in_use == 0  # freed as soon as it was copied out
    ep.close()


def test_big_frame_without_blob_pool_is_refused_and_nothing_is_written(inboxes):
    ep = Endpoint(1, inboxes)
    with pytest.raises(ValueError, match=f"{MAX_INLINE + 1}-byte frame.*no blob_pool"):
        ep.send(1, b"x" * (MAX_INLINE + 1))
    assert pipe_bytes(inboxes[1]) == 0
    ep.close()


@pytest.mark.timeout(30)
def test_the_queue_lock_left_taken_by_a_dead_writer_blocks_nobody(inboxes, blob_pool):
    inboxes[1]._wlock.acquire()  # what a writer SIGKILLed mid-send used to leave behind
    try:
        ep = Endpoint(1, inboxes, blob_pool=blob_pool)
        ep.send(1, b"small")
        ep.send(1, b"big" * 10_000)
        notice = wire.encode_control(("__peer_exited__", 0, 1, -9))
        assert bounded_send(inboxes[1], wire.pack(0, notice), 1)
        assert ep.recv(5) == (1, b"small")
        assert ep.recv(5) == (1, b"big" * 10_000)
        assert ep.recv(5) == (0, notice)
        ep.close()
    finally:
        inboxes[1]._wlock.release()


def test_failed_send_gives_the_blob_block_back(inboxes, blob_pool):
    ep = Endpoint(0, inboxes, blob_pool=blob_pool)
    inboxes[1]._reader.close()  # the only read end: the pipe is broken
    with pytest.raises(WorkerGoneError, match="cannot send to rank 1"):
        ep.send(1, b"x" * 100_000)
    assert blob_pool.stats().blocks_in_use == 0
    with pytest.raises(WorkerGoneError, match="cannot send to rank 1"):
        ep.send(1, b"x")
    ep.close()


def test_a_blob_whose_segment_is_gone_is_dropped_with_a_warning(inboxes, world_id, caplog):
    pool = ShmPool(world_id, 0, threshold=1)
    ep = Endpoint(1, inboxes, blob_pool=pool)
    ep.send(1, b"x" * 10_000)
    pool.close()  # the sender closed its pool (or died and was swept)
    with caplog.at_level(logging.WARNING, logger="localrref"):
        assert ep.recv(5) is None
    assert "dropped a frame from rank 1" in caplog.text and "is gone" in caplog.text
    ep.send(1, b"next")
    assert ep.recv(5) == (1, b"next")
    ep.close()


def test_blob_blocks_are_reused_so_the_pool_does_not_grow(inboxes, blob_pool, world_id):
    ep = Endpoint(1, inboxes, blob_pool=blob_pool)
    frames = [bytes([i]) * (MAX_INLINE + 1 + 1500 * i) for i in range(50)]  # 4 KiB to 77 KiB

    def batch():
        for frame in frames:
            ep.send(1, frame)
        for frame in frames:
            assert ep.recv(5) == (1, frame)

    batch()
    first, names = blob_pool.stats(), world_segments(world_id)
    assert first.blocks_in_use == 0 and names
    for _ in range(39):  # 2000 frames in all, 50 in flight at a time
        batch()
    assert blob_pool.stats() == first
    assert world_segments(world_id) == names
    ep.close()


def test_recv_times_out_with_none(inboxes):
    ep = Endpoint(0, inboxes)
    assert ep.recv(0) is None
    assert ep.recv(0.01) is None
    ep.close()


def test_wake_returns_blocked_recv_with_none(inboxes):
    ep = Endpoint(0, inboxes)
    results = []
    reader = threading.Thread(target=lambda: results.append(ep.recv(None)))
    reader.start()
    ep.wake()  # before or during recv: the byte waits in the pipe either way
    reader.join(10)
    assert not reader.is_alive() and results == [None]
    ep.send(0, b"after")  # the wake-up was consumed; frames still flow
    assert ep.recv(5) == (0, b"after")
    ep.close()


def test_frames_read_by_a_closed_endpoint_reach_the_next_one_on_the_inbox(inboxes):
    # shutdown() then init_rpc: a new endpoint on the same inbox. One read
    # takes up to 64 KiB, so the old endpoint holds the frames behind the
    # one it returned, the last of them cut in half.
    first = Endpoint(0, inboxes)
    frames = [bytes([i]) * (MAX_INLINE - 8) for i in range(40)]
    for frame in frames:
        first.send(0, frame)
    assert first.recv(5) == (0, frames[0])
    assert pipe_bytes(inboxes[0]) > 0  # the rest of the frames were not read yet
    first.close()
    second = Endpoint(0, inboxes)
    assert [second.recv(5) for _ in frames[1:]] == [(0, f) for f in frames[1:]]
    assert second.recv(0) is None
    second.close()


def test_close_unblocks_recv_then_refuses_use(inboxes):
    ep = Endpoint(0, inboxes)
    results = []
    reader = threading.Thread(target=lambda: results.append(ep.recv(None)))
    reader.start()
    ep.close()
    reader.join(10)
    assert not reader.is_alive() and results == [None]
    with pytest.raises(WorkerClosedError, match="rank 0 is closed"):
        ep.recv(0)
    with pytest.raises(WorkerClosedError):
        ep.send(1, b"x")
    ep.close()  # idempotent
    ep.wake()   # harmless after close


def test_spinning_turns_off_after_a_slow_wait_and_on_after_a_quick_one(inboxes):
    ep = Endpoint(0, inboxes, spin_s=0.001)
    try:
        ep.send(0, b"waiting already")
        assert ep.recv(timeout=1) == (0, b"waiting already")
        assert ep._spin_pays
        # Nothing comes: the reader spins once, then sleeps; spinning is off.
        assert ep.recv(timeout=0.05) is None
        assert not ep._spin_pays
        assert ep.recv(timeout=0.05) is None
        assert not ep._spin_pays
        # A frame that is there at once turns it back on.
        ep.send(0, b"again")
        assert ep.recv(timeout=1) == (0, b"again")
        assert ep._spin_pays
    finally:
        ep.close()


def test_a_frame_arriving_while_the_reader_spins_is_received(inboxes):
    ep = Endpoint(0, inboxes, spin_s=10.0)  # spins for the whole wait
    ep._cpu_is_free = lambda: True
    sender = threading.Timer(0.05, ep.send, args=(0, b"late"))
    sender.start()
    try:
        assert ep.recv(timeout=5) == (0, b"late")
    finally:
        sender.join()
        ep.close()


def fake_loadavg(tmp_path, running: int) -> int:
    path = tmp_path / f"loadavg{running}"
    path.write_bytes(f"1.00 0.90 0.80 {running}/321 4567\n".encode())
    return os.open(path, os.O_RDONLY)


def test_spinning_waits_for_a_free_cpu(inboxes, tmp_path):
    ep = Endpoint(0, inboxes, spin_s=1.0)
    real = ep._loadavg
    try:
        ep._cpus = 2
        for running, free in ((1, True), (2, True), (3, False), (40, False)):
            ep._loadavg = fake_loadavg(tmp_path, running)
            assert ep._cpu_is_free() is free, running
            os.close(ep._loadavg)
        # Busy CPUs: the wait sleeps at once. Not having spun, a 50 ms wait
        # (under spin_s) leaves spinning "paying"; a spin that timed out would not.
        ep._loadavg = fake_loadavg(tmp_path, 40)
        assert ep.recv(timeout=0.05) is None and ep._spin_pays
        os.close(ep._loadavg)
        ep._loadavg = fake_loadavg(tmp_path, 1)
        assert ep.recv(timeout=0.05) is None and not ep._spin_pays
    finally:
        os.close(ep._loadavg)
        ep._loadavg = real
        ep.close()


def test_nudge_ends_a_spinning_recv_and_says_when_nobody_spins(inboxes):
    ep = Endpoint(0, inboxes, spin_s=30.0)  # spins for the whole wait
    ep._cpu_is_free = lambda: True          # however busy this machine is
    try:
        assert ep.nudge() is False  # nobody in recv: the caller must wake some other way
        results = []
        reader = threading.Thread(target=lambda: results.append(ep.recv(timeout=20)))
        reader.start()
        while not ep.nudge():  # true only once the reader spins
            time.sleep(0.001)
        reader.join(10)
        assert results == [None] and not reader.is_alive()
        # The nudge is spent: the next recv gets the next frame.
        ep.send(0, b"after")
        assert ep.recv(timeout=1) == (0, b"after")
    finally:
        ep.close()


def test_negative_spin_is_refused(inboxes):
    with pytest.raises(ValueError, match="spin_s must be >= 0"):
        Endpoint(0, inboxes, spin_s=-1)


def test_bad_ranks_are_refused(inboxes):
    with pytest.raises(ValueError, match="rank 2 has no inbox"):
        Endpoint(2, inboxes)
    ep = Endpoint(0, inboxes)
    with pytest.raises(ValueError, match="no rank 5"):
        ep.send(5, b"x")
    ep.close()


# -- between processes -------------------------------------------------------------

@pytest.mark.processes
@pytest.mark.timeout(120)
@pytest.mark.parametrize("size", [0, 1, MAX_INLINE, MAX_INLINE + 1, 70_000, 3 << 20])
def test_frames_round_trip_between_processes(echo_peers, size):
    frame = bytes(range(256)) * (size // 256) + b"t" * (size % 256)
    echo_peers.ep.send(0, frame)
    assert echo_peers.answer(0) == frame


@pytest.mark.processes
@pytest.mark.timeout(120)
def test_many_threads_in_many_processes_never_tear_or_reorder_frames(echo_peers):
    # Two peers with three threads each, and two threads of this process,
    # all write small and big frames (up to 3 MiB) into this rank's inbox.
    threads, n, me = 3, 24, 2
    for rank in (0, 1):
        echo_peers.ep.send(rank, b"storm" + STORM.pack(threads, n))
    ours = threading.Thread(target=send_storm, args=(echo_peers.ep, me, me, 2, n))
    ours.start()
    next_seq = {(rank, t): 0 for rank in (0, 1) for t in range(threads)}
    next_seq |= {(me, t): 0 for t in range(2)}
    try:
        for _ in range(n * len(next_seq)):
            got = echo_peers.ep.recv(60)
            assert got is not None, f"writers stopped early: {next_seq}"
            src, frame = got
            rank, thread, seq = check_storm_frame(frame)
            assert rank == src and seq == next_seq[rank, thread]  # FIFO per writer
            next_seq[rank, thread] += 1
    finally:
        ours.join(60)
    assert set(next_seq.values()) == {n}
    assert echo_peers.ep.recv(0) is None


@pytest.mark.processes
@pytest.mark.timeout(120)
def test_writers_sigkilled_mid_send_never_block_other_writers_or_the_reader(echo_peers):
    # Each round forks a writer that floods this rank's inbox with small and
    # big frames (it mostly sits blocked on the full pipe), kills it once 25
    # of its frames arrived, then checks that a peer process, this process
    # and the supervisor's bounded send still get through, and that every
    # frame the reader sees is whole.
    ep, me, victim_rank = echo_peers.ep, 2, 1
    victim_world = new_world_id()
    fork = mp.get_context("fork")  # the victims need no fresh interpreter
    flooded: dict[int, int] = {}

    def receive(want: set, flood_round: int | None = None) -> None:
        """Receive until every frame of ``want`` arrived, and 25 flood frames
        of ``flood_round`` if one is named; check every flood frame on the way."""
        deadline = time.monotonic() + 60
        while want or (flood_round is not None and flooded.get(flood_round, 0) < 25):
            got = ep.recv(max(0.0, deadline - time.monotonic()))
            assert got is not None, f"the inbox stalled; still waiting for {want or 'floods'}"
            src, frame = got
            if frame[:1] == b"F":
                assert src == victim_rank
                seen_round, _ = check_flood_frame(frame)
                flooded[seen_round] = flooded.get(seen_round, 0) + 1
            else:
                assert (src, frame) in want, f"unexpected frame from rank {src}"
                want.remove((src, frame))

    try:
        for round_ in range(20):
            victim = fork.Process(target=flood, args=(victim_rank, echo_peers.inboxes,
                                                      victim_world, me, round_))
            victim.start()
            receive(set(), flood_round=round_)
            victim.kill()
            victim.join(30)
            assert victim.exitcode == -signal.SIGKILL
            victim.close()
            control = wire.encode_control(("after", round_))
            assert bounded_send(echo_peers.inboxes[me], wire.pack(me, control), timeout=10)
            small, big = b"s%d" % round_, bytes([round_]) * 70_000
            ep.send(0, small)
            ep.send(0, big)
            receive({(0, small), (0, big), (me, control)})
    finally:
        gc.collect()
        swept = sweep_world_segments(victim_world)
    assert swept  # killed writers cannot unlink: the supervisor's sweep does
    assert world_segments(victim_world) == []
