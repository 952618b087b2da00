"""A supervisor (this script) whose world holds shared-memory segments when it is SIGKILLed."""
import threading

import torch

import localrref
import localrref as rpc


def big(n):
    return torch.ones(n)


def worker(rank, ready):
    rpc.init_rpc(f"worker{rank}")
    if rank == 0:
        kept = rpc.rpc_sync("worker1", big, args=(1 << 20,))  # a segment on each side
        assert kept.numel() == 1 << 20
        ready.set()
    threading.Event().wait()  # until this world's supervisor is killed


if __name__ == "__main__":
    import multiprocessing
    ready = multiprocessing.get_context("spawn").Event()
    context = localrref.spawn(worker, args=(ready,), nprocs=2, join=False)
    ready.wait(60)
    print(f"world {context.world_id} ready", flush=True)
    threading.Event().wait()  # SIGKILLed by the test
