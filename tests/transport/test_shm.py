"""The shared-memory tensor lane.

Sender and receiver sit in one process where that proves the point (the
receiver maps the segment by name, a mapping distinct from the sender's, as
in another process); spawned peers check what needs two processes: release
without a message, copy-on-write across processes, and a SIGKILLed sender's
segments being swept.
"""

from __future__ import annotations

import errno
import gc
import os
import pickle
import threading

import pytest
import torch
from transport_workers import Peers, open_fds, shm_peer

from localrref.errors import WorkerClosedError, WorkerGoneError
from localrref.transport import shm
from localrref.transport.segment import SegmentMaps
from localrref.transport.shm import (DEFAULT_THRESHOLD, BlobHandle, ShmMapper, ShmPool,
                                     TensorHandle, sweep_world_segments, world_segments)


@pytest.fixture
def lane(world_id):
    pool, mapper = ShmPool(world_id, 0, threshold=1), ShmMapper()
    yield pool, mapper
    pool.close()
    mapper.close()


def send(lane, tensor):
    """Export, pickle the handle as a frame would, unpickle, import."""
    pool, mapper = lane
    return mapper.import_(pickle.loads(pickle.dumps(pool.export(tensor))))


# -- round trips ---------------------------------------------------------------

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8,
          torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool, torch.complex64,
          torch.complex128]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_round_trip_keeps_dtype_shape_and_values(lane, dtype):
    src = (torch.randn(3, 5, 7, dtype=torch.complex128) * 50).to(dtype) if dtype.is_complex \
        else (torch.randn(3, 5, 7) * 50).to(dtype)
    out = send(lane, src)
    assert out.dtype == dtype and out.shape == src.shape and torch.equal(out, src)


LAYOUTS = {
    "contiguous": (lambda: torch.randn(6, 4), True),
    "scalar": (lambda: torch.tensor(3.5), True),
    "transposed": (lambda: torch.randn(6, 4).t(), True),
    "channels_last": (lambda: torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last), True),
    "offset_view": (lambda: torch.randn(100)[37:], True),
    "strided_slice": (lambda: torch.randn(8, 9)[::2, 1::3], False),
    "expanded": (lambda: torch.randn(3, 1).expand(3, 5), False),
    "conj_view": (lambda: torch.randn(4, 3, dtype=torch.complex64).conj(), True),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_round_trip_of_views_keeps_values_and_dense_strides(lane, layout):
    make, keeps_stride = LAYOUTS[layout]
    src = make()
    out = send(lane, src)
    assert torch.equal(out, src) and out.shape == src.shape
    assert not out.is_conj()
    if keeps_stride:
        assert out.stride() == src.stride()
    else:
        assert out.is_contiguous()


def test_requires_grad_is_kept_and_result_is_a_leaf(lane):
    src = torch.randn(10, requires_grad=True)
    out = send(lane, src * 1)  # a non-leaf: its value travels, not its graph
    assert out.requires_grad and out.is_leaf and torch.equal(out, src.detach())
    assert not send(lane, torch.randn(10)).requires_grad


# -- value semantics ---------------------------------------------------------------

def test_sender_mutation_after_export_is_not_seen(lane):
    pool, mapper = lane
    src = torch.zeros(1000)
    handle = pool.export(src)
    src.fill_(7)
    assert torch.equal(mapper.import_(handle), torch.zeros(1000))


def test_receiver_mutation_is_not_seen_by_sender(lane):
    src = torch.zeros(1000)
    out = send(lane, src)
    out.fill_(7)
    assert torch.equal(src, torch.zeros(1000))


def test_shared_tensor_is_exported_without_copy(lane):
    pool, mapper = lane
    shared = pool.share(torch.arange(1000.0))
    handle = pool.export(shared[10:20])
    assert handle.private and handle.storage_offset == 10
    assert pool.stats().pooled_segments == 0  # no block was taken: nothing copied
    out = mapper.import_(handle)
    assert torch.equal(out, torch.arange(10.0, 20.0))


