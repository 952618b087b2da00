"""Peers for the transport tests: the bodies of the spawned processes (importable
by the children) and ``Peers``, which starts and stops them.

Each serves commands from its inbox until b"stop". The echo peer does not
import torch, so it starts fast.
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import pickle
import struct

from localrref.transport.mpqueue import Endpoint, close_inboxes, make_inboxes

ANSWER_TIMEOUT_S = 60.0

BURST = struct.Struct("<ii")     # n frames, bytes per frame
FRAME_HEAD = struct.Struct("<ii")  # sender rank, sequence number


def open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


def burst_frame(rank: int, seq: int, size: int) -> bytes:
    """A frame whose every byte says who sent it and when: a torn or
    interleaved frame cannot pass :func:`check_burst_frame`."""
    return FRAME_HEAD.pack(rank, seq) + bytes([(rank * 31 + seq) % 251]) * size


def check_burst_frame(frame: bytes, size: int) -> tuple[int, int]:
    rank, seq = FRAME_HEAD.unpack_from(frame)
    assert frame == burst_frame(rank, seq, size), f"frame {seq} from rank {rank} is corrupt"
    return rank, seq


def echo_peer(rank: int, inboxes) -> None:
    ep = Endpoint(rank, inboxes)
    try:
        while True:
            src, frame = ep.recv(None)
            if frame == b"stop":
                return
            if frame.startswith(b"burst"):
                n, size = BURST.unpack_from(frame, 5)
                for seq in range(n):
                    ep.send(src, burst_frame(rank, seq, size))
            else:
                ep.send(src, frame)
    finally:
        ep.close()


def shm_peer(rank: int, inboxes, world_id: str) -> None:
    """Answers pickled commands about tensors; the reply is pickled too."""
    import torch

    from localrref.transport.shm import ShmMapper, ShmPool

    ep = Endpoint(rank, inboxes)
    pool, mapper = ShmPool(world_id, rank, threshold=1), ShmMapper()
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
    """Spawned worker processes on ranks 0..n-1; this process is rank n."""

    def __init__(self, target, n: int, *extra_args) -> None:
        ctx = mp.get_context("spawn")
        self.inboxes = make_inboxes(ctx, n)
        self.procs = [ctx.Process(target=target, args=(rank, self.inboxes, *extra_args),
                                  name=f"transport-peer-{rank}")
                      for rank in range(n)]
        for proc in self.procs:
            proc.start()
        self.ep = Endpoint(n, self.inboxes)

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
        close_inboxes(self.inboxes)
        alive = [p.name for p in self.procs if p.is_alive()]
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
                proc.join()
        assert alive == [], f"peers did not stop: {alive}"
