"""The outbox: a full pipe never blocks a sender that others depend on.

The Backlog's decisions are driven directly; the Outbox over real pipes,
shrunk to one page so that they fill at once.
"""

from __future__ import annotations

import fcntl
import multiprocessing as mp
import os
import threading

import pytest

from localrref.errors import WorkerClosedError, WorkerGoneError
from localrref.transport import wire
from localrref.transport.mpqueue import Endpoint, close_inboxes, make_inboxes
from localrref.transport.outbox import Backlog, Outbox
from localrref.transport.wire import PIPE_BUF

PAGE = 4096


# -- the Backlog, alone ---------------------------------------------------------


def test_backlog_keeps_order_and_packs_whole_records_into_one_atomic_write():
    backlog = Backlog(high_water=10_000, low_water=100)
    records = [bytes([i]) * size for i, size in enumerate((1000, 1500, 1500, 100, 4000, 7))]
    for record in records:
        backlog.put(3, record)
    assert 3 in backlog and 4 not in backlog
    writes = []
    while 3 in backlog:
        data, count = backlog.next_write(3)
        assert len(data) <= PIPE_BUF
        writes.append(count)
        backlog.written(3, count)
    assert writes == [3, 1, 2]  # 1000+1500+1500 | 100 (4000 does not fit) | 4000+7
    assert backlog.queued_bytes(3) == 0 and backlog.queued_records() == 0


def test_backlog_write_of_several_records_is_their_concatenation():
    backlog = Backlog()
    backlog.put(0, b"ab")
    backlog.put(0, b"cd")
    assert backlog.next_write(0) == (b"abcd", 2)


def test_backlog_refuses_a_record_that_could_not_be_written_atomically():
    with pytest.raises(ValueError, match="PIPE_BUF"):
        Backlog().put(0, b"x" * (PIPE_BUF + 1))


def test_backlog_waits_above_high_water_and_goes_on_below_low_water():
    backlog = Backlog(high_water=300, low_water=150)
    for _ in range(3):
        backlog.put(1, b"x" * 100)
    assert not backlog.must_wait(1)  # 300 is not above 300
    backlog.put(1, b"x" * 100)
    assert backlog.must_wait(1) and not backlog.may_go_on(1)
    backlog.written(1, 3)
    assert backlog.may_go_on(1)
    with pytest.raises(ValueError):
        Backlog(high_water=1, low_water=2)


def test_backlog_drop_returns_the_tokens_of_records_never_written():
    backlog = Backlog()
    backlog.put(1, b"a", "block-a")
    backlog.put(1, b"b")
    backlog.put(2, b"c", "block-c")
    assert backlog.drop(1) == ["block-a"]
    assert 1 not in backlog and backlog.queued_bytes(1) == 0
    assert backlog.drop_all() == ["block-c"]
    assert backlog.destinations() == []


# -- the Outbox over real pipes ---------------------------------------------------


@pytest.fixture
def small_inboxes():
    boxes = make_inboxes(mp.get_context("spawn"), 1)
    for box in boxes:
        fcntl.fcntl(box._writer.fileno(), fcntl.F_SETPIPE_SZ, PAGE)
    yield boxes
    close_inboxes(boxes)


def _read_records(fd: int, count: int) -> list[bytes]:
    unframer = wire.Unframer()
    got = []
    while len(got) < count:
        data = unframer.next()
        if data is None:
            unframer.feed(os.read(fd, 1 << 16))
            continue
        got.append(wire.split(data)[1])
    return got


