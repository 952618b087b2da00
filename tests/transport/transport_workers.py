"""Peers for the transport tests: the bodies of the spawned processes (importable
by the children) and ``Peers``, which starts and stops them.

Each serves commands from its inbox until b"stop". Peers send big frames
through a blob pool, so each imports torch (about a second): tests share them.
"""

from __future__ import annotations

import gc
import itertools
import multiprocessing as mp
import os
import pickle
import struct
import threading

from localrref.transport.mpqueue import MAX_INLINE, Endpoint, close_inboxes, make_inboxes

ANSWER_TIMEOUT_S = 60.0

STORM = struct.Struct("<ii")       # threads, frames per thread
FRAME_HEAD = struct.Struct("<iiii")  # sender rank, thread, sequence number, body size
# Inline and blob frames, both sides of the boundary, up to several MiB.
STORM_SIZES = (0, 17, 700, MAX_INLINE - FRAME_HEAD.size, MAX_INLINE - FRAME_HEAD.size + 1,
               5000, 300, 70_000, 2000, 1 << 20, 64, 3 << 20)


def open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


def storm_frame(rank: int, thread: int, seq: int) -> bytes:
    """A frame whose every byte says who sent it and when: a torn, interleaved
    or truncated frame cannot pass :func:`check_storm_frame`."""
    size = STORM_SIZES[(seq + thread) % len(STORM_SIZES)]
    return FRAME_HEAD.pack(rank, thread, seq, size) + \
        bytes([(rank * 31 + thread * 7 + seq) % 251]) * size


def check_storm_frame(frame: bytes) -> tuple[int, int, int]:
    """``(rank, thread, seq)`` of an intact storm frame."""
    rank, thread, seq, _ = FRAME_HEAD.unpack_from(frame)
    assert frame == storm_frame(rank, thread, seq), \
        f"frame {seq} of thread {thread} of rank {rank} is corrupt ({len(frame)} bytes)"
    return rank, thread, seq


def send_storm(ep: Endpoint, rank: int, dst: int, threads: int, n: int) -> None:
    """``threads`` threads each send ``n`` storm frames to ``dst`` at once."""
    def one(thread):
        for seq in range(n):
            ep.send(dst, storm_frame(rank, thread, seq))
    workers = [threading.Thread(target=one, args=(t,)) for t in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()


def _blob_endpoint(rank: int, inboxes, world_id: str):
    from localrref.transport.shm import ShmMapper, ShmPool

    pool, mapper = ShmPool(world_id, rank, threshold=1), ShmMapper()
    return Endpoint(rank, inboxes, blob_pool=pool, blob_mapper=mapper), pool, mapper


def echo_peer(rank: int, inboxes, world_id: str) -> None:
    """Echoes frames; b"storm" + STORM(threads, n) answers with a storm."""
    ep, pool, mapper = _blob_endpoint(rank, inboxes, world_id)
    try:
        while True:
            src, frame = ep.recv(None)
            if frame == b"stop":
                return
            if frame.startswith(b"storm"):
                send_storm(ep, rank, src, *STORM.unpack_from(frame, 5))
            else:
                ep.send(src, frame)
    finally:
        ep.close()
        pool.close()
        mapper.close()


FLOOD_HEAD = struct.Struct("<ii")  # round, sequence number
FLOOD_SIZES = (100, 9000, MAX_INLINE - FLOOD_HEAD.size - 1, 200_000, 40)  # -1: b"F"


def flood_frame(round_: int, seq: int) -> bytes:
    size = FLOOD_SIZES[seq % len(FLOOD_SIZES)]
    return b"F" + FLOOD_HEAD.pack(round_, seq) + bytes([(round_ + seq) % 251]) * size


def check_flood_frame(frame: bytes) -> tuple[int, int]:
    round_, seq = FLOOD_HEAD.unpack_from(frame, 1)
    assert frame == flood_frame(round_, seq), f"flood frame {seq} of round {round_} is corrupt"
    return round_, seq


def flood(rank: int, inboxes, world_id: str, dst: int, round_: int) -> None:
    """Send flood frames to ``dst`` until killed (the SIGKILL tests' victim)."""
    ep, _, _ = _blob_endpoint(rank, inboxes, world_id)
    for seq in itertools.count():
        ep.send(dst, flood_frame(round_, seq))


def shm_peer(rank: int, inboxes, world_id: str) -> None:
    """Answers pickled commands about tensors; the reply is pickled too."""
    import torch

    from localrref.transport.shm import ShmMapper, ShmPool

    pool, mapper = ShmPool(world_id, rank, threshold=1), ShmMapper()
    ep = Endpoint(rank, inboxes, blob_pool=pool, blob_mapper=mapper)
    held = []
    try:
        while True:
            src, frame = ep.recv(None)
            if frame == b"stop":
                return
            command, arg = pickle.loads(frame)
            if command == "sum":          # import, report, drop
                tensor = mapper.import_(arg)
                reply = (tensor.sum().item(), tuple(tensor.shape))
                del tensor
            elif command == "add_one":    # import, mutate in place, report, drop
                tensor = mapper.import_(arg)
                tensor.add_(1)
                reply = tensor.sum().item()
                del tensor
            elif command == "hold":
                held.append(mapper.import_(arg))
                reply = len(held)
            elif command == "make":       # export arange(n) to the asker
                reply = pool.export(torch.arange(arg, dtype=torch.float64))
            else:
                raise ValueError(f"unknown command {command!r}")
            gc.collect()
            ep.send(src, pickle.dumps(reply))
    finally:
        held.clear()
        ep.close()
        pool.close()
        mapper.close()


class Peers:
    """Spawned worker processes on ranks 0..n-1; this process is rank n.

    ``blob_world``: a world id for this process's blob pool (needed to send
    frames of more than ``MAX_INLINE`` bytes).
    """

    def __init__(self, target, n: int, *extra_args, blob_world: str | None = None) -> None:
        ctx = mp.get_context("spawn")
        self.inboxes = make_inboxes(ctx, n)
        self.procs = [ctx.Process(target=target, args=(rank, self.inboxes, *extra_args),
                                  name=f"transport-peer-{rank}")
                      for rank in range(n)]
        for proc in self.procs:
            proc.start()
        self.pool = None
        if blob_world is not None:
            from localrref.transport.shm import ShmPool
            self.pool = ShmPool(blob_world, n, threshold=1)
        self.ep = Endpoint(n, self.inboxes, blob_pool=self.pool)

    def ask(self, rank: int, frame: bytes) -> bytes:
        self.ep.send(rank, frame)
        return self.answer(rank)

    def answer(self, rank: int) -> bytes:
        got = self.ep.recv(ANSWER_TIMEOUT_S)
        assert got is not None, f"rank {rank} did not answer within {ANSWER_TIMEOUT_S} s"
        src, frame = got
        assert src == rank
        return frame

    def stop(self) -> None:
        for rank, proc in enumerate(self.procs):
            if proc.is_alive():
                self.ep.send(rank, b"stop")
        for proc in self.procs:
            proc.join(ANSWER_TIMEOUT_S)
        self.ep.close()
        if self.pool is not None:
            self.pool.close()
        close_inboxes(self.inboxes)
        alive = [p.name for p in self.procs if p.is_alive()]
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
                proc.join()
        assert alive == [], f"peers did not stop: {alive}"
