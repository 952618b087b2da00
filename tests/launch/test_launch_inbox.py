"""The supervisor's inbox access against real inboxes, the transport's Endpoint and the codec."""

from __future__ import annotations

import multiprocessing
import os
import struct

import pytest

from localrref.codec import frames
from localrref.launch.inbox import InboxReader, bounded_send, decode_control, encode_control
from localrref.transport.mpqueue import Endpoint, close_inboxes, make_inboxes


@pytest.fixture
def inboxes():
    queues = make_inboxes(multiprocessing.get_context("spawn"), 2)  # ranks 0, 1; supervisor 2
    yield queues
    close_inboxes(queues)


def test_supervisor_frames_are_what_the_agent_reads(inboxes):
    # The agent's reader: Endpoint.recv then codec.frames.decode.
    assert bounded_send(inboxes[0], encode_control(2, ("__peer_exited__", 1, 42, -9)), timeout=1)
    src, frame = Endpoint(0, inboxes).recv(timeout=5)
    assert (src, frames.decode(frame)) == (2, ("control", ("__peer_exited__", 1, 42, -9)))


def test_worker_frames_are_what_the_supervisor_reads(inboxes):
    reader = InboxReader(inboxes[2])
    Endpoint(1, inboxes).send(2, frames.encode_control(("__shutdown_arrived__", 1)))
    Endpoint(0, inboxes).send(2, frames.encode_message("not a control tuple"))
    src_control = [decode_control(payload) for payload in reader.read_available()]
    assert src_control == [(1, ("__shutdown_arrived__", 1)), (0, None)]


def test_bounded_send_gives_up_on_a_lock_a_dead_writer_kept(inboxes):
    inboxes[0]._wlock.acquire()  # as if a writer died mid-send
    try:
        assert bounded_send(inboxes[0], encode_control(2, ("x",)), timeout=0.05) is False
    finally:
        inboxes[0]._wlock.release()
    assert Endpoint(0, inboxes).recv(timeout=0) is None


def test_bounded_send_gives_up_on_a_full_pipe(inboxes):
    fd = inboxes[0]._writer.fileno()
    os.set_blocking(fd, False)
    try:
        while True:
            os.write(fd, b"\0" * 65536)
    except BlockingIOError:
        pass
    finally:
        os.set_blocking(fd, True)
    assert bounded_send(inboxes[0], encode_control(2, ("x",)), timeout=0.05) is False


def test_bounded_send_refuses_large_frames(inboxes):
    with pytest.raises(ValueError, match="exceeds PIPE_BUF"):
        bounded_send(inboxes[0], encode_control(2, ("x" * 10000,)), timeout=1)


def test_reader_returns_whole_frames_only(inboxes):
    reader = InboxReader(inboxes[2])
    assert reader.read_available() == []
    payload = encode_control(0, ("__leak_report__", 0, [{"rref_id": "0:1"}]))
    frame = struct.pack("!i", len(payload)) + payload
    fd = inboxes[2]._writer.fileno()
    os.write(fd, frame[:3])  # not even a whole header
    assert reader.read_available() == []
    os.write(fd, frame[3:10])
    assert reader.read_available() == []
    os.write(fd, frame[10:] + frame)  # the rest, then a second frame
    assert reader.read_available() == [payload, payload]


def test_reader_reads_big_frames(inboxes):
    reader = InboxReader(inboxes[2])
    big = ("__shutdown_done__", 0, [{"rref_id": str(i), "state": "x" * 100} for i in range(400)])
    Endpoint(0, inboxes).send(2, frames.encode_control(big))  # ~50 KB: several kernel reads' worth
    assert [decode_control(p) for p in reader.read_available()] == [(0, big)]


def test_undecodable_control_frames_decode_as_none():
    assert decode_control(struct.pack("<i", 3) + b"C\x80zz") == (3, None)
    assert decode_control(struct.pack("<i", 3) + b"C" + frames.encode_control(("ok",))[1:]) == (3, ("ok",))


def test_reader_sees_eof_when_every_writer_closed(inboxes):
    reader = InboxReader(inboxes[2])
    inboxes[2]._writer.close()
    assert reader.read_available() == []
    assert reader.eof
