"""One localrref program, run on either engine: ``python handover_program.py OUTFILE``.

Two workers started with ``torch.multiprocessing.spawn``, meeting through
``MASTER_ADDR``/``MASTER_PORT``. Rank 0 exercises the API and writes what it
saw to OUTFILE as JSON; ``LOCALRREF_BACKEND=torch`` runs the very same code
on ``torch.distributed.rpc``.
"""

import json
import sys
import threading

import torch
import torch.multiprocessing as mp

import localrref as rpc
import localrref.autograd as dist_autograd
from localrref.nn import RemoteModule
from localrref.optim import DistributedOptimizer


class Counter:
    def __init__(self):
        self.lock = threading.Lock()
        self.n = 0

    def add(self, k):
        with self.lock:
            self.n += k
            return self.n

    @staticmethod
    @rpc.functions.async_execution
    def add_later(rref, k):
        return rpc.rpc_async(rpc.get_worker_info(), Counter.add_here, args=(rref, k))

    @staticmethod
    def add_here(rref, k):
        return rref.local_value().add(k)


class Half(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(2))

    def forward(self, x):
        return x * self.w


def split_step():
    """One step of a model on worker1: its weight after SGD, and who the classes were."""
    module = RemoteModule("worker1/cpu", Half)
    optimizer = DistributedOptimizer(torch.optim.SGD, module.remote_parameters(), lr=0.5)
    with dist_autograd.context() as context_id:
        loss = module.forward(torch.tensor([1.0, 2.0])).sum()
        dist_autograd.backward(context_id, [loss])
        optimizer.step(context_id)
    weight = module.forward(torch.ones(2)).tolist()
    return weight, [type(module).__module__, type(optimizer).__module__]


def fail():
    raise ValueError("no such key")


def run(rank, world_size, outfile):
    rpc.init_rpc(f"worker{rank}", rank=rank, world_size=world_size)
    if rank == 0:
        counter = rpc.remote("worker1", Counter)
        shared = rpc.share_tensor(torch.arange(4.0))
        try:
            rpc.rpc_sync("worker1", fail)
            error = None
        except Exception as exc:  # noqa: BLE001 - the test compares type and message
            error = f"{type(exc).__name__}: {'no such key' in str(exc)}"
        weight, classes = split_step()
        rpc.set_rpc_timeout(7)
        info = rpc.get_debug_info()
        seen = {
            "sync": rpc.rpc_sync("worker1", torch.add, args=(torch.ones(2), 1)).tolist(),
            "async": rpc.rpc_async(1, torch.mul, args=(torch.ones(2), 3)).wait().tolist(),
            "proxy": counter.rpc_sync().add(2),
            "proxy_async": counter.rpc_async().add(3).wait(),
            "async_execution": rpc.rpc_sync("worker1", Counter.add_later, args=(counter, 4)),
            "remote": rpc.remote("worker1", torch.zeros, args=((3,),)).to_here().tolist(),
            "local": rpc.RRef(torch.ones(1)).to_here().tolist(),
            "owner": counter.owner_name(),
            "me": rpc.get_worker_info().name,
            "peer_id": rpc.get_worker_info("worker1").id,
            "timeout": rpc.get_rpc_timeout(),
            "shared": rpc.rpc_sync("worker1", torch.sum, args=(shared,)).item(),
            "error": error,
            "has_torch_counters": all(key in info for key in ("num_owner_rrefs", "num_forks")),
            "rref_type": f"{type(counter).__module__}.{type(counter).__qualname__}",
            "split_step": weight,
            "split_classes": classes,
        }
        del counter
        with open(outfile, "w") as f:
            json.dump(seen, f)
    rpc.shutdown()


if __name__ == "__main__":
    mp.spawn(run, args=(2, sys.argv[1]), nprocs=2, join=True)
