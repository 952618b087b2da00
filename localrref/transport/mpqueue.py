"""Inboxes: one pipe per rank that carries opaque frames (bytes).

Data flow (N workers, ranks 0..N-1; the supervisor is rank N)::

    supervisor: inboxes = make_inboxes(ctx, N)   # N+1 SimpleQueues, before any spawn
                spawn(worker, args=(..., inboxes))   # every process gets every inbox

    any thread of rank s                        the receive thread of rank d
    --------------------                        ----------------------------
    frame = codec.encode(msg)  (caller's thread)
    Endpoint.send(d, frame):                    Endpoint.recv(timeout):
      small (<= MAX_INLINE bytes):                a whole frame already read? return it
        os.write(<len><s><frame>)  ────────────►  else poll([inbox d, wake pipe]) and
                                                  os.read(64 KiB): every frame waiting
      big:                                        src >= 0: -> (src, frame)
        h = blob_pool.export_bytes(frame)         src <  0: a blob from rank ~src:
        os.write(<len><~s><h.pack()>)  ────────►    frame = import_bytes(h)  (copy out,
                    (pooled shared memory) ─────►   block freed) -> (~src, frame)
    Endpoint.wake()  (any thread of rank d)  ──  1 byte on a private self-pipe ──►  None

Which thread touches what: ``send`` may be called from any thread of any
process; ``recv`` by one thread at a time per process (the agent's receive
loop; a lock enforces it); ``wake`` and ``close`` from any thread.

Wire format: :mod:`localrref.transport.wire` (records of at most
``PIPE_BUF`` bytes; a frame too big for one travels as a *blob*, which
``recv`` turns back into ``(s, frame)``, so callers only ever see plain
frames).

Atomicity, without any lock. Every frame is exactly one ``os.write`` of at
most ``PIPE_BUF`` (4096) bytes. POSIX makes such a write to a pipe atomic:
it never interleaves with other writers' bytes and is never partial (on a
blocking pipe ``write`` waits until all of it fits; a signal that interrupts
the wait leaves nothing written). So no writer, in any process, takes a
lock, and a writer SIGKILLed anywhere in ``send`` leaves either its whole
frame or nothing: no lock held forever, no torn frame. (The queue's own
write lock, ``SimpleQueue._wlock``, is never taken: a process killed while
holding it would block every later writer, the supervisor's ``PeerExited``
notices included.) Frames too big for one such write go
out of band: the sender copies them into a pooled shared-memory block
(:meth:`ShmPool.export_bytes`, reused, pre-faulted blocks) and writes the
handle; the receiver copies the bytes out and frees the block at once.
Consequences, accepted and documented:

* A frame of more than ``MAX_INLINE`` bytes costs two copies (into and out
  of shared memory) and needs the sender's ``blob_pool``; without one,
  ``send`` raises ``ValueError``.
* A sender killed after copying a blob but before writing its handle leaves
  that block BUSY in its own segment until the supervisor's sweep; a handle
  whose segment is gone when it is read (the sender closed its pool, or died
  and was swept) is dropped with a warning.
* ``send`` never blocks a thread that serves others on a full pipe: a
  frame that finds the receiver's pipe full waits in the sender's backlog,
  which a flusher thread writes out in order as the pipe drains
  (:mod:`localrref.transport.outbox`, which says why: two readers blocked
  writing to each other's full pipes deadlock). Application threads feel
  back-pressure instead: past a few MiB of backlog they wait for room.
  ``make_inboxes`` raises the pipe capacity to 1 MiB where the kernel allows
  it, so backlogs are rare. Big frames wait in shared memory, not in the
  pipe: a flood of big frames to a stalled receiver grows the sender's pool
  (as big tensors always did) until ``/dev/shm`` is full.

Why the queue's connection and not ``SimpleQueue.put/get``: ``put`` pickles
its argument, and the codec has already turned the message into bytes in the
caller's thread (STYLE rule 5); ``put`` also takes the write lock. A
``multiprocessing.Queue`` is worse still: its feeder thread adds a hand-off
(about 20-40 us on this machine) and pickles where errors cannot reach the
caller. Round trips (two processes, ping-pong, ``tools/shm_bench.py``,
interleaved rounds on this 2-core VM): Endpoint 17-23 us,
``SimpleQueue.put/get`` 20-22 us; both are dominated by the wake-up of the
other process, so the poll(2) below costs little. Against the locked
``send_bytes`` this module used before (interleaved A/B, same VM): a
100-byte frame costs the same; a 64 KiB round trip about 15 us more (two
copies through shared memory instead of two through the pipe, plus the
handle); a one-way stream of 64 KiB frames runs twice as fast (about 96,000
frames/s against 48,000), since the receiver wakes once per many handles.

No busy polling: an idle ``recv`` sleeps in ``poll(2)``.
"""

