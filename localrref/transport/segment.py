"""Shared-memory segments without torch: their layout, fd-less mappings and byte blobs.

:mod:`localrref.transport.shm` builds the tensor lane on top of this module;
:mod:`localrref.transport.mpqueue` and the supervisor's inbox reader
(:mod:`localrref.launch.inbox`) use it to read *blobs*, inbox frames too big
for one atomic pipe write. This module imports no torch, so the launcher,
which never imports torch, can still read a worker's big control frame.

Data flow of a blob (sender rank s, receiver rank r)::

    rank s: ShmPool.export_bytes(frame)            rank r: SegmentMaps.import_bytes(h)
      take a FREE pooled block (slot := BUSY)         map the segment (once, cached)
      memmove frame into it -> BlobHandle h  ───────► copy the bytes out
      h.pack() travels in a small inbox frame         slot := FREE (a byte store; no message)

Layout of a segment file ``/dev/shm/lrr_<world>_<rank>_<pool>_<n>``: one
header page (``HEADER`` at 0, then one state byte per slot from
``SLOT_BASE``), then the data from ``DATA_OFFSET``, page aligned. A slot is
FREE (0) or BUSY (1); the sender sets BUSY, the one receiver of the block
sets FREE.

Memory ordering of a blob's FREE store: it follows the copy-out in program
order, and the copy's loads have completed (their values are in the new
bytes object) before the store issues; x86 (TSO) never lets a store pass an
earlier load. The sender's writes reach the receiver before the handle does,
because the handle travels through a pipe write (a syscall, a full barrier).

Threads: none started. :class:`SegmentMaps` may be used from any thread.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import re
import secrets
import struct
import threading
import weakref
from dataclasses import dataclass
from multiprocessing import resource_tracker

from localrref.errors import WorkerClosedError, WorkerGoneError

__all__ = ["SHM_DIR", "BlobHandle", "SegmentMaps", "Mapping", "open_segment",
           "track_segment", "untrack_segment", "tracker_running",
           "new_world_id", "segment_prefix", "world_segments", "sweep_world_segments"]

SHM_DIR = "/dev/shm"
_WORLD_ID = re.compile(r"[A-Za-z0-9]{1,32}")


def new_world_id() -> str:
    """A fresh id for a world's segment names (8 hex digits)."""
    return secrets.token_hex(4)


def segment_prefix(world_id: str) -> str:
    """The name prefix of every segment of ``world_id`` (``lrr_<world_id>_``)."""
    # Letters and digits only: with an "_" a world id could be a prefix of
    # another ("a" of "a_b"), and a sweep would take the other world's files.
    if not isinstance(world_id, str) or not _WORLD_ID.fullmatch(world_id):
        raise ValueError(f"world id must be 1-32 letters or digits, got {world_id!r}; "
                         f"use new_world_id()")
    return f"lrr_{world_id}_"


def world_segments(world_id: str, shm_dir: str = SHM_DIR) -> list[str]:
    """Names of the segments of ``world_id`` that exist now, sorted."""
    prefix = segment_prefix(world_id)
    return sorted(n for n in os.listdir(shm_dir) if n.startswith(prefix))


def sweep_world_segments(world_id: str, shm_dir: str = SHM_DIR) -> list[str]:
    """Unlink every segment of ``world_id``; return the names unlinked.

    For the supervisor after a run, when a worker may have been killed before
    it could unlink its own. Processes that still map a segment keep their
    memory until they unmap it.
    """
    swept = []
    for name in world_segments(world_id, shm_dir):
        try:
            os.unlink(os.path.join(shm_dir, name))
        except FileNotFoundError:
            continue  # its owner closed it meanwhile
        swept.append(name)
    return swept


def track_segment(name: str) -> None:
    """Have this process's resource tracker unlink ``name`` should everyone die first.

    The tracker is the process a supervisor and its workers share: it unlinks
    what is still registered once all of them have exited, so not even a
    killed supervisor leaves segments behind. Its names are shm_unlink(3)'s.
    """
    resource_tracker.register("/" + name, "shared_memory")


def untrack_segment(name: str) -> None:
    """``name`` was unlinked: the tracker must not unlink it (nor warn) later."""
    resource_tracker.unregister("/" + name, "shared_memory")


def tracker_running() -> bool:
    """True if this process talks to a resource tracker (asking would start one)."""
    return getattr(resource_tracker._resource_tracker, "_fd", None) is not None