def test_receiver_writes_to_shared_tensor_stay_private(lane):
    pool, mapper = lane
    shared = pool.share(torch.zeros(1000))
    first = mapper.import_(pool.export(shared))
    second = mapper.import_(pool.export(shared))
    first.fill_(1)
    assert torch.equal(shared, torch.zeros(1000))
    assert torch.equal(second, torch.zeros(1000))


def test_empty_makes_a_shared_tensor(lane):
    pool, mapper = lane
    made = pool.empty((4, 8), dtype=torch.int32)
    made.copy_(torch.arange(32, dtype=torch.int32).view(4, 8))
    assert pool.export(made).private
    assert torch.equal(send(lane, made), made)


# -- lifetime of blocks and segments ---------------------------------------------------

def test_block_is_reused_when_the_receiver_drops_its_tensor(lane):
    pool, _ = lane
    src = torch.randn(25_600)  # 100 KiB
    for i in range(1000):
        src[0] = i
        out = send(lane, src)
        assert out[0] == i
        del out
    stats = pool.stats()
    assert stats.pooled_segments == 1 and stats.blocks_in_use == 0


def test_block_stays_busy_while_any_view_lives(lane):
    pool, _ = lane
    out = send(lane, torch.randn(1000))
    view = out[10:20]
    del out
    gc.collect()
    assert pool.stats().blocks_in_use == 1
    del view
    assert pool.stats().blocks_in_use == 0


def test_five_thousand_tensors_in_flight_use_no_file_descriptors(lane):
    pool, _ = lane
    fds = len(open_fds())
    held = [send(lane, torch.full((1024,), float(i))) for i in range(5000)]
    assert len(open_fds()) <= fds
    assert all(held[i][0] == i for i in range(0, 5000, 97))
    stats = pool.stats()
    assert stats.blocks_in_use == 5000 and stats.pooled_segments < 10
    del held
    assert pool.stats().blocks_in_use == 0


def test_release_unsent_returns_the_block(lane):
    pool, _ = lane
    handle = pool.export(torch.randn(100))
    assert pool.stats().blocks_in_use == 1
    pool.release_unsent(handle)
    assert pool.stats().blocks_in_use == 0


def test_shared_segment_outlives_sender_until_every_handle_is_received(lane):
    pool, mapper = lane
    shared = pool.share(torch.arange(100.0))
    handle = pool.export(shared)
    name = handle.segment
    del shared
    assert pool.reap() == 0 and name in pool.segment_names()  # the handle is in flight
    out = mapper.import_(handle)
    assert pool.reap() == 1 and name not in pool.segment_names()
    assert not os.path.exists(os.path.join(shm.SHM_DIR, name))
    assert torch.equal(out, torch.arange(100.0))  # the mapping outlives the name


def test_shared_segment_is_unlinked_when_dropped_with_nothing_in_flight(lane):
    pool, _ = lane
    shared = pool.share(torch.arange(100.0))
    name = pool.segment_names()[0]
    del shared
    assert name not in pool.segment_names()
    assert not os.path.exists(os.path.join(shm.SHM_DIR, name))


def test_close_unlinks_but_received_tensors_stay_valid(world_id):
    pool, mapper = ShmPool(world_id, 0, threshold=1), ShmMapper()
    out = mapper.import_(pool.export(torch.arange(50.0)))
    orphan = pool.export(torch.arange(50.0))
    shared = pool.share(torch.ones(50))
    pool.close()
    mapper.close()
    assert world_segments(world_id) == []
    assert torch.equal(out, torch.arange(50.0)) and torch.equal(shared, torch.ones(50))
    with pytest.raises(WorkerClosedError):
        pool.export(torch.ones(10))
    with pytest.raises(WorkerClosedError):
        mapper.import_(orphan)
    with pytest.raises(WorkerGoneError, match="rank 0.*is gone"):
        ShmMapper().import_(orphan)


def test_dropped_pool_unlinks_its_segments(world_id):
    pool = ShmPool(world_id, 0, threshold=1)
    pool.export(torch.ones(100))
    assert world_segments(world_id) != []
    del pool
    gc.collect()
    assert world_segments(world_id) == []


# -- thresholds, refusals, names -----------------------------------------------------