from __future__ import annotations

import fcntl
import logging
import math
import os
import select
import threading
import time

from localrref.errors import WorkerClosedError, WorkerGoneError
from localrref.transport import wire
from localrref.transport.outbox import Outbox
from localrref.transport.segment import SegmentMaps
from localrref.transport.wire import MAX_INLINE, PIPE_BUF

__all__ = ["make_inboxes", "close_inboxes", "Endpoint", "PIPE_CAPACITY", "PIPE_BUF",
           "MAX_INLINE"]

log = logging.getLogger("localrref")

# Bigger than the default 64 KiB so that a burst of frames to a busy rank does
# not block its senders; 1 MiB is Linux's default pipe-max-size for users.
PIPE_CAPACITY = 1 << 20

# Spin while at most this many tasks beyond the CPUs want to run. With 1, a
# spin took a core from workers that compute: a synchronous parameter server
# with two trainers on two cores ran at 378 steps/s against 710 with 0 (and
# 607 with no spinning at all); microbenchmarks that only ping-pong (fork
# churn, 3 workers on 2 cores) barely notice.
_SPIN_SLACK = 0

# One read takes up to this many bytes: every whole frame waiting, typically.
_READ_SIZE = 1 << 16

# How long close() waits for a recv() in another thread to notice the wake-up
# before it gives up on closing the wake pipe (it then leaks two fds rather
# than hanging a shutdown).
_CLOSE_WAIT_S = 5.0


def make_inboxes(mp_context, n_workers: int) -> list:
    """Create one inbox per worker plus one for the supervisor.

    Call in the supervisor before starting any worker, and pass the list to
    every worker as a spawn argument (the queues pickle only while spawning).

    Args:
        mp_context: a ``multiprocessing`` context (``torch.multiprocessing``
            works too), normally the ``"spawn"`` one.
        n_workers: number of workers; ranks ``0..n_workers-1`` are workers and
            index ``n_workers`` is the supervisor's inbox.

    Returns:
        A list of ``n_workers + 1`` ``SimpleQueue`` objects.

    Raises:
        ValueError: ``n_workers`` is negative.
    """
    if n_workers < 0:
        raise ValueError(f"n_workers must be >= 0, got {n_workers}")
    inboxes = [mp_context.SimpleQueue() for _ in range(n_workers + 1)]
    for inbox in inboxes:
        _grow_pipe(inbox._writer.fileno())
    return inboxes


def close_inboxes(inboxes: list) -> None:
    """Close this process's copies of every inbox's pipe ends.

    Each process holds its own file descriptors for all inboxes; call this
    once the process's ``Endpoint`` is closed and its receive thread has
    stopped (the supervisor at the end of a run; a worker may rely on exit).
    """
    for inbox in inboxes:
        inbox.close()


_READING_STATE_LOCK = threading.Lock()


def _reading_state(inbox) -> tuple[threading.Lock, wire.Unframer]:
    """The lock and the buffer of bytes read but not yet returned, of ``inbox`` in this process.

    One read takes every whole frame the pipe holds and perhaps the start of
    the next, so the buffer belongs to the inbox, not to one endpoint: an
    endpoint closed by ``shutdown()`` may hold frames (or half of one) that
    arrived for the agent ``init_rpc`` starts next on the same inbox; a
    fresh buffer would drop them and read the rest of a half frame as the
    start of a new one. The lock keeps to one reader per inbox across
    endpoints, for the same reason.
    """
    with _READING_STATE_LOCK:
        state = getattr(inbox, "_localrref_reading", None)
        if state is None:
            state = (threading.Lock(), wire.Unframer())
            inbox._localrref_reading = state
        return state