PAGE = mmap.PAGESIZE
MAGIC = b"LRRSHM01"
HEADER = struct.Struct("<8sIIQ")     # magic, kind, n_slots, block_size
KIND_POOLED, KIND_SHARED = 1, 2
SLOT_BASE = 64                        # state bytes start after the header record
DATA_OFFSET = max(PAGE, 4096)         # data starts on the second page
MAX_SLOTS = DATA_OFFSET - SLOT_BASE
FREE, BUSY = 0, 1
OPEN_FLAGS = os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW

# offset, nbytes, slot; then the segment name (ASCII) fills the rest.
_BLOB = struct.Struct("<QQH")
_MAX_NAME = 255  # NAME_MAX: a longer name cannot be a file in /dev/shm


@dataclass(frozen=True, slots=True, kw_only=True)
class BlobHandle:
    """Where a blob's bytes lie: ``nbytes`` at ``offset`` of ``segment``, in block ``slot``.

    Made by ``ShmPool.export_bytes``; read (exactly once) by
    :meth:`SegmentMaps.import_bytes` or ``ShmMapper.import_bytes``.
    """

    segment: str
    offset: int
    nbytes: int
    slot: int

    def __post_init__(self) -> None:
        if (self.offset < DATA_OFFSET or self.nbytes <= 0 or not 0 <= self.slot < MAX_SLOTS
                or not 0 < len(self.segment) <= _MAX_NAME or "/" in self.segment):
            raise ValueError(f"malformed BlobHandle: {self!r}")

    def pack(self) -> bytes:
        """A compact encoding (about 50 bytes), cheaper than a pickle."""
        return _BLOB.pack(self.offset, self.nbytes, self.slot) + self.segment.encode("ascii")

    @classmethod
    def unpack(cls, data) -> BlobHandle:
        """Inverse of :meth:`pack`.

        Raises:
            ValueError: ``data`` is not a packed handle.
        """
        if len(data) <= _BLOB.size:
            raise ValueError(f"a packed BlobHandle is longer than {_BLOB.size} bytes, "
                             f"got {len(data)}")
        offset, nbytes, slot = _BLOB.unpack_from(data)
        try:
            name = bytes(data[_BLOB.size:]).decode("ascii")
        except UnicodeDecodeError:
            raise ValueError("a packed BlobHandle's segment name is not ASCII") from None
        return cls(segment=name, offset=offset, nbytes=nbytes, slot=slot)


# -- mappings without file descriptors ---------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_int64)
_libc.munmap.restype = ctypes.c_int
_libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_MAP_FAILED = ctypes.c_void_p(-1).value
_memory_view = ctypes.pythonapi.PyMemoryView_FromMemory
_memory_view.restype = ctypes.py_object
_memory_view.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int)
_PyBUF_READ, _PyBUF_WRITE = 0x100, 0x200


class Mapping:
    """A whole segment mapped read-write, holding no file descriptor.

    Unmapped only when this object is garbage collected; every buffer handed
    out keeps it alive through its finalizer, so no address is ever used
    after ``munmap``.
    """

    __slots__ = ("addr", "size", "__weakref__")

    def __init__(self, fd: int, size: int, *, private: bool) -> None:
        # MAP_POPULATE only for shared mappings: on a private writable one it
        # would break copy-on-write for every page, i.e. copy the tensor.
        flags = mmap.MAP_PRIVATE if private else mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        addr = _libc.mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE, flags, fd, 0)
        if addr == _MAP_FAILED or addr is None:
            err = ctypes.get_errno()
            raise OSError(err, f"mmap of {size} bytes failed: {os.strerror(err)}")
        self.addr, self.size = addr, size
        weakref.finalize(self, _libc.munmap, addr, size).atexit = False

    def buffer(self, offset: int, nbytes: int, on_release=None, *args) -> memoryview:
        """A writable view of ``[offset, offset + nbytes)``; ``on_release(self, *args)``
        runs when the view is collected."""
        self._check_span(offset, nbytes)
        view = _memory_view(self.addr + offset, nbytes, _PyBUF_WRITE)
        weakref.finalize(view, on_release or _keep_alive, self, *args).atexit = False
        return view

    def read(self, offset: int, nbytes: int) -> bytes:
        return ctypes.string_at(self.addr + offset, nbytes)

    def copy_out(self, offset: int, nbytes: int) -> bytes:
        """A copy of ``[offset, offset + nbytes)`` (any size; ``read`` stops at 2 GiB)."""
        self._check_span(offset, nbytes)
        return bytes(_memory_view(self.addr + offset, nbytes, _PyBUF_READ))

    def write(self, offset: int, data) -> None:
        """Copy the bytes-like ``data`` to ``offset`` (without the GIL for ``bytes``)."""
        view = memoryview(data)
        self._check_span(offset, view.nbytes)
        if isinstance(data, bytes):
            # ctypes drops the GIL around memmove: a multi-MiB frame does not
            # stall the sender's other threads.
            ctypes.memmove(self.addr + offset, data, view.nbytes)
        else:
            _memory_view(self.addr + offset, view.nbytes, _PyBUF_WRITE)[:] = view.cast("B")

    def set_byte(self, offset: int, value: int) -> None:
        # One byte store: atomic, and never touches the neighbouring slots.
        ctypes.c_uint8.from_address(self.addr + offset).value = value

    def _check_span(self, offset: int, nbytes: int) -> None:
        if not (0 <= offset and nbytes > 0 and offset + nbytes <= self.size):
            raise ValueError(f"bytes [{offset}, {offset + nbytes}) lie outside the "
                             f"{self.size}-byte segment")


