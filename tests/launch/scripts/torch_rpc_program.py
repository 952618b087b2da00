"""A program written for torch.distributed.rpc, as torch's tutorials write them. Not changed for localrref.

Started as ``python torch_rpc_program.py OUTFILE`` it spawns two workers with
``torch.multiprocessing.spawn``, which meet through ``MASTER_ADDR``/``MASTER_PORT``;
started by a launcher (``RANK`` in the environment) it is one of the workers.
Rank 0 writes what it saw to OUTFILE as JSON.
"""

import json
import os
import sys
import threading

import torch
import torch.distributed.rpc as rpc
import torch.multiprocessing as mp
from torch.distributed.rpc import RRef


class Accumulator:
    def __init__(self):
        self.lock = threading.Lock()
        self.total = torch.zeros(3)
        self.pending = torch.futures.Future()
        self.count = 0

    @staticmethod
    @rpc.functions.async_execution
    def add(acc_rref, value, expected):
        # Torch's batching pattern: every caller gets the future of the batch.
        self = acc_rref.local_value()
        with self.lock:
            self.total += value
            self.count += 1
            fut = self.pending
            if self.count == expected:
                fut.set_result(self.total.clone())
                self.pending = torch.futures.Future()
        return fut


def square(x):
    return x * x


def run_worker(rank, world_size, outfile):
    os.environ.setdefault("MASTER_ADDR", "localhost")
    os.environ.setdefault("MASTER_PORT", "29500")
    rpc.init_rpc(f"worker{rank}", rank=rank, world_size=world_size)
    if rank == 0:
        acc = rpc.remote("worker1", Accumulator)
        futs = [rpc.rpc_async(acc.owner(), Accumulator.add, args=(acc, torch.ones(3) * i, 3))
                for i in range(1, 4)]
        batches = [f.wait().tolist() for f in futs]
        squared = rpc.rpc_sync("worker1", square, args=(torch.arange(4.0),))
        seen = {
            "batches": batches,
            "squared": squared.tolist(),
            "rpc_module": rpc.__name__,
            "rref_class": f"{type(acc).__module__}.{type(acc).__qualname__}",
            "is_rref": isinstance(acc, RRef),
            "peer": rpc.get_worker_info("worker1").name,
        }
        with open(outfile, "w") as f:
            json.dump(seen, f)
    rpc.shutdown()


if __name__ == "__main__":
    outfile = sys.argv[1]
    if "RANK" in os.environ:
        run_worker(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), outfile)
    else:
        mp.spawn(run_worker, args=(2, outfile), nprocs=2, join=True)
