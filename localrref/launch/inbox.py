"""The supervisor's side of the inboxes: control frames, sent and read without blocking.

The wire format is the transport's (:mod:`localrref.transport.wire`): one
atomic pipe write of at most ``PIPE_BUF`` bytes per record; a frame too big
for one arrives as a *blob* naming the shared-memory block that holds it.

Why not ``Endpoint.send``/``recv``: the supervisor's watcher thread must keep
watching worker sentinels whatever the workers did to the inboxes, and a
worker that stopped reading lets its pipe fill, so a plain blocking write
could wait forever. No writer takes a lock (see the transport's docstring),
so a worker killed mid-send blocks nobody.

:func:`send_control` writes one control record (atomic) through a private
non-blocking file description of the pipe, waiting for room at most
``timeout``. :class:`InboxReader` reads only the bytes the kernel says are
there (``FIONREAD``), returns whole frames, keeping a partial one for later
(defensive: atomic writes leave none), and copies blobs out of shared memory
(:mod:`localrref.transport.segment`, which imports no torch). Both rely on
``SimpleQueue``'s ``_reader``/``_writer`` attributes, as the transport does.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import select
import struct
import termios
import time
from typing import Any

from localrref.errors import WorkerClosedError, WorkerGoneError
from localrref.transport import wire
from localrref.transport.segment import SegmentMaps

__all__ = ["send_control", "bounded_send", "InboxReader"]

log = logging.getLogger("localrref")


def send_control(queue: Any, src: int, control, timeout: float) -> bool:
    """Put the control record ``control`` from rank ``src`` in ``queue`` (see :func:`bounded_send`)."""
    return bounded_send(queue, wire.pack(src, wire.encode_control(control)), timeout)


def bounded_send(queue: Any, record: bytes, timeout: float) -> bool:
    """Write one record into ``queue`` unless that would wait longer than ``timeout``.

    Args:
        queue: An inbox (``multiprocessing`` ``SimpleQueue``).
        record: A whole record (``wire.pack``); small.
        timeout: Seconds to wait for room in the pipe.

    Returns:
        True if the frame was written (whole), False if the pipe stayed full
        (the reader stopped reading) or is broken (every reader closed).

    Raises:
        ValueError: The frame exceeds ``PIPE_BUF`` and so could not be written atomically.
    """
    frame = record
    if len(frame) > wire.PIPE_BUF:
        raise ValueError(f"control frame of {len(frame)} bytes exceeds PIPE_BUF "
                         f"({wire.PIPE_BUF}); bounded_send is only for small control records")
    deadline = time.monotonic() + timeout
    try:
        fd = _nonblocking_writer(queue._writer.fileno())
    except OSError:
        return False  # closed in this process, or no reader left anywhere (ENXIO)
    try:
        while True:
            left = deadline - time.monotonic()
            # Writable means >= PIPE_BUF bytes free, so the frame fits, unless
            # another writer takes the room first: the non-blocking write
            # then fails whole (EAGAIN) and we wait again.
            _, writable, _ = select.select([], [fd], [], max(left, 0))
            if writable:
                try:
                    return os.write(fd, frame) == len(frame)
                except BlockingIOError:
                    pass
                except OSError:
                    return False  # EPIPE: every reader closed
            if left <= 0:
                return False
    finally:
        os.close(fd)


def _nonblocking_writer(fd: int) -> int:
    """A new file description of the pipe behind ``fd``, opened ``O_NONBLOCK``.

    The inbox's own description is shared by every process (``O_NONBLOCK``
    on it would turn every worker's send non-blocking); opening the pipe
    again through ``/proc`` gives this call a private one (Linux).
    """
    try:
        return os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ENXIO:
            raise  # no reader: the write could never succeed
        # No /proc: a duplicate shares the blocking description, so a write
        # after select could (rarely) block if another writer took the room.
        return os.dup(fd)


class InboxReader:
    """Whole frames from a ``SimpleQueue``'s pipe, read without ever blocking; blobs resolved.

    Call :meth:`read_available` when :meth:`fileno` is readable (for example
    from ``multiprocessing.connection.wait``). One reader per queue.
    """

    def __init__(self, queue: Any) -> None:
        self._fd = queue._reader.fileno()
        self._unframer = wire.Unframer()
        self._blobs: SegmentMaps | None = None
        self.eof = False

    def fileno(self) -> int:
        return self._fd

    def read_available(self) -> list[tuple[int, bytes]]:
        """Every complete ``(sender rank, frame)`` now in the pipe (possibly none).

        Sets :attr:`eof` once every writer has closed the pipe.
        """
        if self.eof:
            return []
        readable, _, _ = select.select([self._fd], [], [], 0)
        if not readable:
            return []
        available = struct.unpack("i", fcntl.ioctl(self._fd, termios.FIONREAD, b"\0\0\0\0"))[0]
        if available == 0:
            # Readable with nothing to read: every write end is closed.
            self.eof = True
            return []
        self._unframer.feed(os.read(self._fd, available))
        frames = []
        for payload in self._unframer:
            try:
                src, body, is_blob = wire.split(payload)
            except ValueError as exc:
                log.warning("localrref: the supervisor dropped a malformed record: %s", exc)
                continue
            if is_blob:
                body = self._import_blob(src, body)
            if body is not None:
                frames.append((src, body))
        return frames

    def close(self) -> None:
        """Drop the cached mappings of workers' segments (idempotent)."""
        if self._blobs is not None:
            self._blobs.close()

    def _import_blob(self, src: int, packed_handle: bytes) -> bytes | None:
        """The frame a blob stands for; None if it cannot be read."""
        if self._blobs is None:
            self._blobs = SegmentMaps()
        try:
            return wire.import_blob(packed_handle, self._blobs)
        except (WorkerGoneError, WorkerClosedError, ValueError) as exc:
            log.warning("localrref: the supervisor dropped a frame from rank %d that it could "
                        "not read from shared memory: %s", src, exc)
            return None