def _keep_alive(mapping: Mapping) -> None:
    """Finalizer whose only job is to have held ``mapping`` until now."""


def _map_file(path: str, *, private: bool, ticket: int | None = None) -> Mapping:
    fd = os.open(path, OPEN_FLAGS)
    try:
        mapping = Mapping(fd, os.fstat(fd).st_size, private=private)
        if ticket is not None:
            # Through the fd: a store into a private mapping would stay private.
            os.pwrite(fd, bytes([FREE]), SLOT_BASE + ticket)
    finally:
        os.close(fd)
    if mapping.read(0, len(MAGIC)) != MAGIC:
        raise ValueError(f"{path} is not a localrref shared-memory segment")
    return mapping


def segment_rank(name: str) -> int | None:
    """The sender's rank in a segment name ``lrr_<world>_<rank>_...``, if it has one."""
    try:
        return int(name.split("_")[2])
    except (IndexError, ValueError):
        return None


def open_segment(name: str, *, private: bool, ticket: int | None = None) -> Mapping:
    """Map segment ``name`` of ``SHM_DIR`` (``private``: copy-on-write, not pre-populated).

    ``ticket``: a slot to set FREE through the file once mapped.

    Raises:
        WorkerGoneError: the segment is gone (its sender closed its pool, or
            died and was swept).
        ValueError: the file is not a localrref segment.
    """
    if "/" in name:
        raise ValueError(f"segment names have no '/': {name!r}")
    try:
        return _map_file(os.path.join(SHM_DIR, name), private=private, ticket=ticket)
    except FileNotFoundError:
        rank = segment_rank(name)
        raise WorkerGoneError(f"cannot receive from rank {rank}: its shared-memory "
                              f"segment {SHM_DIR}/{name} is gone (the sender closed its pool "
                              f"or exited before the message was read)", rank=rank) from None


class SegmentMaps:
    """A receiver's cached ``MAP_SHARED`` mappings of pooled segments, by name.

    Thread-safe. A mapping stays cached until :meth:`close` (the pool's
    memory is a high-water mark for the run); tensors and buffers already
    handed out keep their mapping alive after that.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._maps: dict[str, Mapping] = {}
        self._closed = False

    def get(self, name: str) -> Mapping:
        """The mapping of pooled segment ``name`` (mapped on first use).

        Raises:
            WorkerClosedError: closed.
            WorkerGoneError, ValueError: as :func:`open_segment`.
        """
        mapping = self._maps.get(name)
        if mapping is not None:
            return mapping
        with self._lock:
            if self._closed:
                raise WorkerClosedError("the shared-memory mapper is closed")
            mapping = self._maps.get(name)
            if mapping is None:
                mapping = self._maps[name] = open_segment(name, private=False)
            return mapping

    def import_bytes(self, handle: BlobHandle) -> bytes:
        """Copy the blob out and give its block back to the sender at once.

        Import each handle exactly once.

        Raises:
            WorkerClosedError: closed.
            WorkerGoneError: the segment is gone.
            ValueError: the handle does not fit its segment.
        """
        if self._closed:
            raise WorkerClosedError("the shared-memory mapper is closed")
        mapping = self.get(handle.segment)
        data = mapping.copy_out(handle.offset, handle.nbytes)
        mapping.set_byte(SLOT_BASE + handle.slot, FREE)
        return data

    def close(self) -> None:
        """Drop the cached mappings (idempotent); later imports raise ``WorkerClosedError``."""
        with self._lock:
            self._closed = True
            self._maps = {}
