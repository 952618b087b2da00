"""Sending without ever blocking a thread that others depend on.

Why: two workers that send to each other faster than they read deadlock
when each one's thread that reads its inbox is blocked writing to the
other's full pipe. Nobody reads, so neither pipe drains. It happened: a
worker that dropped 1,000,000 RRefs owned by its peer sent a
``RREF_USER_DELETE`` for each while the owner sent back an ack for each;
both pipes filled, both readers blocked in ``write``, and the owner's watch
kept starting IO threads that blocked in turn, until it could start no more.

So a record that finds its destination's pipe full is not waited for: it
joins that destination's *backlog*, which a flusher thread writes out as
the pipe drains, in order. Once a destination has a backlog every later
record to it joins the backlog too, so each sender's records stay in the
order it sent them. A thread that may wait (the application's own, one
that does not hold the inbox: ``may_wait``) then waits while the backlog
holds more than :data:`HIGH_WATER` bytes, until it is under
:data:`LOW_WATER`; that is the back-pressure a flood from the application
feels. Threads that serve (IO threads, the housekeeper, the pool) never
wait: their peers' progress may depend on them.

Writes go through a second, non-blocking open file description of each
pipe (``/proc/self/fd/N``): the inbox's own description is shared with every
process, so setting ``O_NONBLOCK`` on it would change it for all of them. A
non-blocking write of at most ``PIPE_BUF`` bytes is still all-or-nothing.
Where that reopen is impossible (not Linux), writes block as before.

The decisions (what is queued, what one write takes, who must wait) live
in :class:`Backlog`, which has no thread, lock or file descriptor, so tests
drive it directly; :class:`Outbox` is the shell around it.

Which thread touches what: :meth:`Outbox.send` from any thread; the
flusher (``localrref-flush``, started at the first backlog) writes the
backlogs out; :meth:`Outbox.forget` and :meth:`Outbox.close` from any thread.
"""

from __future__ import annotations

import collections
import os
import select
import threading
import time
from typing import Callable

from localrref.errors import RRefInternalError, WorkerClosedError, WorkerGoneError
from localrref.transport.wire import PIPE_BUF

__all__ = ["Backlog", "Outbox", "HIGH_WATER", "LOW_WATER"]

# A waiting sender waits while its destination's backlog holds more than
# HIGH_WATER bytes, until it is under LOW_WATER (the pipe holds 1 MiB more).
HIGH_WATER = 4 << 20
LOW_WATER = 1 << 20

# How long close() lets the flusher deliver what is still queued.
_CLOSE_FLUSH_S = 2.0


