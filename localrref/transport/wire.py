"""The inbox wire format: one record per frame, one atomic pipe write per record.

Every reader and writer of an inbox goes through here: a worker's
:class:`~localrref.transport.mpqueue.Endpoint` and the supervisor's
:class:`~localrref.launch.inbox.InboxReader` and ``bounded_send``.

A record is ``multiprocessing.connection``'s frame (a 4-byte big-endian
signed length, then the payload), whose payload is::

    <sender rank, int32 little-endian> + frame          an inline frame
    <~sender rank, int32 little-endian> + packed handle  a *blob*: the frame lies in a
                                                          pooled shared-memory block

A whole record is at most ``PIPE_BUF`` bytes, so one ``os.write`` puts it in
the pipe atomically: it never interleaves with another writer's bytes, in
any process, and a writer killed mid-send leaves all of it or nothing. A
frame too big for that (over :data:`MAX_INLINE` bytes) travels as a blob;
the complemented rank (always negative, as no rank is) tells the reader to
copy the frame out of shared memory (:func:`import_blob`).

A frame starts with a tag byte: :data:`CONTROL_TAG` for a pickled control
record (``localrref.control_messages``; :func:`encode_control`),
:data:`AUTOGRAD_TAG` for a distributed autograd message (pickled by
``localrref.codec.pickler``; ``localrref.agent.tape``); any other tag is a
protocol message (``M``, ``localrref.codec.frames``).

Torch-free: the supervisor imports this module.
"""

from __future__ import annotations

import pickle
import select
import struct
from collections.abc import Iterator

from localrref.transport.segment import BlobHandle

__all__ = ["LENGTH", "SRC", "PIPE_BUF", "MAX_INLINE", "CONTROL_TAG", "AUTOGRAD_TAG",
           "pack", "pack_blob", "Unframer", "split", "import_blob", "encode_control",
           "decode_control"]

LENGTH = struct.Struct("!i")   # multiprocessing.connection's frame header
SRC = struct.Struct("<i")      # the sender's rank, or its complement for a blob
_LONG_LENGTH = struct.Struct("!Q")  # after a length of -1: frames over 2 GiB

# The largest write a pipe performs atomically (POSIX's minimum is 512).
PIPE_BUF = getattr(select, "PIPE_BUF", 512)

# The largest frame sent inline: header, rank and frame fill one PIPE_BUF.
MAX_INLINE = PIPE_BUF - LENGTH.size - SRC.size

CONTROL_TAG = b"C"
AUTOGRAD_TAG = b"A"


def pack(src: int, frame) -> bytes:
    """The record of an inline ``frame`` from rank ``src`` (at most ``MAX_INLINE`` bytes)."""
    return b"".join((LENGTH.pack(SRC.size + len(frame)), SRC.pack(src), frame))


def pack_blob(src: int, packed_handle: bytes) -> bytes:
    """The record of a frame from rank ``src`` that lies in shared memory."""
    return b"".join((LENGTH.pack(SRC.size + len(packed_handle)), SRC.pack(~src), packed_handle))


class Unframer:
    """Whole record payloads out of the bytes read from a pipe, a partial one kept."""

    __slots__ = ("buffer",)

    def __init__(self) -> None:
        self.buffer = bytearray()

    def feed(self, data: bytes) -> None:
        self.buffer += data

    def next(self) -> bytes | None:
        """The next whole payload, or None until more bytes arrive."""
        buffer = self.buffer
        if len(buffer) < LENGTH.size:
            return None
        (size,) = LENGTH.unpack_from(buffer)
        start = LENGTH.size
        if size == -1:
            if len(buffer) < start + _LONG_LENGTH.size:
                return None
            (size,) = _LONG_LENGTH.unpack_from(buffer, start)
            start += _LONG_LENGTH.size
        end = start + size
        if len(buffer) < end:
            return None  # the rest of this record is still in the pipe
        payload = bytes(buffer[start:end])
        del buffer[:end]
        return payload

    def __iter__(self) -> Iterator[bytes]:
        while (payload := self.next()) is not None:
            yield payload


def split(payload: bytes) -> tuple[int, bytes, bool]:
    """``(sender rank, frame or packed handle, is_blob)`` of a record's payload.

    Raises:
        ValueError: the payload is too short to hold a sender.
    """
    if len(payload) < SRC.size:
        raise ValueError(f"a {len(payload)}-byte record has no sender field")
    (src,) = SRC.unpack_from(payload)
    body = payload[SRC.size:]
    return (src, body, False) if src >= 0 else (~src, body, True)


def import_blob(packed_handle, maps) -> bytes:
    """The frame a blob record names, copied out of shared memory (its block is freed).

    ``maps`` is a :class:`~localrref.transport.segment.SegmentMaps` or anything
    with its ``import_bytes``.

    Raises:
        ValueError: not a packed handle.
        WorkerGoneError: the segment is gone (its sender closed or was swept).
    """
    return maps.import_bytes(BlobHandle.unpack(memoryview(packed_handle)))


def encode_control(control) -> bytes:
    """The frame of a control record (``localrref.control_messages``)."""
    return CONTROL_TAG + pickle.dumps(control, protocol=pickle.HIGHEST_PROTOCOL)


def decode_control(frame) -> object:
    """The control record a control frame carries.

    Raises:
        ValueError: not a control frame, or it does not unpickle.
    """
    if bytes(frame[:1]) != CONTROL_TAG:
        raise ValueError(f"not a control frame (tag {bytes(frame[:1])!r})")
    try:
        return pickle.loads(memoryview(frame)[1:])
    except Exception as exc:
        raise ValueError(f"a control frame that does not unpickle: {type(exc).__name__}: "
                         f"{exc}") from None
