"""Micro-benchmark of the transport: shared-memory tensor lane and inbox latency.

    python tools/shm_bench.py [--reps N] [--max-mb 256]

Prints, per tensor size from 4 KiB to --max-mb:
  * warm   export+import in one process (one copy into a reused pooled block,
           then a zero-copy view): the cost of one send+receive of a tensor;
  * cold   the same into a fresh pool (the segment is created and pre-faulted);
  * share_ torch's share_memory_() on a fresh clone, for comparison (what
           torch.multiprocessing's reductions pay per tensor);
  * xproc  a round trip between two processes over an Endpoint: export,
           send the handle, import and re-export (the peer's copy), send back,
           import; so two copies and two pipe hops.
and the Endpoint round-trip latency for a 100-byte frame, next to the same
ping through SimpleQueue.put/get (pickling a bytes object) as a baseline;
then, for a --frame-kib frame (64 KiB: a blob, through shared memory), the
round-trip latency and the one-way throughput of a stream of such frames.
Timings are medians over --reps runs (wall clock, perf_counter).

Also runs against a transport from before blobs (an ``Endpoint`` without
``blob_pool``), so that before/after numbers come from one harness:
``PYTHONPATH=<old checkout> python tools/shm_bench.py --no-tensors``.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import multiprocessing as mp
import pickle
import statistics
import struct
import time

import torch

from localrref.transport.mpqueue import Endpoint, close_inboxes, make_inboxes
from localrref.transport.shm import ShmMapper, ShmPool, new_world_id, sweep_world_segments

KIB = 1024
_STREAM = struct.Struct("<ii")  # frames, bytes per frame


def _sizes(max_mb: int) -> list[int]:
    sizes, n = [], 4 * KIB
    while n <= max_mb * KIB * KIB:
        sizes.append(n)
        n *= 4
    return sizes


def _fmt(nbytes: int) -> str:
    return f"{nbytes // (KIB * KIB)} MiB" if nbytes >= KIB * KIB else f"{nbytes // KIB} KiB"


def _median_s(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _endpoint(rank: int, inboxes, pool, mapper) -> Endpoint:
    if "blob_pool" in inspect.signature(Endpoint).parameters:
        return Endpoint(rank, inboxes, blob_pool=pool, blob_mapper=mapper)
    return Endpoint(rank, inboxes)  # a transport from before blobs: big frames go inline


def _echo_peer(world_id: str, inboxes) -> None:
    """Rank 1: import each handle, export it again (a copy), send it back."""
    pool, mapper = ShmPool(world_id, 1, threshold=1), ShmMapper()
    ep = _endpoint(1, inboxes, pool, mapper)
    try:
        while True:
            src, frame = ep.recv(None)
            if frame == b"stop":
                return
            if frame[:1] == b"p":          # plain ping
                ep.send(src, frame)
                continue
            if frame[:1] == b"s":          # stream n frames of size bytes back
                n, size = _STREAM.unpack_from(frame, 1)
                payload = b"d" * size
                for _ in range(n):
                    ep.send(src, payload)
                continue
            tensor = mapper.import_(pickle.loads(frame))
            ep.send(src, pickle.dumps(pool.export(tensor)))
            del tensor
    finally:
        ep.close()
        pool.close()
        mapper.close()


def _queue_peer(inbox, outbox) -> None:
    """Baseline: echo through SimpleQueue.get/put (a second pickle per hop)."""
    while (item := inbox.get()) is not None:
        outbox.put(item)


def _ping_stats(rtts: list[float]) -> str:
    rtts = sorted(rtts)
    median, p90 = rtts[len(rtts) // 2], rtts[int(len(rtts) * 0.9)]
    return f"median {median * 1e6:.1f} us, p90 {p90 * 1e6:.1f} us, min {rtts[0] * 1e6:.1f} us"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--max-mb", type=int, default=256)
    parser.add_argument("--pings", type=int, default=2000)
    parser.add_argument("--frame-kib", type=int, default=64)
    parser.add_argument("--stream", type=int, default=2000, help="frames per throughput run")
    parser.add_argument("--no-tensors", action="store_true", help="skip the tensor table")
    args = parser.parse_args()

    world = new_world_id()
    ctx = mp.get_context("spawn")
    inboxes = make_inboxes(ctx, 2)
    peer = ctx.Process(target=_echo_peer, args=(world, inboxes))
    peer.start()
    pool, mapper = ShmPool(world, 0, threshold=1), ShmMapper()
    ep = _endpoint(0, inboxes, pool, mapper)
    try:
        print(f"torch {torch.__version__}, intra-op threads {torch.get_num_threads()}")
        if not args.no_tensors:
            print(f"{'size':>8} | {'warm ms':>8} {'GB/s':>6} | {'cold ms':>8} {'GB/s':>6} | "
                  f"{'share_ ms':>9} {'GB/s':>6} | {'xproc RT ms':>11}")
        for size in [] if args.no_tensors else _sizes(args.max_mb):
            src = torch.randint(0, 255, (size,), dtype=torch.uint8)

            def send_receive(p=pool, m=mapper):
                received = m.import_(p.export(src))
                del received

            send_receive()  # make the block, then measure reuse
            warm = _median_s(send_receive, args.reps)

            def cold():
                fresh_pool, fresh_mapper = ShmPool(world, 0, threshold=1), ShmMapper()
                t0 = time.perf_counter()
                send_receive(fresh_pool, fresh_mapper)
                dt = time.perf_counter() - t0
                fresh_pool.close()
                fresh_mapper.close()
                return dt
            cold_s = statistics.median(cold() for _ in range(min(args.reps, 3)))
            share_s = _median_s(lambda: src.clone().share_memory_(), min(args.reps, 3)) - \
                _median_s(lambda: src.clone(), min(args.reps, 3))

            def round_trip():
                ep.send(1, pickle.dumps(pool.export(src)))
                _, frame = ep.recv(None)
                back = mapper.import_(pickle.loads(frame))
                del back
            round_trip()
            xproc = _median_s(round_trip, args.reps)
            gb = lambda s: size / s / 1e9  # noqa: E731
            print(f"{_fmt(size):>8} | {warm * 1e3:8.3f} {gb(warm):6.2f} | {cold_s * 1e3:8.3f} "
                  f"{gb(cold_s):6.2f} | {share_s * 1e3:9.3f} {gb(share_s):6.2f} | "
                  f"{xproc * 1e3:11.3f}")
            del src
            gc.collect()

        ping = b"p" * 100
        # Interleaved rounds, so that both see the same scheduler placement
        # and background load (a 2-core VM swings 4x between placements).
        there, back = ctx.SimpleQueue(), ctx.SimpleQueue()
        echo = ctx.Process(target=_queue_peer, args=(there, back))
        echo.start()
        ours, baseline = [], []
        for _ in range(10):
            for _ in range(args.pings // 10):
                t0 = time.perf_counter()
                ep.send(1, ping)
                ep.recv(None)
                ours.append(time.perf_counter() - t0)
            for _ in range(args.pings // 10):
                t0 = time.perf_counter()
                there.put(ping)
                back.get()
                baseline.append(time.perf_counter() - t0)
        there.put(None)
        echo.join(30)
        print(f"Endpoint round trip, {len(ping)}-byte frame, {len(ours)} pings: "
              f"{_ping_stats(ours)}")
        print(f"SimpleQueue put/get round trip (baseline), same frame: {_ping_stats(baseline)}")
        _frame_bench(ep, args.frame_kib * KIB, args.pings, args.stream, args.reps)
    finally:
        ep.send(1, b"stop")
        peer.join(30)
        ep.close()
        pool.close()
        mapper.close()
        close_inboxes(inboxes)
        left = sweep_world_segments(world)
        if left:
            print(f"warning: swept {len(left)} leftover segments: {left}")


def _frame_bench(ep: Endpoint, size: int, pings: int, stream: int, reps: int) -> None:
    """Round trips of one ``size``-byte frame, and a one-way stream of them."""
    frame = b"p" * size
    rtts = []
    for _ in range(pings // 4):
        t0 = time.perf_counter()
        ep.send(1, frame)
        ep.recv(None)
        rtts.append(time.perf_counter() - t0)
    print(f"Endpoint round trip, {_fmt(size)} frame, {len(rtts)} pings: {_ping_stats(rtts)}")

    def run():
        ep.send(1, b"s" + _STREAM.pack(stream, size))
        for _ in range(stream):
            ep.recv(None)
    run()  # warm the pools
    seconds = _median_s(run, reps)
    print(f"Endpoint stream, {stream} x {_fmt(size)} frames one way: "
          f"{stream / seconds:,.0f} frames/s, {stream * size / seconds / 1e6:,.0f} MB/s "
          f"(median of {reps})")


if __name__ == "__main__":
    main()