class Backlog:
    """Records waiting for room in their destinations' pipes (pure; see the module docstring).

    Each entry is ``(record, token)``: ``token`` is whatever the caller must
    be given back if the record is never written (a shared-memory block to
    free), or None.
    """

    def __init__(self, *, high_water: int = HIGH_WATER, low_water: int = LOW_WATER) -> None:
        if not 0 <= low_water <= high_water:
            raise ValueError(f"need 0 <= low_water <= high_water, got {low_water}, {high_water}")
        self.high_water = high_water
        self.low_water = low_water
        self._queues: dict[int, collections.deque] = {}
        self._bytes: dict[int, int] = {}

    def __contains__(self, dst: int) -> bool:
        """True while ``dst`` has records queued: later records must queue behind them."""
        return dst in self._queues

    def destinations(self) -> list[int]:
        return list(self._queues)

    def queued_bytes(self, dst: int) -> int:
        return self._bytes.get(dst, 0)

    def queued_records(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def put(self, dst: int, record: bytes, token=None) -> None:
        if len(record) > PIPE_BUF:
            raise ValueError(f"a {len(record)}-byte record is over PIPE_BUF ({PIPE_BUF}): "
                             f"it could not be written atomically")
        self._queues.setdefault(dst, collections.deque()).append((record, token))
        self._bytes[dst] = self._bytes.get(dst, 0) + len(record)

    def next_write(self, dst: int) -> tuple[bytes, int]:
        """The bytes of the next write to ``dst`` and how many records they hold.

        As many whole records as fit in one ``PIPE_BUF`` write: still one
        atomic write, and a backlog of small records drains in few calls.
        """
        queue = self._queues[dst]
        parts = []
        size = 0
        for record, _ in queue:
            if parts and size + len(record) > PIPE_BUF:
                break
            parts.append(record)
            size += len(record)
        return b"".join(parts), len(parts)

    def written(self, dst: int, count: int) -> None:
        """The first ``count`` records to ``dst`` were written."""
        queue = self._queues[dst]
        for _ in range(count):
            record, _ = queue.popleft()
            self._bytes[dst] -= len(record)
        if not queue:
            del self._queues[dst]
            del self._bytes[dst]

    def must_wait(self, dst: int) -> bool:
        """A sender that may wait, having just queued a record for ``dst``, waits."""
        return self._bytes.get(dst, 0) > self.high_water

    def may_go_on(self, dst: int) -> bool:
        """A waiting sender may go on (the backlog fell under the low-water mark)."""
        return self._bytes.get(dst, 0) < self.low_water

    def drop(self, dst: int) -> list:
        """Forget ``dst``'s records (it is gone); returns their tokens."""
        queue = self._queues.pop(dst, ())
        self._bytes.pop(dst, None)
        return [token for _, token in queue if token is not None]

    def drop_all(self) -> list:
        tokens = []
        for dst in list(self._queues):
            tokens.extend(self.drop(dst))
        return tokens


class Outbox:
    """Writes records to the inboxes' pipes, queueing what finds a pipe full.

    Args:
        write_fds: the inboxes' (blocking, shared) write descriptors, by rank.
        may_wait: tells whether the calling thread may wait for room (see the
            module docstring); None: no thread waits.
        wait_limit_s: the longest a sender waits for room (a peer that stopped
            reading without dying, e.g. SIGSTOP): it then queues and goes on,
            and its call's own timeout decides.
        release: called with a record's token when that record is dropped unsent.
    """

    def __init__(self, write_fds: list[int], *, may_wait: Callable[[], bool] | None = None,
                 wait_limit_s: float = 60.0, release: Callable[[object], None] | None = None,
                 backlog: Backlog | None = None) -> None:
        self._shared_fds = write_fds
        self._fds: list[int | None] = [_reopen_nonblocking(fd) for fd in write_fds]
        self.may_wait = may_wait
        self._wait_limit_s = wait_limit_s
        self._release = release
        self._backlog = backlog if backlog is not None else Backlog()
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)
        self._gone: dict[int, BaseException] = {}
        self._closed = False
        self._flusher: threading.Thread | None = None
        self._wake_r = self._wake_w = -1
        self._abandon = False  # closing: drop what is still queued
        self.writes_deferred = 0  # records that found a pipe full (debug info)

    # -- the hot path ------------------------------------------------------------

    def send(self, dst: int, record: bytes, token=None) -> None:
        """Write ``record`` to ``dst``'s pipe now, or queue it behind the backlog.

        Raises:
            WorkerClosedError: the outbox is closed.
            WorkerGoneError: ``dst`` was forgotten (it died), or its pipe is broken.
        """
        if self._closed:
            raise WorkerClosedError(f"cannot send to rank {dst}: this endpoint is closed")
        if dst not in self._backlog and dst not in self._gone:
            fd = self._fds[dst]
            if fd is None:
                self._write_blocking(dst, record)
                return
            try:
                written = os.write(fd, record)
            except BlockingIOError:
                pass  # full: queue it below
            except OSError as exc:
                raise _broken(dst, exc) from exc
            else:
                _check(dst, written, record)
                return
        self._queue(dst, record, token)

    def _queue(self, dst: int, record: bytes, token) -> None:
        with self._lock:
            if self._closed:
                raise WorkerClosedError(f"cannot send to rank {dst}: this endpoint is closed")
            gone = self._gone.get(dst)
            if gone is not None:
                raise gone
            self._backlog.put(dst, record, token)
            self.writes_deferred += 1
            self._ensure_flusher_locked()
            if not self._backlog.must_wait(dst) or self.may_wait is None or not self.may_wait():
                return
            deadline = time.monotonic() + self._wait_limit_s
            while (not self._closed and dst not in self._gone
                   and not self._backlog.may_go_on(dst)):
                left = deadline - time.monotonic()
                if left <= 0:
                    return  # queued anyway: see wait_limit_s
                self._room.wait(left)

    # -- the flusher -------------------------------------------------------------

    def _ensure_flusher_locked(self) -> None:
        if self._flusher is None:
            self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            self._flusher = threading.Thread(target=self._flush_loop, name="localrref-flush",
                                             daemon=True)
            self._flusher.start()
        else:
            self._poke()

    def _poke(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except (BlockingIOError, OSError):
            pass  # a wake-up is pending anyway, or the flusher has stopped

    def _flush_loop(self) -> None:
        while True:
            with self._lock:
                if self._closed and (self._abandon or not self._backlog.destinations()):
                    return
                waiting = [dst for dst in self._backlog.destinations() if dst not in self._gone]
            poller = select.poll()
            poller.register(self._wake_r, select.POLLIN)
            for dst in waiting:
                poller.register(self._fds[dst], select.POLLOUT)
            ready = poller.poll()
            for fd, _ in ready:
                if fd == self._wake_r:
                    _drain(self._wake_r)
            for dst in waiting:
                self._write_out(dst)

    def _write_out(self, dst: int) -> None:
        """Write ``dst``'s backlog until it is empty or the pipe is full."""
        fd = self._fds[dst]
        while True:
            with self._lock:
                if dst not in self._backlog or dst in self._gone:
                    return
                data, count = self._backlog.next_write(dst)
            try:
                written = os.write(fd, data)
            except BlockingIOError:
                return
            except OSError as exc:
                self.forget(dst, _broken(dst, exc))
                return
            _check(dst, written, data)
            with self._lock:
                if dst in self._backlog:  # not forgotten meanwhile
                    self._backlog.written(dst, count)
                    if self._backlog.may_go_on(dst):
                        self._room.notify_all()

    # -- peers that go, and closing ---------------------------------------------

    def forget(self, dst: int, error: BaseException) -> None:
        """``dst`` is gone: drop its backlog; later sends to it raise ``error``."""
        with self._lock:
            self._gone[dst] = error
            tokens = self._backlog.drop(dst)
            self._room.notify_all()
        self._release_all(tokens)

    def close(self, flush_s: float = _CLOSE_FLUSH_S) -> None:
        """Let the flusher deliver what is queued (for up to ``flush_s``), then stop
        it and free what is left. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._room.notify_all()
            flusher = self._flusher
        if flusher is not None:
            self._poke()
            flusher.join(flush_s)
            with self._lock:
                self._abandon = True
                tokens = self._backlog.drop_all()
            self._poke()
            flusher.join()
            self._release_all(tokens)
            os.close(self._wake_r)
            os.close(self._wake_w)
        for fd in self._fds:
            if fd is not None:
                os.close(fd)
        self._fds = [None] * len(self._fds)

    def queued_records(self) -> int:
        with self._lock:
            return self._backlog.queued_records()

    # -- helpers -------------------------------------------------------------------

    def _write_blocking(self, dst: int, record: bytes) -> None:
        fd = self._shared_fds[dst]
        try:
            while True:
                try:
                    written = os.write(fd, record)
                    break
                except BlockingIOError:
                    select.select([], [fd], [])
        except OSError as exc:
            raise _broken(dst, exc) from exc
        _check(dst, written, record)

    def _release_all(self, tokens: list) -> None:
        if self._release is not None:
            for token in tokens:
                self._release(token)


def _reopen_nonblocking(fd: int) -> int | None:
    for flags in (os.O_WRONLY, os.O_RDWR):
        try:
            return os.open(f"/proc/self/fd/{fd}", flags | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            continue
    return None


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except (BlockingIOError, OSError):
        pass


def _broken(dst: int, exc: OSError) -> WorkerGoneError:
    return WorkerGoneError(f"cannot send to rank {dst}: its inbox is broken ({exc}); the "
                           f"supervisor has probably exited", rank=dst)


def _check(dst: int, written: int, data: bytes) -> None:
    if written != len(data):
        raise RRefInternalError(f"a {len(data)}-byte pipe write to rank {dst} wrote {written} "
                                f"bytes: this platform's pipes do not honour PIPE_BUF = {PIPE_BUF}")
