"""The supervisor's side of the inboxes: control frames, sent and read without blocking.

Wire format (the transport's, ``localrref.transport.mpqueue``): one atomic
pipe write of at most ``PIPE_BUF`` bytes per frame, i.e. a 4-byte
big-endian length, then ``<sender rank, int32 little-endian> + frame``; a
control frame is ``b"C" + pickle(tuple)`` (``localrref.codec.frames``). A
frame too big for one such write arrives as a *blob*: the rank complemented
(negative) and a packed ``BlobHandle`` naming the shared-memory block that
holds the frame. The launch layer may not import the codec, so
:func:`encode_control`/:func:`decode_control` restate those few bytes;
``tests/launch/test_launch_inbox.py`` holds them to the codec's and the
transport's behaviour.

Why not ``Endpoint.send``/``recv``: the supervisor's watcher thread must keep
watching worker sentinels whatever the workers did to the inboxes, and a
worker that stopped reading lets its pipe fill, so a plain blocking write
could wait forever. No writer takes a lock (see the transport's docstring),
so a worker killed mid-send no longer blocks anyone.

:func:`bounded_send` writes one frame of at most ``PIPE_BUF`` bytes (atomic)
through a private non-blocking file description of the pipe, waiting for
room at most ``timeout``. :class:`InboxReader` reads only the bytes the
kernel says are there (``FIONREAD``), returns whole frames, keeping a partial
one for later (defensive: atomic writes leave none), and copies blobs out of
shared memory (:mod:`localrref.transport.segment`, which imports no torch).
Both rely on ``SimpleQueue``'s ``_reader``/``_writer`` attributes, as the
transport does.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import pickle
import select
import struct
import termios
import time
from typing import Any

from localrref.errors import WorkerClosedError, WorkerGoneError
from localrref.transport.segment import BlobHandle, SegmentMaps

__all__ = ["bounded_send", "InboxReader", "encode_control", "decode_control"]

log = logging.getLogger("localrref")

_LENGTH = struct.Struct("!i")  # multiprocessing.connection's frame header
_SRC = struct.Struct("<i")  # the transport's sender rank
_CONTROL = b"C"
# Linux guarantees writes of at most PIPE_BUF bytes to a pipe are atomic.
_PIPE_BUF = getattr(select, "PIPE_BUF", 512)


def encode_control(src: int, control: tuple[Any, ...]) -> bytes:
    """The inbox payload carrying ``control`` from rank ``src`` (the supervisor is rank N)."""
    return _SRC.pack(src) + _CONTROL + pickle.dumps(control, protocol=pickle.HIGHEST_PROTOCOL)


def decode_control(payload: bytes) -> tuple[int, tuple[Any, ...] | None]:
    """``(src, control tuple)``; the tuple is None for a non-control or undecodable frame."""
    (src,) = _SRC.unpack_from(payload)
    frame = payload[_SRC.size:]
    if frame[:1] != _CONTROL:
        return src, None
    try:
        control = pickle.loads(frame[1:])
    except Exception:
        return src, None
    return src, control if isinstance(control, tuple) else None


def bounded_send(queue: Any, payload: bytes, timeout: float) -> bool:
    """Write one frame into ``queue`` unless that would wait longer than ``timeout``.

    Args:
        queue: An inbox (``multiprocessing`` ``SimpleQueue``).
        payload: The frame's bytes (see :func:`encode_control`); small.
        timeout: Seconds to wait for room in the pipe.

    Returns:
        True if the frame was written (whole), False if the pipe stayed full
        (the reader stopped reading) or is broken (every reader closed).

    Raises:
        ValueError: The frame exceeds ``PIPE_BUF`` and so could not be written atomically.
    """
    frame = _LENGTH.pack(len(payload)) + payload
    if len(frame) > _PIPE_BUF:
        raise ValueError(f"control frame of {len(frame)} bytes exceeds PIPE_BUF ({_PIPE_BUF}); "
                         "bounded_send is only for small control tuples")
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
        self._buffer = bytearray()
        self._blobs: SegmentMaps | None = None
        self.eof = False

    def fileno(self) -> int:
        return self._fd

    def read_available(self) -> list[bytes]:
        """Every complete frame payload now in the pipe (possibly none).

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
        self._buffer += os.read(self._fd, available)
        payloads = []
        for payload in self._whole_frames():
            src = _SRC.unpack_from(payload)[0] if len(payload) >= _SRC.size else 0
            if src < 0:
                payload = self._import_blob(~src, payload)
            if payload is not None:
                payloads.append(payload)
        return payloads

    def close(self) -> None:
        """Drop the cached mappings of workers' segments (idempotent)."""
        if self._blobs is not None:
            self._blobs.close()

    def _import_blob(self, src: int, payload: bytes) -> bytes | None:
        """The inline payload a blob frame stands for; None if it cannot be read."""
        if self._blobs is None:
            self._blobs = SegmentMaps()
        try:
            handle = BlobHandle.unpack(memoryview(payload)[_SRC.size:])
            return _SRC.pack(src) + self._blobs.import_bytes(handle)
        except (WorkerGoneError, WorkerClosedError, ValueError) as exc:
            log.warning("localrref: the supervisor dropped a frame from rank %d that it could "
                        "not read from shared memory: %s", src, exc)
            return None

    def _whole_frames(self):
        while len(self._buffer) >= _LENGTH.size:
            (size,) = _LENGTH.unpack_from(self._buffer)
            start = _LENGTH.size
            if size == -1:
                # Frames over 2 GiB carry an extra 8-byte length.
                if len(self._buffer) < start + 8:
                    return
                (size,) = struct.unpack_from("!Q", self._buffer, start)
                start += 8
            if len(self._buffer) < start + size:
                return
            payload = bytes(self._buffer[start:start + size])
            del self._buffer[:start + size]
            yield payload