def test_wants_only_big_dense_cpu_tensors(world_id):
    pool = ShmPool(world_id, 0)
    assert pool.threshold == DEFAULT_THRESHOLD
    assert pool.wants(torch.empty(DEFAULT_THRESHOLD, dtype=torch.uint8))
    assert not pool.wants(torch.empty(DEFAULT_THRESHOLD - 1, dtype=torch.uint8))
    assert not pool.wants(torch.empty(0))
    assert not pool.wants(torch.eye(200).to_sparse())
    assert not pool.wants(b"x" * DEFAULT_THRESHOLD)
    with pytest.raises(ValueError, match="strided CPU"):
        pool.export(torch.eye(3).to_sparse())
    with pytest.raises(ValueError, match="empty"):
        pool.export(torch.empty(0))
    pool.close()


def test_world_ids_cannot_prefix_each_other(world_id):
    with pytest.raises(ValueError, match="letters or digits"):
        ShmPool(world_id + "_x", 0)
    other = world_id + "9"
    mine, theirs = ShmPool(world_id, 0, threshold=1), ShmPool(other, 0, threshold=1)
    mine.export(torch.ones(10))
    theirs.export(torch.ones(10))
    swept = sweep_world_segments(world_id)
    assert swept and world_segments(other) != []
    mine.close()
    theirs.close()


def test_full_dev_shm_names_the_fix(lane, monkeypatch):
    pool, _ = lane

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(shm.os, "posix_fallocate", full)
    with pytest.raises(OSError, match="is full.*--shm-size") as info:
        pool.export(torch.ones(100))
    assert info.value.errno == errno.ENOSPC


def test_handles_are_small_and_validated():
    handle = TensorHandle(segment="lrr_w_0_t_0", offset=4096, nbytes=8, slot=0, private=False,
                          dtype=torch.float32, shape=(2,), stride=(1,), storage_offset=0,
                          requires_grad=False)
    assert pickle.loads(pickle.dumps(handle)) == handle
    assert len(pickle.dumps(handle)) < 400
    with pytest.raises(ValueError, match="malformed"):
        TensorHandle(segment="s", offset=0, nbytes=8, slot=0, private=False,
                     dtype=torch.float32, shape=(2,), stride=(1,), storage_offset=0,
                     requires_grad=False)


def test_concurrent_exports_and_imports_from_threads(lane):
    errors = []

    def worker(k):
        try:
            for i in range(200):
                src = torch.full((2000 + k,), float(k * 1000 + i))
                assert torch.equal(send(lane, src), src)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and not any(t.is_alive() for t in threads)
    assert lane[0].stats().blocks_in_use == 0


# -- blobs: bytes through the same pooled blocks ------------------------------------

@pytest.mark.parametrize("data", [b"x", bytes(range(256)) * 300, bytearray(b"y" * 70_000),
                                  memoryview(b"z" * 5000), b"w" * (3 << 20)],
                         ids=["1B", "bytes", "bytearray", "memoryview", "3MiB"])
def test_blob_round_trip_frees_its_block_at_once(lane, data):
    pool, mapper = lane
    handle = pool.export_bytes(data)
    assert pool.stats().blocks_in_use == 1
    assert mapper.import_bytes(BlobHandle.unpack(handle.pack())) == bytes(data)
    assert pool.stats().blocks_in_use == 0


def test_blobs_and_tensors_share_the_pooled_blocks(lane):
    pool, mapper = lane
    tensor = mapper.import_(pool.export(torch.ones(5000, dtype=torch.uint8)))
    blob = pool.export_bytes(b"b" * 5000)  # same size class: a second block of one segment
    assert pool.stats().pooled_segments == 1 and pool.stats().blocks_in_use == 2
    assert mapper.import_bytes(blob) == b"b" * 5000
    del tensor
    gc.collect()
    assert pool.stats().blocks_in_use == 0


def test_segment_maps_read_blobs_without_a_shm_mapper(lane):
    pool, _ = lane
    maps = SegmentMaps()  # what the launcher uses: no torch needed
    assert maps.import_bytes(pool.export_bytes(b"control" * 1000)) == b"control" * 1000
    maps.close()
    with pytest.raises(WorkerClosedError, match="closed"):
        maps.import_bytes(pool.export_bytes(b"late"))


