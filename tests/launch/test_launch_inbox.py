"""The supervisor's inbox access against real inboxes, the transport's Endpoint and the codec."""

from __future__ import annotations

import gc
import logging
import multiprocessing
import os
import select
import struct
import subprocess
import sys
import threading
import time

import pytest

from localrref.codec import frames
from localrref.control_messages import PeerExited, ShutdownArrived, ShutdownDone
from localrref.core.messages import RRefAck
from localrref.launch.inbox import InboxReader, bounded_send, send_control
from localrref.transport import wire
from localrref.transport.mpqueue import Endpoint, close_inboxes, make_inboxes


def encode_control(src, control) -> bytes:
    """A whole record of ``control`` from rank ``src``."""
    return wire.pack(src, wire.encode_control(control))


def decoded(received) -> list:
    """(src, control) for each (src, frame) the reader returned; None for other frames."""
    return [(src, wire.decode_control(frame) if frame[:1] == wire.CONTROL_TAG else None)
            for src, frame in received]
from localrref.transport.shm import ShmPool, new_world_id, sweep_world_segments, world_segments


@pytest.fixture
def inboxes():
    queues = make_inboxes(multiprocessing.get_context("spawn"), 2)  # ranks 0, 1; supervisor 2
    yield queues
    close_inboxes(queues)


@pytest.fixture
def blob_pool():
    """A worker's pool, for control frames too big for one pipe write."""
    world = new_world_id()
    pool = ShmPool(world, 0, threshold=1)
    yield pool
    pool.close()
    gc.collect()
    left = world_segments(world)
    sweep_world_segments(world)
    assert left == [], f"segments left in /dev/shm: {left}"


def fill_pipe(queue) -> int:
    """Fill ``queue``'s pipe with whole control frames; return how many."""
    frame = encode_control(0, ("filler", "x" * 3000))
    fd, count = queue._writer.fileno(), 0
    os.set_blocking(fd, False)  # briefly, on a pipe no other process holds
    try:
        while True:
            os.write(fd, frame)
            count += 1
    except BlockingIOError:
        return count
    finally:
        os.set_blocking(fd, True)


def test_supervisor_frames_are_what_the_agent_reads(inboxes):
    # The agent's reader: Endpoint.recv, then the wire's control decoding.
    notice = PeerExited(rank=1, pid=42, exitcode=-9)
    assert send_control(inboxes[0], 2, notice, timeout=1)
    src, frame = Endpoint(0, inboxes).recv(timeout=5)
    assert (src, wire.decode_control(frame)) == (2, notice)


def test_worker_frames_are_what_the_supervisor_reads(inboxes):
    reader = InboxReader(inboxes[2])
    Endpoint(1, inboxes).send(2, wire.encode_control(ShutdownArrived(rank=1)))
    Endpoint(0, inboxes).send(2, frames.encode_message(RRefAck(request_id=7)))
    assert decoded(reader.read_available()) == [(1, ShutdownArrived(rank=1)), (0, None)]


@pytest.mark.timeout(30)
def test_a_lock_a_dead_writer_kept_stops_no_send(inboxes):
    inboxes[0]._wlock.acquire()  # what a writer SIGKILLed mid-send used to leave behind
    try:
        notice = PeerExited(rank=1, pid=42, exitcode=-9)
        assert send_control(inboxes[0], 2, notice, timeout=1)
        Endpoint(1, inboxes).send(0, wire.encode_control(("from", 1)))
        receiver = Endpoint(0, inboxes)
        assert [wire.decode_control(receiver.recv(timeout=5)[1]) for _ in range(2)] == \
            [notice, ("from", 1)]
    finally:
        inboxes[0]._wlock.release()


def test_bounded_send_gives_up_on_a_full_pipe(inboxes):
    fill_pipe(inboxes[0])
    assert bounded_send(inboxes[0], encode_control(2, ("x",)), timeout=0.05) is False


@pytest.mark.timeout(60)
def test_bounded_send_waits_for_room_and_writes_its_frame_whole(inboxes):
    filled = fill_pipe(inboxes[0])
    results = []
    sender = threading.Thread(target=lambda: results.append(
        bounded_send(inboxes[0], encode_control(2, ("late",)), timeout=30)))
    sender.start()
    reader, got = InboxReader(inboxes[0]), []
    deadline = time.monotonic() + 30
    while len(got) <= filled and time.monotonic() < deadline:
        select.select([reader], [], [], deadline - time.monotonic())
        got += decoded(reader.read_available())
    sender.join(30)
    assert results == [True]
    assert {control[0] for _, control in got[:filled]} == {"filler"}
    assert got[filled:] == [(2, ("late",))]


def test_bounded_send_reports_a_pipe_without_readers(inboxes):
    inboxes[0]._reader.close()
    assert bounded_send(inboxes[0], encode_control(2, ("x",)), timeout=1) is False


def test_bounded_send_refuses_large_frames(inboxes):
    with pytest.raises(ValueError, match="exceeds PIPE_BUF"):
        bounded_send(inboxes[0], encode_control(2, ("x" * 10000,)), timeout=1)


def test_reader_returns_whole_frames_only(inboxes):
    reader = InboxReader(inboxes[2])
    assert reader.read_available() == []
    frame = encode_control(0, ("__leak_report__", 0, [{"rref_id": "0:1"}]))
    payload = (0, frame[8:])
    fd = inboxes[2]._writer.fileno()
    os.write(fd, frame[:3])  # not even a whole header
    assert reader.read_available() == []
    os.write(fd, frame[3:10])
    assert reader.read_available() == []
    os.write(fd, frame[10:] + frame)  # the rest, then a second frame
    assert reader.read_available() == [payload, payload]


def test_reader_reads_big_frames_from_shared_memory(inboxes, blob_pool):
    reader = InboxReader(inboxes[2])
    big = ShutdownDone(rank=0, leaks=[{"rref_id": str(i), "state": "x" * 100} for i in range(400)])
    worker = Endpoint(0, inboxes, blob_pool=blob_pool)
    worker.send(2, wire.encode_control(big))  # ~50 KB: a blob
    worker.send(2, wire.encode_control(("small", 0)))
    assert decoded(reader.read_available()) == [(0, big), (0, ("small", 0))]
    assert blob_pool.stats().blocks_in_use == 0  # the reader freed the block
    reader.close()


def test_reader_drops_a_blob_whose_segment_is_gone(inboxes, blob_pool, caplog):
    reader = InboxReader(inboxes[2])
    worker = Endpoint(1, inboxes, blob_pool=blob_pool)
    worker.send(2, wire.encode_control(("lost", "x" * 10_000)))
    worker.send(2, wire.encode_control(("kept", 1)))
    blob_pool.close()  # the worker closed its pool, or died and was swept
    with caplog.at_level(logging.WARNING, logger="localrref"):
        assert decoded(reader.read_available()) == [(1, ("kept", 1))]
    assert "dropped a frame from rank 1" in caplog.text
    reader.close()


def test_the_inbox_helpers_do_not_import_torch():
    # The launcher never imports torch (a second of start-up), yet reads blobs.
    code = ("import sys, localrref.launch.inbox, localrref.launch.launcher; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


def test_undecodable_control_frames_are_named():
    with pytest.raises(ValueError, match="does not unpickle"):
        wire.decode_control(b"C\x80zz")
    assert wire.decode_control(wire.encode_control(("ok",))) == ("ok",)


def test_reader_sees_eof_when_every_writer_closed(inboxes):
    reader = InboxReader(inboxes[2])
    inboxes[2]._writer.close()
    assert reader.read_available() == []
    assert reader.eof
