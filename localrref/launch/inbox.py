"""The supervisor's side of the inboxes: control frames, sent and read without blocking.

Wire format (the transport's, ``localrref.transport.mpqueue``): one
``Connection.send_bytes`` per frame, i.e. a 4-byte big-endian length, then
``<sender rank, int32 little-endian> + frame``; a control frame is ``b"C" +
pickle(tuple)`` (``localrref.codec.frames``). The launch layer may not import
the codec, so :func:`encode_control`/:func:`decode_control` restate those few
bytes; ``tests/launch/test_launch_inbox.py`` holds them to the codec's and the
transport's behaviour.

Why not ``Endpoint.send``/``recv``: the supervisor's watcher thread must keep
watching worker sentinels whatever the workers did to the queues, and two
things a dying worker leaves behind would block those calls forever:

* a worker killed in the middle of a send keeps the inbox's shared write lock
  (a POSIX semaphore is not released by process death), so every later send
  waits for it; and a worker that stopped reading lets its pipe fill;
* the same worker leaves half a frame in the pipe, so ``recv_bytes`` waits
  for bytes that will never come.

:func:`bounded_send` takes the write lock with a timeout, checks the pipe has
room and writes one frame of at most ``PIPE_BUF`` bytes (atomic). 
:class:`InboxReader` reads only the bytes the kernel says are there
(``FIONREAD``) and returns whole frames, keeping a partial one for later.
Both rely on ``SimpleQueue``'s ``_reader``/``_writer``/``_wlock`` attributes,
as the transport does.
"""

from __future__ import annotations

import fcntl
import os
import pickle
import select
import struct
import termios
from typing import Any

__all__ = ["bounded_send", "InboxReader", "encode_control", "decode_control"]

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
        timeout: Seconds to wait for the write lock, and again for pipe room.

    Returns:
        True if the frame was written, False if the lock or the pipe stayed
        unavailable (a writer died holding the lock, or the reader stopped reading).

    Raises:
        ValueError: The frame exceeds ``PIPE_BUF`` and so could not be written atomically.
    """
    frame = _LENGTH.pack(len(payload)) + payload
    if len(frame) > _PIPE_BUF:
        raise ValueError(f"control frame of {len(frame)} bytes exceeds PIPE_BUF ({_PIPE_BUF}); "
                         "bounded_send is only for small control tuples")
    lock = queue._wlock  # None where the queue needs no write lock (Windows)
    if lock is not None and not lock.acquire(timeout=timeout):
        return False
    try:
        fd = queue._writer.fileno()
        _, writable, _ = select.select([], [fd], [], timeout)
        if not writable:
            return False
        # The pipe has a free slot and the frame is <= PIPE_BUF: this write is
        # atomic and does not block.
        return os.write(fd, frame) == len(frame)
    finally:
        if lock is not None:
            lock.release()


class InboxReader:
    """Whole frames from a ``SimpleQueue``'s pipe, read without ever blocking.

    Call :meth:`read_available` when :meth:`fileno` is readable (for example
    from ``multiprocessing.connection.wait``). One reader per queue.
    """

    def __init__(self, queue: Any) -> None:
        self._fd = queue._reader.fileno()
        self._buffer = bytearray()
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
        return list(self._whole_frames())

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