def test_unsent_blob_is_released_and_empty_blob_refused(lane):
    pool, _ = lane
    pool.release_unsent(pool.export_bytes(b"never sent" * 1000))
    assert pool.stats().blocks_in_use == 0
    with pytest.raises(ValueError, match="empty blob"):
        pool.export_bytes(b"")


def test_blob_of_a_closed_pool_names_the_sender(world_id):
    pool, mapper = ShmPool(world_id, 3, threshold=1), ShmMapper()
    handle = pool.export_bytes(b"x" * 9000)
    pool.close()
    with pytest.raises(WorkerGoneError, match="from rank 3") as info:
        mapper.import_bytes(handle)
    assert info.value.rank == 3
    mapper.close()


def test_blob_handles_are_small_and_validated():
    handle = BlobHandle(segment="lrr_abcd1234_12_a1b2c3_7", offset=4096 * 9, nbytes=3 << 20,
                        slot=8)
    assert BlobHandle.unpack(handle.pack()) == handle and len(handle.pack()) < 64
    for bad in [dict(offset=0), dict(nbytes=0), dict(slot=-1), dict(segment="../etc/passwd"),
                dict(segment="")]:
        with pytest.raises(ValueError, match="malformed BlobHandle"):
            BlobHandle(**{"segment": "s", "offset": 4096, "nbytes": 1, "slot": 0, **bad})
    with pytest.raises(ValueError, match="longer than"):
        BlobHandle.unpack(b"short")
    with pytest.raises(ValueError, match="not ASCII"):
        BlobHandle.unpack(handle.pack()[:-1] + b"\xff")


def test_a_blob_outside_its_segment_is_refused(lane):
    pool, mapper = lane
    handle = pool.export_bytes(b"x" * 5000)
    forged = BlobHandle(segment=handle.segment, offset=handle.offset, nbytes=1 << 40,
                        slot=handle.slot)
    with pytest.raises(ValueError, match="outside"):
        mapper.import_bytes(forged)
    assert mapper.import_bytes(handle) == b"x" * 5000


# -- across processes ------------------------------------------------------------

@pytest.mark.processes
@pytest.mark.timeout(120)
def test_blocks_come_back_from_another_process_without_a_message(world_id):
    peers = Peers(shm_peer, 1, world_id)
    pool, mapper = ShmPool(world_id, 1, threshold=1), ShmMapper()
    try:
        src = torch.arange(30_000, dtype=torch.float64)

        def ask(command, arg):
            return pickle.loads(peers.ask(0, pickle.dumps((command, arg))))
        for _ in range(3):
            assert ask("sum", pool.export(src)) == (src.sum().item(), (30_000,))
            assert pool.stats().blocks_in_use == 0  # the peer dropped it: free again
        assert pool.stats().pooled_segments == 1

        # The peer writes into its copy-on-write view of our shared tensor.
        shared = pool.share(torch.zeros(5000))
        assert ask("add_one", pool.export(shared)) == 5000.0
        assert torch.equal(shared, torch.zeros(5000))

        # The other way round: the peer exports, we import.
        got = mapper.import_(ask("make", 1000))
        assert torch.equal(got, torch.arange(1000, dtype=torch.float64))

        assert ask("hold", pool.export(src)) == 1
        assert pool.stats().blocks_in_use == 1
    finally:
        peers.stop()
        pool.close()
        mapper.close()
    # The peer closed its pool on the way out; our imported tensor lives on.
    assert torch.equal(got, torch.arange(1000, dtype=torch.float64))


@pytest.mark.processes
@pytest.mark.timeout(120)
def test_sigkilled_senders_segments_are_swept(world_id):
    peers = Peers(shm_peer, 1, world_id)
    mapper = ShmMapper()
    try:
        handle = pickle.loads(peers.ask(0, pickle.dumps(("make", 100_000))))
        got = mapper.import_(handle)
        peers.procs[0].kill()
        peers.procs[0].join(30)
        assert peers.procs[0].exitcode == -9
        assert handle.segment in world_segments(world_id)
        assert handle.segment in sweep_world_segments(world_id)
        assert world_segments(world_id) == []
        assert torch.equal(got, torch.arange(100_000, dtype=torch.float64))
    finally:
        peers.stop()
        mapper.close()
