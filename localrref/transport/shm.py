"""The shared-memory tensor lane: big tensors travel as small handles.

Data flow (sender rank s, receiver rank r; the frame goes through mpqueue)::

    rank s, any thread                          rank r, any thread
    ------------------                          ------------------
    pool.export(t):                             mapper.import_(h):
      take a FREE block of t's size class         map the segment (once, cached; fd closed)
      (slot byte := BUSY); copy t into it         tensor = zero-copy VIEW of the block
      (the one copy) -> TensorHandle h  ───────►  (torch.frombuffer over the mapping)
                                                    ... the tensor is used, then dies ...
    a later export finds the slot FREE  ◄───────  storage finalizer: slot byte := FREE
                                                  (a store in shared memory, no message)

The same pooled blocks carry *blobs*, inbox frames too big for one atomic
pipe write (:meth:`ShmPool.export_bytes`, :meth:`ShmMapper.import_bytes`,
which copies the bytes out and frees the block at once; see
:mod:`localrref.transport.segment`, the torch-free half of this lane).

Segments are files ``/dev/shm/lrr_<world>_<rank>_<pool>_<n>`` owned by the
sending pool. Layout (:mod:`localrref.transport.segment`): one header page
(magic, then one state byte per slot at ``SLOT_BASE``), then the data, page
aligned.

* A *pooled* segment holds ``n`` equal blocks of one size class (powers of
  two split in quarters, so at most 25 % slack); slot ``i`` is block ``i``'s
  state: FREE (0) or BUSY (1). The sender sets BUSY; only the one receiver of
  that block sets it FREE again, from the finalizer of its tensor's storage
  (or right after copying a blob out).
  New segments are pre-faulted (``posix_fallocate`` + ``MAP_POPULATE``) and
  blocks are reused: a copy into touched shared memory runs 4x faster than
  ``share_memory_()`` on a fresh tensor (new pages, page faults).
* A *shared* segment holds one tensor made by :meth:`ShmPool.share` or
  :meth:`ShmPool.empty` (the opt-in zero-copy lane). Its slots are tickets:
  each export sets a FREE ticket BUSY, and the receiver sets it FREE once it
  has mapped the segment.

Value semantics: the receiver never aliases memory the sender can still
mutate. An exported pooled block is written by the sender only before the
handle is sent and only after the receiver freed it. A shared tensor is
mapped by the receiver ``MAP_PRIVATE`` (copy-on-write, one fresh mapping per
import): the receiver's writes stay private. Its caveat is the sender's side:
the sender must not mutate a shared tensor after exporting it, or receivers
will see the change.

Memory ordering of the state byte: the receiver's FREE store runs in the
storage deleter, after the last reference to the storage was dropped by an
atomic acq_rel decrement (c10::intrusive_ptr), so every earlier read of the
block, from any thread, happens before the store; on x86 (TSO) that is true
of any store anyway. The sender reads the byte under its pool lock and only
then writes the block (a control dependency; stores are never speculated).
The sender's writes reach the receiver before the handle does: the handle
travels through a pipe write, a full barrier. A single byte store is atomic
on every platform torch supports, so neighbouring slots never tear.

Lifetime and unlinking:

* Pooled segments keep their names until :meth:`ShmPool.close` (or the pool
  is garbage collected, or the process exits normally): any handle in flight
  may name any of them, and receivers open them lazily, so there is no
  earlier moment at which every opener is known.
* A shared segment is unlinked as soon as its sender-side tensor is gone and
  every ticket is FREE (every handle sent was mapped), checked on each pool
  call, or at close.
* Every mapping is made with libc's ``mmap`` through ctypes and its fd is
  closed at once (Python's ``mmap`` object keeps a duplicate fd per mapping
  until 3.13's ``trackfd``): thousands of tensors in flight cost mappings,
  never file descriptors. A mapping is unmapped when its last user (a
  tensor's buffer, a pool or mapper record) is garbage collected, so no code
  path can touch an address after ``munmap``. Mappings survive unlinking, so a
  receiver's tensors stay valid after the sender closed, exited or was
  killed; the memory is freed with the last mapping. A receiver keeps its
  cached mapping of a pooled segment until its mapper closes, so the pool's
  memory is a high-water mark for the run (there is no trimming yet).
* A SIGKILLed sender cannot unlink: the supervisor calls
  :func:`sweep_world_segments` after the run (names carry the world id).
* A killed *supervisor* cannot sweep. So an agent's pool (``tracked=True``)
  also registers each segment with multiprocessing's resource tracker, the
  process every worker shares with its supervisor, and unregisters it when
  it unlinks it. The tracker unlinks whatever is still registered once every
  one of those processes has exited, and warns about the "leak".

Threads: this module starts none. Pool and mapper calls may come from any
thread (one lock each, never held during a copy or an import's tensor
construction). Storage finalizers run on whichever thread drops the last
reference, possibly inside a pool or mapper call, so they take no lock: the
receiver's stores one byte; the sender's (a shared tensor died) appends to a
deque and reaps only if the pool lock is free.

Why not ``multiprocessing.shared_memory``: every ``SharedMemory`` (also one
that merely attaches, bpo-39959) registers its name with the
``resource_tracker``, which unlinks it and warns about a "leak" when the
registering process exits: a receiver would destroy its sender's segments
and the run would spew warnings. We create and open ``/dev/shm`` files with
``os.open`` and map them ourselves, which is what ``shm_open`` does on
Linux, and keep the accounting here.
"""

