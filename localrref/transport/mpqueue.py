"""Inboxes: one pipe per rank that carries opaque frames (bytes).

Data flow (N workers, ranks 0..N-1; the supervisor is rank N)::

    supervisor: inboxes = make_inboxes(ctx, N)   # N+1 SimpleQueues, before any spawn
                spawn(worker, args=(..., inboxes))   # every process gets every inbox

    any thread of rank s                       the receive thread of rank d
    --------------------                       ----------------------------
    frame = codec.encode(msg)  (caller's thread)
    Endpoint.send(d, frame):                   Endpoint.recv(timeout):
      with inboxes[d]._wlock:  (all processes)   poll([inbox d, wake pipe], timeout)
        _writer.send_bytes(<s> + frame)  ─────►  inboxes[d]._reader.recv_bytes()
                                                 -> (s, frame) | None
    Endpoint.wake()  (any thread of rank d)  ──  1 byte on a private self-pipe ──►  None

Which thread touches what: ``send`` may be called from any thread of any
process; ``recv`` by one thread at a time per process (the agent's receive
loop; a lock enforces it); ``wake`` and ``close`` from any thread.

Why the queue's connection and not ``SimpleQueue.put/get``: ``put`` pickles
its argument, and the codec has already turned the message into bytes in the
caller's thread (STYLE rule 5). Writing those bytes with ``send_bytes`` skips
a second pickle and copy. A ``multiprocessing.Queue`` is worse still: its
feeder thread adds a hand-off (about 20-40 us on this machine) and pickles
where errors cannot reach the caller. Round trips (two processes,
ping-pong, ``tools/shm_bench.py``, interleaved rounds on this 2-core VM):
Endpoint 17-23 us, ``SimpleQueue.put/get`` 20-22 us; both are dominated by
the wake-up of the other process, so the poll(2) below costs little.

Atomicity. Every writer, in every process, takes the inbox's write lock (a
process-shared semaphore that ``SimpleQueue`` creates) around the whole
frame, so frames from many writers never interleave, whatever their size
(a pipe only guarantees this for writes up to PIPE_BUF = 4096 bytes, and
``send_bytes`` writes the length header and large bodies separately).
Two consequences are accepted and documented:

* A writer SIGKILLed in the middle of ``send`` leaves that inbox's lock taken
  and a torn frame in the pipe: the inbox is unusable. The window is a few
  microseconds; the supervisor treats any worker death as the end of the
  world (torch semantics: the group is broken), so nothing tries to reuse it.
* ``send`` blocks while the receiver's pipe is full. ``make_inboxes`` raises
  the pipe capacity to 1 MiB where the kernel allows it, and the receive
  thread drains continuously, so this is back-pressure, not a stall; frames
  are small because tensors above the threshold travel through
  :mod:`localrref.transport.shm`.

No busy polling: an idle ``recv`` sleeps in ``poll(2)``.
"""

from __future__ import annotations

import fcntl
import math
import os
import select
import struct
import threading

from localrref.errors import WorkerClosedError, WorkerGoneError

__all__ = ["make_inboxes", "close_inboxes", "Endpoint", "PIPE_CAPACITY"]

# Bigger than the default 64 KiB so that a burst of frames to a busy rank does
# not block its senders; 1 MiB is Linux's default pipe-max-size for users.
PIPE_CAPACITY = 1 << 20

# The sender's rank travels in front of the frame; 4 bytes, little endian.
_SRC = struct.Struct("<i")

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

    Raises:
        ValueError: ``rank`` is not an index of ``inboxes``.
    """

    def __init__(self, rank: int, inboxes: list) -> None:
        if not 0 <= rank < len(inboxes):
            raise ValueError(f"rank {rank} has no inbox: there are {len(inboxes)} "
                             f"(ranks 0..{len(inboxes) - 1})")
        self.rank = rank
        self._inboxes = inboxes
        self._reader = inboxes[rank]._reader
        self._src = _SRC.pack(rank)
        self._closed = False
        # A private self-pipe, not a sentinel frame in our own inbox: writing
        # to the inbox could block (pipe full) or leave a stray frame behind,
        # while a non-blocking 1-byte write to an empty-or-not pipe cannot.
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._poller = select.poll()
        self._poller.register(self._reader.fileno(), select.POLLIN)
        self._poller.register(self._wake_r, select.POLLIN)
        self._recv_lock = threading.Lock()
        # Guards the wake pipe's fds against close(): writing to a closed fd
        # number could hit an unrelated file that reused it.
        self._wake_lock = threading.Lock()
        self._wake_open = True

    def send(self, dst: int, frame: bytes) -> None:
        """Append ``frame`` to ``dst``'s inbox.

        The frame is written whole under the inbox's process-shared write lock,
        so concurrent senders (threads or processes) never interleave. Blocks
        only while the receiver's pipe is full (back-pressure).

        Args:
            dst: destination rank (may be this rank).
            frame: bytes-like, already serialized by the caller.

        Raises:
            WorkerClosedError: this endpoint was closed.
            ValueError: ``dst`` is not a rank.
            WorkerGoneError: the inbox's pipe is broken (every reader closed).
        """
        if self._closed:
            raise WorkerClosedError(f"cannot send to rank {dst}: the endpoint of "
                                    f"rank {self.rank} is closed")
        if not 0 <= dst < len(self._inboxes):
            raise ValueError(f"no rank {dst}: ranks are 0..{len(self._inboxes) - 1}")
        inbox = self._inboxes[dst]
        data = b"".join((self._src, frame))
        try:
            with inbox._wlock:
                inbox._writer.send_bytes(data)
        except OSError as exc:
            raise WorkerGoneError(f"cannot send to rank {dst}: its inbox is broken "
                                  f"({exc}); the supervisor has probably exited",
                                  rank=dst) from exc

    def recv(self, timeout: float | None = None) -> tuple[int, bytes] | None:
        """Take the next frame from this rank's inbox.

        Args:
            timeout: seconds to wait; ``None`` waits until a frame or
                :meth:`wake`.

        Returns:
            ``(src_rank, frame)``, or ``None`` on timeout or after
            :meth:`wake`.

        Raises:
            WorkerClosedError: the endpoint (or the inbox) was closed.
        """
        with self._recv_lock:
            if self._closed:
                raise WorkerClosedError(f"the endpoint of rank {self.rank} is closed")
            ready = self._poller.poll(_poll_ms(timeout))
            if not ready:
                return None
            if any(fd == self._wake_r for fd, _ in ready):
                self._drain_wake()
                return None
            try:
                data = self._reader.recv_bytes()
            except (EOFError, OSError) as exc:
                raise WorkerClosedError(f"the inbox of rank {self.rank} was closed "
                                        f"under recv ({exc!r})") from exc
        (src,) = _SRC.unpack_from(data)
        return src, data[_SRC.size:]

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
        of this process may share them.
        """
        if self._closed:
            return
        self._closed = True
        self.wake()
        if self._recv_lock.acquire(timeout=_CLOSE_WAIT_S):
            try:
                with self._wake_lock:
                    self._wake_open = False
                    os.close(self._wake_r)
                    os.close(self._wake_w)
            finally:
                self._recv_lock.release()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<Endpoint rank={self.rank} of {len(self._inboxes)} {state}>"

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass


def _poll_ms(timeout: float | None) -> int:
    if timeout is None:
        return -1
    # Round up so that a short positive timeout never turns into a busy 0.
    return max(0, math.ceil(timeout * 1000))