def _grow_pipe(fd: int) -> None:
    try:
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_CAPACITY)
    except (AttributeError, OSError):
        # Not Linux, or over the per-user pipe-page budget: the default
        # capacity only means senders block sooner on a busy receiver.
        pass


class Endpoint:
    """One rank's view of the inboxes: send to any rank, receive from its own.

    Args:
        rank: this process's rank (the supervisor uses ``len(inboxes) - 1``).
        inboxes: the list made by :func:`make_inboxes`.
        blob_pool: a ``ShmPool`` (:mod:`localrref.transport.shm`) whose pooled
            blocks carry frames of more than ``MAX_INLINE`` bytes; without
            one, sending such a frame raises ``ValueError``.
        blob_mapper: what imports received blobs (``ShmMapper`` or
            :class:`~localrref.transport.segment.SegmentMaps`; pass the
            process's ``ShmMapper`` to share its cached mappings). Without
            one, the endpoint keeps its own.
        spin_s: how long ``recv`` polls without sleeping before it blocks,
            while frames have been arriving within that time (see
            :meth:`_wait_readable`); 0 never spins.
        may_wait: tells whether the calling thread may wait for room in a
            peer's full pipe (``Outbox``); None: no sender ever waits.
        wait_limit_s: the longest a sender waits for room.

    Raises:
        ValueError: ``rank`` is not an index of ``inboxes``.
    """

    def __init__(self, rank: int, inboxes: list, *, blob_pool=None, blob_mapper=None,
                 spin_s: float = 0.0, may_wait=None, wait_limit_s: float = 60.0) -> None:
        if not 0 <= rank < len(inboxes):
            raise ValueError(f"rank {rank} has no inbox: there are {len(inboxes)} "
                             f"(ranks 0..{len(inboxes) - 1})")
        self.rank = rank
        self._inboxes = inboxes
        self._reader = inboxes[rank]._reader
        self._read_fd = self._reader.fileno()
        self._recv_lock, self._unframer = _reading_state(inboxes[rank])
        if spin_s < 0:
            raise ValueError(f"spin_s must be >= 0, got {spin_s}")
        self._spin_s = spin_s
        self._spin_pays = True  # the last wait ended within spin_s
        self._spinning = False
        self._nudged = False
        self._cpus = _usable_cpus()
        self._loadavg = _open_loadavg() if spin_s else None
        self._blob_pool = blob_pool
        self._own_mapper = blob_mapper is None
        self._blob_mapper = SegmentMaps() if blob_mapper is None else blob_mapper
        self._closed = False
        self._outbox = Outbox([inbox._writer.fileno() for inbox in inboxes],
                              may_wait=may_wait, wait_limit_s=wait_limit_s,
                              release=None if blob_pool is None else blob_pool.release_unsent)
        # A private self-pipe, not a sentinel frame in our own inbox: writing
        # to the inbox could block (pipe full) or leave a stray frame behind,
        # while a non-blocking 1-byte write to an empty-or-not pipe cannot.
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._poller = select.poll()
        self._poller.register(self._reader.fileno(), select.POLLIN)
        self._poller.register(self._wake_r, select.POLLIN)
        # Guards the wake pipe's fds against close(): writing to a closed fd
        # number could hit an unrelated file that reused it.
        self._wake_lock = threading.Lock()
        self._wake_open = True

    def send(self, dst: int, frame) -> None:
        """Append ``frame`` to ``dst``'s inbox.

        One atomic pipe write, no lock: concurrent senders (threads or
        processes) never interleave, and a sender killed mid-call leaves the
        inbox usable. A frame of more than ``MAX_INLINE`` bytes travels
        through a shared-memory block of ``blob_pool``. A frame that finds the
        receiver's pipe full is queued (see :mod:`~localrref.transport.outbox`);
        the caller then waits only if ``may_wait()`` says it may, and only
        while the backlog is long.

        Args:
            dst: destination rank (may be this rank).
            frame: bytes-like, already serialized by the caller.

        Raises:
            WorkerClosedError: this endpoint (or its blob pool) was closed.
            ValueError: ``dst`` is not a rank, or the frame needs a blob
                pool and this endpoint has none.
            WorkerGoneError: the inbox's pipe is broken (every reader closed).
            OSError: ``/dev/shm`` is full (errno ENOSPC), for a big frame.
        """
        if self._closed:
            raise WorkerClosedError(f"cannot send to rank {dst}: the endpoint of "
                                    f"rank {self.rank} is closed")
        if not 0 <= dst < len(self._inboxes):
            raise ValueError(f"no rank {dst}: ranks are 0..{len(self._inboxes) - 1}")
        size = memoryview(frame).nbytes
        if size <= MAX_INLINE:
            self._outbox.send(dst, wire.pack(self.rank, frame))
            return
        if self._blob_pool is None:
            raise ValueError(f"cannot send a {size}-byte frame to rank {dst}: frames over "
                             f"{MAX_INLINE} bytes travel through shared memory, and the "
                             f"endpoint of rank {self.rank} has no blob_pool; pass "
                             f"Endpoint(..., blob_pool=ShmPool(...)) or send smaller frames")
        handle = self._blob_pool.export_bytes(frame)
        try:
            self._outbox.send(dst, wire.pack_blob(self.rank, handle.pack()), handle)
        except BaseException:
            self._blob_pool.release_unsent(handle)  # nothing was written: atomic
            raise

    def recv(self, timeout: float | None = None) -> tuple[int, bytes] | None:
        """Take the next frame from this rank's inbox.

        Args:
            timeout: seconds to wait; ``None`` waits until a frame or
                :meth:`wake`.

        Returns:
            ``(src_rank, frame)``, or ``None`` on timeout, after :meth:`wake`,
            or when a blob could not be read (its sender's segment is gone;
            logged as a warning).

        Raises:
            WorkerClosedError: the endpoint (or the inbox) was closed.
        """
        with self._recv_lock:
            if self._closed:
                raise WorkerClosedError(f"the endpoint of rank {self.rank} is closed")
            data = self._unframer.next()
            while data is None:
                ready = self._wait_readable(timeout)
                if not ready:
                    return None
                if any(fd == self._wake_r for fd, _ in ready):
                    self._drain_wake()
                    return None
                try:
                    chunk = os.read(self._read_fd, _READ_SIZE)
                except BlockingIOError:
                    continue  # someone made the pipe non-blocking, and another reader won
                except OSError as exc:
                    raise WorkerClosedError(f"the inbox of rank {self.rank} was closed "
                                            f"under recv ({exc!r})") from exc
                if not chunk:
                    raise WorkerClosedError(f"the inbox of rank {self.rank} was closed "
                                            f"under recv (end of file)")
                self._unframer.feed(chunk)
                data = self._unframer.next()
            src, body, is_blob = wire.split(data)
            if not is_blob:
                return src, body
            return self._import_blob(src, body)

    def _wait_readable(self, timeout: float | None) -> list:
        """poll(2) the inbox and the wake pipe, spinning first while that pays.

        On a virtual machine, waking a process that sleeps in poll costs
        20-30 us of CPU on each side and about as much latency (an idle
        vCPU must be woken by an interrupt): a bare pipe round trip between
        two processes measured 61 us blocking and 2 us spinning. So after a
        frame, the reader polls without sleeping for up to ``spin_s``, as
        long as the previous wait ended within that time (a reply to a call
        just sent, the next call of a busy client). A wait that outlasts the
        spin turns spinning off until a wait ends quickly again, so an idle
        worker spins once, for ``spin_s``, and then sleeps.
        """
        poll = self._poller.poll
        ready = poll(0)
        if ready:
            self._spin_pays = True
            return ready
        spun = False
        if self._spin_s and self._spin_pays and self._cpu_is_free():
            spun = True
            start = time.perf_counter()
            end = start + (self._spin_s if timeout is None else min(self._spin_s, timeout))
            self._spinning = True
            while True:
                ready = poll(0)
                if ready or self._nudged:
                    break
                if time.perf_counter() >= end:
                    break
                # Another process may wait for this CPU (more workers than
                # cores): let it run at once rather than at the next tick.
                os.sched_yield()
            # Ordered against nudge(): one of the two sees the other's write.
            self._spinning = False
            if ready or self._nudged:
                self._nudged = False
                return ready
            if timeout is not None:
                timeout = max(0.0, timeout - (time.perf_counter() - start))
        start = time.perf_counter()
        ready = poll(_poll_ms(timeout))
        self._spin_pays = not spun and time.perf_counter() - start < self._spin_s
        return ready

    def _cpu_is_free(self) -> bool:
        """False when clearly more tasks want to run than there are CPUs: a
        spin would then take a CPU from real work (workers computing), so
        sleep. Read from /proc/loadavg's running count, 0.5 us a look."""
        if self._loadavg is None:
            return True
        try:
            running = int(os.pread(self._loadavg, 64, 0).split()[3].split(b"/")[0])
        except (OSError, ValueError, IndexError):
            return True
        return running <= self._cpus + _SPIN_SLACK

    def _import_blob(self, src: int, packed_handle: bytes) -> tuple[int, bytes] | None:
        try:
            return src, wire.import_blob(packed_handle, self._blob_mapper)
        except (WorkerGoneError, ValueError) as exc:
            log.warning("localrref: rank %d dropped a frame from rank %d that it could not "
                        "read from shared memory: %s", self.rank, src, exc)
            return None

    def set_may_wait(self, may_wait) -> None:
        """Set who may wait for room (see the ``may_wait`` argument)."""
        self._outbox.may_wait = may_wait

    def forget(self, dst: int, error: BaseException) -> None:
        """Rank ``dst`` is gone: drop what still waits to be written to it; later
        sends to it raise ``error``."""
        self._outbox.forget(dst, error)

    def nudge(self) -> bool:
        """Make a *spinning* :meth:`recv` return ``None`` at once; no system call.

        Returns False when no ``recv`` spins now (it sleeps in poll(2), or
        none runs): then nothing was done, and the caller must use
        :meth:`wake` or another way to be heard. Safe from any thread,
        including from ``__del__`` (it takes no lock).
        """
        self._nudged = True
        if self._spinning:
            return True
        self._nudged = False
        return False

    def wake(self) -> None:
        """Make a blocked (or the next) :meth:`recv` return ``None`` promptly.

        Safe from any thread (not from a signal handler: it takes a lock);
        never blocks on I/O.
        """
        with self._wake_lock:
            if not self._wake_open:
                return
            try:
                os.write(self._wake_w, b"\0")
            except BlockingIOError:
                pass  # full of earlier wake-ups: recv will wake anyway

    def close(self) -> None:
        """Stop this endpoint: later ``send``/``recv`` raise ``WorkerClosedError``.

        Wakes a ``recv`` blocked in another thread. Idempotent. Leaves the
        inbox pipes open (see :func:`close_inboxes`), because other endpoints
        of this process may share them, and leaves ``blob_pool`` and
        ``blob_mapper`` to their owner.
        """
        if self._closed:
            return
        self._closed = True
        self._outbox.close()
        self.wake()
        if self._recv_lock.acquire(timeout=_CLOSE_WAIT_S):
            try:
                with self._wake_lock:
                    self._wake_open = False
                    os.close(self._wake_r)
                    os.close(self._wake_w)
                if self._loadavg is not None:  # no recv uses it now
                    os.close(self._loadavg)
                    self._loadavg = None
            finally:
                self._recv_lock.release()
        if self._own_mapper:
            self._blob_mapper.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<Endpoint rank={self.rank} of {len(self._inboxes)} {state}>"

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _open_loadavg() -> int | None:
    try:
        return os.open("/proc/loadavg", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None  # not Linux: spin whenever spinning pays


def _poll_ms(timeout: float | None) -> int:
    if timeout is None:
        return -1
    # Round up so that a short positive timeout never turns into a busy 0.
    return max(0, math.ceil(timeout * 1000))