from __future__ import annotations

import collections
import errno
import itertools
import multiprocessing.util
import os
import secrets
import struct
import threading
import weakref
from dataclasses import dataclass

import torch

from localrref.dtypes import DTYPES, dtype_code
from localrref.transport.copier import ParallelCopier
from localrref.errors import WorkerClosedError
from localrref.transport.segment import BUSY as _BUSY
from localrref.transport.segment import DATA_OFFSET as _DATA_OFFSET
from localrref.transport.segment import FREE as _FREE
from localrref.transport.segment import HEADER as _HEADER
from localrref.transport.segment import KIND_POOLED as _KIND_POOLED
from localrref.transport.segment import KIND_SHARED as _KIND_SHARED
from localrref.transport.segment import MAGIC as _MAGIC
from localrref.transport.segment import MAX_SLOTS as _MAX_SLOTS
from localrref.transport.segment import OPEN_FLAGS as _OPEN_FLAGS
from localrref.transport.segment import PAGE as _PAGE
from localrref.transport.segment import SLOT_BASE as _SLOT_BASE
from localrref.transport.segment import SHM_DIR, BlobHandle, Mapping, SegmentMaps, open_segment
from localrref.transport.segment import track_segment, untrack_segment
from localrref.transport.segment import (new_world_id, segment_prefix, sweep_world_segments,
                                          world_segments)

__all__ = [
    "DEFAULT_THRESHOLD",
    "SHM_DIR",
    "TensorHandle",
    "BlobHandle",
    "PoolStats",
    "ShmPool",
    "ShmMapper",
    "new_world_id",
    "segment_prefix",
    "world_segments",
    "sweep_world_segments",
]

DEFAULT_THRESHOLD = 64 * 1024

# offset, nbytes, storage_offset, slot, private, dtype code, requires_grad, ndim
_HANDLE = struct.Struct("<QQQI?B?B")


# A new pooled segment holds as many blocks as the class already has (the
# pool doubles), but no less than _MIN_SEGMENT and no more than _MAX_SEGMENT
# bytes of data unless a single block is bigger.
_MIN_SEGMENT = 1 << 20
_MAX_SEGMENT = 64 << 20