@pytest.mark.timeout(90)
def test_two_endpoints_flooding_each_other_never_deadlock(small_inboxes):
    # Each side sends everything before it reads anything: with blocking
    # writes both would block on the other's full pipe for ever.
    n = 2000  # about 50 pipes' worth each way
    eps = [Endpoint(0, small_inboxes), Endpoint(1, small_inboxes)]
    received: dict[int, list] = {}

    def side(me: int) -> None:
        ep = eps[me]
        for i in range(n):
            ep.send(1 - me, b"%d:%d" % (me, i) + b"." * 90)
        frames = []
        while len(frames) < n:
            got = ep.recv(30)
            assert got is not None, f"rank {me} got {len(frames)} of {n} frames"
            frames.append(got)
        received[me] = frames

    threads = [threading.Thread(target=side, args=(me,)) for me in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    try:
        assert not any(t.is_alive() for t in threads), "the two sides deadlocked"
        for me in (0, 1):
            other = 1 - me
            assert [src for src, _ in received[me]] == [other] * n
            assert [f.split(b".")[0] for _, f in received[me]] == [
                b"%d:%d" % (other, i) for i in range(n)]  # in order
    finally:
        for ep in eps:
            ep.close()


class _Watched(Backlog):
    """A Backlog that remembers the longest it grew."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.peak = 0

    def put(self, dst, record, token=None):
        super().put(dst, record, token)
        self.peak = max(self.peak, self.queued_bytes(dst))


def test_a_sender_that_may_wait_is_held_back_at_high_water(small_inboxes):
    fd_out = small_inboxes[0]._writer.fileno()
    record = wire.pack(1, b"y" * 500)
    backlog = _Watched(high_water=8 * len(record), low_water=2 * len(record))
    outbox = Outbox([fd_out], may_wait=lambda: True, backlog=backlog)
    n = 400
    sender = threading.Thread(target=lambda: [outbox.send(0, record) for _ in range(n)])
    sender.start()
    try:
        got = _read_records(small_inboxes[0]._reader.fileno(), n)
    finally:
        sender.join(30)
        outbox.close()
    assert got == [b"y" * 500] * n
    # It queued one record past high water, then waited until the pipe drained.
    assert 0 < backlog.peak <= 9 * len(record)


@pytest.fixture
def one_page_pipe():
    """A pipe that holds one page: (read fd, write fd)."""
    r, w = os.pipe()
    fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PAGE)
    yield r, w
    os.close(r)
    os.close(w)


def _fill(outbox, tokens) -> int:
    """Send 40 records of 200 bytes (two pages) nobody reads; how many were queued."""
    for token in tokens:
        outbox.send(0, wire.pack(0, b"q" * 200), token)
    return outbox.queued_records()


def test_a_sender_that_may_not_wait_queues_everything_and_returns(one_page_pipe):
    r, w = one_page_pipe
    outbox = Outbox([w], may_wait=lambda: False,
                    backlog=Backlog(high_water=1000, low_water=100))
    record = wire.pack(0, b"z" * 200)
    try:
        for _ in range(200):  # 10 pages: nobody reads while it sends
            outbox.send(0, record)
        assert outbox.queued_records() > 0 and outbox.writes_deferred > 0
        assert _read_records(r, 200) == [b"z" * 200] * 200
    finally:
        outbox.close()


def test_forgetting_a_gone_peer_drops_its_backlog_frees_its_blocks_and_fails_later_sends(
        one_page_pipe):
    freed = []
    outbox = Outbox([one_page_pipe[1]], release=freed.append)
    try:
        queued = _fill(outbox, [f"block-{i}" for i in range(40)])
        assert queued > 0
        outbox.forget(0, WorkerGoneError("rank 0 died", rank=0))
        assert outbox.queued_records() == 0
        assert freed == [f"block-{i}" for i in range(40 - queued, 40)]
        with pytest.raises(WorkerGoneError, match="rank 0 died"):
            outbox.send(0, wire.pack(0, b"late"))
    finally:
        outbox.close()


def test_close_delivers_what_it_can_and_frees_the_rest(one_page_pipe):
    freed = []
    outbox = Outbox([one_page_pipe[1]], release=freed.append)
    queued = _fill(outbox, range(40))  # nobody ever reads: close must give up on these
    outbox.close(flush_s=0.05)
    assert sorted(freed) == list(range(40 - queued, 40))
    with pytest.raises(WorkerClosedError):
        outbox.send(0, wire.pack(0, b"q" * 200))