@dataclass(frozen=True, slots=True, kw_only=True)
class TensorHandle:
    """Where a tensor lies in shared memory; small and picklable.

    ``offset``/``nbytes`` delimit the storage inside segment ``segment``;
    ``dtype``, ``shape``, ``stride`` and ``storage_offset`` (in elements)
    rebuild the tensor over it. ``slot`` is the state byte the receiver
    clears; ``private`` marks a shared (zero-copy) tensor, mapped
    copy-on-write per import.
    """

    segment: str
    offset: int
    nbytes: int
    slot: int
    private: bool
    dtype: torch.dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    storage_offset: int
    requires_grad: bool

    def pack(self) -> bytes:
        """A compact encoding, a tenth of the cost of pickling the record.

        Raises:
            ValueError: the dtype has no code (see ``DTYPES``).
        """
        ndim = len(self.shape)
        return b"".join((
            _HANDLE.pack(self.offset, self.nbytes, self.storage_offset, self.slot,
                         self.private, dtype_code(self.dtype), self.requires_grad, ndim),
            struct.pack(f"<{2 * ndim}q", *self.shape, *self.stride),
            self.segment.encode("ascii")))

    @classmethod
    def unpack(cls, data) -> TensorHandle:
        """Inverse of :meth:`pack`.

        Raises:
            ValueError: ``data`` is not a packed handle.
        """
        try:
            (offset, nbytes, storage_offset, slot, private, code, requires_grad,
             ndim) = _HANDLE.unpack_from(data)
            dims = struct.unpack_from(f"<{2 * ndim}q", data, _HANDLE.size)
            name = bytes(data[_HANDLE.size + 16 * ndim:]).decode("ascii")
            dtype = DTYPES[code]
        except (struct.error, UnicodeDecodeError, IndexError) as exc:
            raise ValueError(f"not a packed TensorHandle ({exc})") from None
        return cls(segment=name, offset=offset, nbytes=nbytes, slot=slot, private=private,
                   dtype=dtype, shape=dims[:ndim], stride=dims[ndim:],
                   storage_offset=storage_offset, requires_grad=requires_grad)

    def __post_init__(self) -> None:
        if self.offset < _DATA_OFFSET or self.nbytes <= 0 or not 0 <= self.slot < _MAX_SLOTS:
            raise ValueError(f"malformed TensorHandle: {self!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class PoolStats:
    """A snapshot of a pool, for tests and debug output."""

    pooled_segments: int
    shared_segments: int
    blocks: int
    blocks_in_use: int
    bytes: int


def _block_size(nbytes: int) -> int:
    """The size class for ``nbytes``: a page, or 5/8, 6/8, 7/8 or 8/8 of a power of two."""
    if nbytes <= _PAGE:
        return _PAGE
    step = (1 << (nbytes - 1).bit_length()) // 8
    size = -(-nbytes // step) * step
    return -(-size // _PAGE) * _PAGE


def _is_dense(shape, stride) -> bool:
    """True if the elements fill a gap-free span (any dim order): torch's
    non-overlapping-and-dense, which Python does not expose."""
    expected = 1
    for st, sz in sorted((st, sz) for sz, st in zip(shape, stride) if sz != 1):
        if st != expected:
            return False
        expected *= sz
    return True


def _contiguous_stride(shape) -> tuple[int, ...]:
    stride, acc = [], 1
    for sz in reversed(shape):
        stride.append(acc)
        acc *= max(sz, 1)
    return tuple(reversed(stride))


def _check_exportable(tensor) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(tensor).__name__}")
    if tensor.layout != torch.strided or tensor.device.type != "cpu" or tensor.is_quantized:
        raise ValueError(f"only strided CPU tensors travel through shared memory, got "
                         f"layout={tensor.layout} device={tensor.device} "
                         f"quantized={tensor.is_quantized}; pickle it inline instead")
    if tensor.numel() == 0:
        raise ValueError("an empty tensor has no bytes to share; pickle it inline instead")


def _copy_into(storage, start: int, src: torch.Tensor, stride, dense: bool,
               copier: ParallelCopier) -> None:
    """Copy ``src``'s values to byte ``start`` of ``storage``, laid out with ``stride``."""
    nbytes = src.numel() * src.element_size()
    if dense and not (src.is_conj() or src.is_neg()):
        # A dense tensor's elements fill [data_ptr, data_ptr + nbytes) in any
        # dim order, and the copy keeps its strides: one memmove, which drops
        # the GIL (split across our own helper threads when big). Not torch's
        # copy_: it wakes its intra-op pool, which on a loaded 2-core machine
        # cost milliseconds per 64 KiB copy (waiting for a descheduled OpenMP
        # thread).
        copier.memmove(storage.data_ptr() + start, src.data_ptr(), nbytes)
        return
    itemsize = src.element_size()
    dst = torch.empty((0,), dtype=src.dtype).set_(storage, start // itemsize, src.shape, stride)
    dst.copy_(src)


def _tensor_over(buffer, dtype, storage_offset, shape, stride, requires_grad) -> torch.Tensor:
    # torch.frombuffer keeps `buffer` referenced until the storage dies.
    storage = torch.frombuffer(buffer, dtype=torch.uint8).untyped_storage()
    out = torch.empty((0,), dtype=dtype).set_(storage, storage_offset, shape, stride)
    if requires_grad:
        out.requires_grad_()
    return out


class _Segment:
    """Sender-side record of one segment (mutated under the pool lock)."""

    __slots__ = ("name", "mapping", "kind", "n_slots", "block_size", "storage", "data_ptr",
                 "unlinked")

    def __init__(self, name, mapping, kind, n_slots, block_size):
        self.name = name
        self.mapping = mapping
        self.kind = kind
        self.n_slots = n_slots
        self.block_size = block_size
        self.storage = None    # pooled: uint8 storage over the data area, for copies
        self.data_ptr = 0      # shared: address of the user's storage
        self.unlinked = False

    def find(self, state: int) -> int:
        """Index of the first slot in ``state``, or -1 (a C-speed scan)."""
        return self.mapping.read(_SLOT_BASE, self.n_slots).find(state)

    def set_slot(self, slot: int, state: int) -> None:
        self.mapping.set_byte(_SLOT_BASE + slot, state)

    def count(self, state: int) -> int:
        return self.mapping.read(_SLOT_BASE, self.n_slots).count(state)


class ShmPool:
    """The sending side: this process's shared-memory segments.

    One per process (the agent's). Thread-safe: one lock guards the
    bookkeeping; copies run outside it.

    Args:
        world_id: the world's id (:func:`new_world_id`), used in segment names
            so the supervisor can sweep them.
        rank: this process's rank, used in segment names.
        threshold: tensors of at least this many bytes should travel as
            handles (:meth:`wants`); smaller ones are pickled inline.
        tracked: register every segment with the resource tracker this
            process shares with its supervisor (see the module docstring);
            off for pools outside a world, which would start a tracker.
    """

    def __init__(self, world_id: str, rank: int, *, threshold: int = DEFAULT_THRESHOLD,
                 tracked: bool = False) -> None:
        prefix = segment_prefix(world_id)  # refuses a malformed id before anything is made
        if threshold < 1:
            raise ValueError(f"threshold must be >= 1 byte, got {threshold}")
        self.world_id = world_id
        self.rank = rank
        self.threshold = threshold
        # A per-pool token keeps names unique if a process builds two pools
        # (tests do) or a rank number is ever reused.
        self._prefix = f"{prefix}{rank}_{secrets.token_hex(3)}_"
        self._counter = itertools.count()
        # What copies tensors into the segments (fault injection may wrap it).
        self.copier = ParallelCopier()
        self._lock = threading.Lock()
        self._closed = False
        self._classes: dict[int, list[_Segment]] = {}
        self._by_name: dict[str, _Segment] = {}
        self._shared: dict[int, _Segment] = {}      # data_ptr -> shared segment
        # Shared segments whose tensor died. Appended by storage finalizers,
        # which may run on any thread at any allocation, even one holding
        # self._lock: they never block on the lock, this deque is enough.
        self._dead: collections.deque[_Segment] = collections.deque()
        # Unlinks what is left if the pool is dropped without close() or the
        # process exits normally; the set is shared, not the pool. It is
        # multiprocessing's Finalize, not weakref.finalize, because spawned
        # children leave through os._exit and run those hooks, not atexit's.
        self._names: set[str] = set()
        self._tracked = tracked
        self._finalizer = multiprocessing.util.Finalize(self, _unlink_names,
                                                        args=(self._names, tracked),
                                                        exitpriority=10)

    # -- the sender's API ---------------------------------------------------

    def wants(self, tensor) -> bool:
        """True if ``tensor`` should travel as a handle rather than inline."""
        return (isinstance(tensor, torch.Tensor) and tensor.layout == torch.strided
                and tensor.device.type == "cpu" and not tensor.is_quantized
                and self.takes(tensor.nbytes))

    def takes(self, nbytes: int) -> bool:
        """:meth:`wants` for a strided CPU tensor of ``nbytes`` (a caller that
        has checked the rest already)."""
        return 0 < nbytes and nbytes >= self.threshold

    def export(self, tensor: torch.Tensor) -> TensorHandle:
        """Place ``tensor``'s value in shared memory and describe where.

        Copies once into a pooled block, unless ``tensor`` lives in a segment
        made by :meth:`share`/:meth:`empty` (then no copy). Dense layouts keep
        their strides; other views arrive contiguous. The handle must be
        imported exactly once (or given to :meth:`release_unsent`).

        Raises:
            TypeError, ValueError: not a non-empty strided CPU tensor.
            WorkerClosedError: the pool is closed.
            OSError: ``/dev/shm`` is full (errno ENOSPC).
        """
        _check_exportable(tensor)
        self._reap_soon()
        if self._shared and not (tensor.is_conj() or tensor.is_neg()):
            handle = self._export_shared(tensor)
            if handle is not None:
                return handle
        return self._export_copy(tensor)

    def export_storage(self, tensor: torch.Tensor) -> TensorHandle:
        """Place ``tensor``'s whole storage in shared memory; the handle keeps its layout.

        The receiver's tensor has ``tensor``'s strides and storage offset
        over a copy of its storage, as torch's RPC delivers a tensor it does
        not compact (see ``codec/pickler.py``). One copy of the storage's
        bytes, whatever the view. Conjugate and negative views must be
        resolved first. Raises as :meth:`export`.
        """
        _check_exportable(tensor)
        if tensor.is_conj() or tensor.is_neg():
            raise ValueError("resolve a conjugate or negative view before export_storage()")
        self._reap_soon()
        if self._shared:
            handle = self._export_shared(tensor)
            if handle is not None:
                return handle
        storage = tensor.untyped_storage()
        nbytes = storage.nbytes()

        def copy(target, start):
            self.copier.memmove(target.data_ptr() + start, storage.data_ptr(), nbytes)

        return self._into_block(nbytes, copy, tensor, tuple(tensor.stride()),
                                tensor.storage_offset())

    def share(self, tensor: torch.Tensor) -> torch.Tensor:
        """Return a copy of ``tensor`` that lives in shared memory; sending it copies nothing.

        Opt-in zero copy: every later :meth:`export` of the result (or of a
        view of it) hands out the segment itself. Caveat: do not mutate the
        result after sending it; receivers map it copy-on-write, so they see
        your later writes but you never see theirs. The segment is unlinked
        once the result is garbage collected and every handle sent was
        received.

        Raises:
            TypeError, ValueError: not a non-empty strided CPU tensor.
            WorkerClosedError: the pool is closed.
        """
        _check_exportable(tensor)
        src = tensor.detach()
        dense = _is_dense(src.shape, src.stride())
        stride = src.stride() if dense else _contiguous_stride(src.shape)
        out = self._new_shared(src.dtype, src.shape, stride, src.numel() * src.element_size())
        _copy_into(out.untyped_storage(), 0, src, stride, dense, self.copier)
        if tensor.requires_grad:
            out.requires_grad_()
        return out

    def empty(self, shape, *, dtype: torch.dtype = torch.float32,
              requires_grad: bool = False) -> torch.Tensor:
        """Like ``torch.empty`` but in shared memory, as :meth:`share` makes (same caveat)."""
        shape = tuple(shape)
        numel = 1
        for sz in shape:
            numel *= sz
        if numel == 0:
            raise ValueError("an empty tensor has no bytes to share")
        out = self._new_shared(dtype, shape, _contiguous_stride(shape), numel * dtype.itemsize)
        if requires_grad:
            out.requires_grad_()
        return out

    def export_bytes(self, data) -> BlobHandle:
        """Copy the bytes-like ``data`` into a pooled block and describe where.

        The block is free again once the receiver's
        :meth:`ShmMapper.import_bytes` has copied the bytes out (or after
        :meth:`release_unsent`). Used by the inboxes for frames too big for
        one atomic pipe write.

        Raises:
            ValueError: ``data`` is empty.
            WorkerClosedError: the pool is closed.
            OSError: ``/dev/shm`` is full (errno ENOSPC).
        """
        nbytes = memoryview(data).nbytes
        if nbytes == 0:
            raise ValueError("an empty blob has no bytes to share; send it inline")
        self._reap_soon()
        with self._lock:
            self._check_open()
            seg, block = self._take_block(nbytes)
        offset = _DATA_OFFSET + block * seg.block_size
        try:
            seg.mapping.write(offset, data)
        except BaseException:
            seg.set_slot(block, _FREE)
            raise
        return BlobHandle(segment=seg.name, offset=offset, nbytes=nbytes, slot=block)

    def release_unsent(self, handle: TensorHandle | BlobHandle) -> None:
        """Give back a handle that will never be imported (its send failed)."""
        with self._lock:
            seg = self._by_name.get(handle.segment)
            if seg is not None:
                seg.set_slot(handle.slot, _FREE)

    def reap(self) -> int:
        """Unlink shared segments whose tensor died and whose handles were all
        received; return how many. Runs on its own inside every export."""
        with self._lock:
            return self._reap_locked()

    def stats(self) -> PoolStats:
        """Count segments and blocks (a slot scan; for tests and debugging)."""
        with self._lock:
            pooled = [s for segs in self._classes.values() for s in segs]
            shared = [s for s in self._by_name.values() if s.kind == _KIND_SHARED]
            return PoolStats(pooled_segments=len(pooled), shared_segments=len(shared),
                             blocks=sum(s.n_slots for s in pooled),
                             blocks_in_use=sum(s.count(_BUSY) for s in pooled),
                             bytes=sum(s.mapping.size for s in self._by_name.values()))

    def segment_names(self) -> list[str]:
        """Names of the segments this pool has linked in ``/dev/shm`` now."""
        with self._lock:
            return sorted(self._by_name)

    def close(self) -> None:
        """Unlink every segment; later exports raise ``WorkerClosedError``.

        Tensors already received stay valid (their mappings outlive the names);
        handles still in flight can no longer be imported. Idempotent.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for seg in self._by_name.values():
                seg.storage = None  # unmapped once in-flight copies and shared tensors let go
            self._classes.clear()
            self._by_name.clear()
            self._shared.clear()
            self._dead.clear()
        self.copier.close()
        self._finalizer()

    def __repr__(self) -> str:
        return (f"<ShmPool world={self.world_id} rank={self.rank} threshold={self.threshold} "
                f"{'closed' if self._closed else 'open'}>")

    # -- internals ------------------------------------------------------------

    def _export_copy(self, tensor: torch.Tensor) -> TensorHandle:
        src = tensor.detach()
        dense = _is_dense(src.shape, src.stride())
        stride = src.stride() if dense else _contiguous_stride(src.shape)

        def copy(target, start):
            _copy_into(target, start, src, stride, dense, self.copier)

        return self._into_block(src.numel() * src.element_size(), copy, tensor, tuple(stride), 0)

    def _into_block(self, nbytes: int, copy, tensor, stride, storage_offset) -> TensorHandle:
        """Take a block of ``nbytes``, fill it with ``copy(storage, start)``, describe it."""
        with self._lock:
            self._check_open()
            seg, block = self._take_block(nbytes)
            storage = seg.storage
        start = block * seg.block_size
        try:
            copy(storage, start)
        except BaseException:
            seg.set_slot(block, _FREE)
            raise
        return TensorHandle(segment=seg.name, offset=_DATA_OFFSET + start, nbytes=nbytes,
                            slot=block, private=False, dtype=tensor.dtype,
                            shape=tuple(tensor.shape), stride=stride,
                            storage_offset=storage_offset, requires_grad=tensor.requires_grad)

    def _export_shared(self, tensor: torch.Tensor) -> TensorHandle | None:
        storage = tensor.untyped_storage()
        with self._lock:
            self._check_open()
            seg = self._shared.get(storage.data_ptr())
            if seg is None:
                return None
            ticket = seg.find(_FREE)
            if ticket < 0:
                return None  # every ticket is out: fall back to a copy
            seg.set_slot(ticket, _BUSY)
        return TensorHandle(segment=seg.name, offset=_DATA_OFFSET, nbytes=storage.nbytes(),
                            slot=ticket, private=True, dtype=tensor.dtype,
                            shape=tuple(tensor.shape), stride=tuple(tensor.stride()),
                            storage_offset=tensor.storage_offset(),
                            requires_grad=tensor.requires_grad)

    def _take_block(self, nbytes: int) -> tuple[_Segment, int]:
        size = _block_size(nbytes)
        segments = self._classes.setdefault(size, [])
        for seg in reversed(segments):  # the newest is the biggest
            block = seg.find(_FREE)
            if block >= 0:
                seg.set_slot(block, _BUSY)
                return seg, block
        have = sum(s.n_slots for s in segments)
        lo = max(1, _MIN_SEGMENT // size)
        hi = max(1, min(_MAX_SLOTS, _MAX_SEGMENT // size))
        n_blocks = max(lo, min(have, hi))
        seg = self._create(_KIND_POOLED, n_slots=n_blocks, block_size=size,
                           data_bytes=n_blocks * size)
        seg.storage = torch.frombuffer(seg.mapping.buffer(_DATA_OFFSET, n_blocks * size),
                                       dtype=torch.uint8).untyped_storage()
        segments.append(seg)
        seg.set_slot(0, _BUSY)
        return seg, 0

    def _new_shared(self, dtype, shape, stride, nbytes) -> torch.Tensor:
        with self._lock:
            self._check_open()
            seg = self._create(_KIND_SHARED, n_slots=_MAX_SLOTS, block_size=nbytes,
                               data_bytes=_block_size(nbytes))
            # Fires exactly when the last tensor over the segment is gone.
            view = seg.mapping.buffer(_DATA_OFFSET, nbytes, _shared_tensor_died,
                                      weakref.ref(self), seg)
            out = _tensor_over(view, dtype, 0, shape, stride, False)
            seg.data_ptr = out.untyped_storage().data_ptr()
            self._shared[seg.data_ptr] = seg
        return out

    def _create(self, kind: int, *, n_slots: int, block_size: int, data_bytes: int) -> _Segment:
        name = f"{self._prefix}{next(self._counter)}"
        path = os.path.join(SHM_DIR, name)
        size = _DATA_OFFSET + -(-data_bytes // _PAGE) * _PAGE
        fd = os.open(path, _OPEN_FLAGS | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            try:
                # Allocates (and zeroes) every page now, so the first copy
                # runs at warm speed and a full /dev/shm fails here, cleanly,
                # rather than as a SIGBUS on first touch.
                os.posix_fallocate(fd, 0, size)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.ENOMEM):
                    raise OSError(errno.ENOSPC,
                                  f"{SHM_DIR} is full: cannot allocate {size} bytes for a "
                                  f"tensor; free space there, enlarge it (docker: --shm-size) "
                                  f"or raise the shared-memory threshold") from exc
                raise
            os.pwrite(fd, _HEADER.pack(_MAGIC, kind, n_slots, block_size), 0)
            mapping = Mapping(fd, size, private=False)
        except BaseException:
            os.unlink(path)
            raise
        finally:
            os.close(fd)
        if self._tracked:
            track_segment(name)
        seg = _Segment(name, mapping, kind, n_slots, block_size)
        self._by_name[name] = seg
        self._names.add(name)
        return seg

    def _check_open(self) -> None:
        if self._closed:
            raise WorkerClosedError(f"the shared-memory pool of rank {self.rank} is closed")

    def _reap_soon(self) -> None:
        if self._dead and self._lock.acquire(blocking=False):
            try:
                self._reap_locked()
            finally:
                self._lock.release()

    def _reap_locked(self) -> int:
        pending, reaped = [], 0
        while self._dead:
            seg = self._dead.popleft()
            if seg.unlinked or self._closed:
                continue
            if seg.find(_BUSY) >= 0:
                pending.append(seg)  # a handle is still in flight
                continue
            seg.unlinked = True
            self._shared.pop(seg.data_ptr, None)
            self._by_name.pop(seg.name, None)
            self._names.discard(seg.name)
            _unlink_names([seg.name], self._tracked)
            reaped += 1
        self._dead.extend(pending)
        return reaped


def _shared_tensor_died(mapping: Mapping, pool_ref, seg: _Segment) -> None:
    pool = pool_ref()
    if pool is not None:
        pool._dead.append(seg)
        pool._reap_soon()


def _unlink_names(names, tracked: bool = False) -> None:
    for name in list(names):
        try:
            os.unlink(os.path.join(SHM_DIR, name))
        except FileNotFoundError:
            continue  # swept by the supervisor (which unregistered it), or never made
        if tracked:
            untrack_segment(name)
    if isinstance(names, set):
        names.clear()


def _free_block(mapping: Mapping, slot: int) -> None:
    # No lock and no I/O: this runs in a storage deleter, on whatever thread
    # dropped the last reference, possibly inside a mapper or pool call.
    mapping.set_byte(_SLOT_BASE + slot, _FREE)


class ShmMapper:
    """The receiving side: turns handles into tensors (and blobs into bytes). One per process.

    Thread-safe. Pooled segments are mapped once and cached (``MAP_SHARED``,
    pre-populated); shared ones get a fresh copy-on-write mapping per import.
    """

    def __init__(self) -> None:
        self._maps = SegmentMaps()
        self._closed = False

    def import_(self, handle: TensorHandle) -> torch.Tensor:
        """Return the tensor ``handle`` describes, as a zero-copy view.

        Import each handle exactly once. When the returned tensor's storage is
        garbage collected, the block goes back to the sender's pool.

        Raises:
            WorkerClosedError: this mapper is closed.
            WorkerGoneError: the segment is gone (the sender closed its pool
                or died and was swept before this handle arrived).
        """
        if self._closed:
            raise WorkerClosedError("the shared-memory mapper is closed")
        if handle.private:
            mapping = open_segment(handle.segment, private=True, ticket=handle.slot)
            view = mapping.buffer(handle.offset, handle.nbytes)
        else:
            mapping = self._maps.get(handle.segment)
            view = mapping.buffer(handle.offset, handle.nbytes, _free_block, handle.slot)
        return _tensor_over(view, handle.dtype, handle.storage_offset, handle.shape,
                            handle.stride, handle.requires_grad)

    def import_packed(self, data) -> torch.Tensor:
        """:meth:`import_` of a handle as :meth:`TensorHandle.pack` packed it."""
        return self.import_(TensorHandle.unpack(data))

    def import_bytes(self, handle: BlobHandle) -> bytes:
        """Copy out the bytes :meth:`ShmPool.export_bytes` placed; the block is freed at once.

        Import each handle exactly once. Raises as :meth:`import_`.
        """
        return self._maps.import_bytes(handle)

    def close(self) -> None:
        """Drop the cached mappings; tensors already imported stay valid."""
        self._closed = True
        self._maps.close()
