"""One distributed-autograd program on either backend: ``python dist_autograd_program.py BACKEND OUT``.

Three workers. Worker 0 owns ``w0``; worker 1 computes with its own ``w1``
and calls worker 2 (nested) with ``w2``; the loss is on worker 0. Every
worker writes its gradients from ``get_gradients`` (and whether ``.grad``
stayed empty) to OUT as JSON.
"""

import json
import os
import sys

import torch
import torch.multiprocessing as mp

BACKEND = sys.argv[1]
if BACKEND == "torch":
    import torch.distributed.autograd as dist_autograd
    import torch.distributed.rpc as rpc
else:
    import localrref as rpc
    import localrref.autograd as dist_autograd

WEIGHTS = {}


def weight(rank):
    if rank not in WEIGHTS:
        WEIGHTS[rank] = torch.arange(1.0, 4.0).mul(rank + 1).requires_grad_()
    return WEIGHTS[rank]


def stage2(x):
    return torch.tanh(x * weight(2))


def stage1(x):
    h = x * weight(1)
    return rpc.rpc_sync("worker2", stage2, args=(h,)) + h


def record(context_id, outfile_rank, outfile):
    grads = dist_autograd.get_gradients(context_id)
    mine = weight(int(os.environ.get("LRR_RANK", "0")))
    with open(f"{outfile}.{outfile_rank}", "w") as f:
        json.dump({"grad": grads[mine].tolist() if mine in grads else None,
                   "dot_grad_empty": mine.grad is None, "entries": len(grads)}, f)


def record_remote(context_id, rank, outfile):
    os.environ["LRR_RANK"] = str(rank)
    record(context_id, rank, outfile)


def run(rank, outfile):
    os.environ["LRR_RANK"] = str(rank)
    rpc.init_rpc(f"worker{rank}", rank=rank, world_size=3)
    if rank == 0:
        x = torch.tensor([0.5, -1.0, 2.0])
        with dist_autograd.context() as context_id:
            y = rpc.rpc_sync("worker1", stage1, args=(x * weight(0),))
            fut = rpc.rpc_async("worker1", stage1, args=(y,))
            loss = (fut.wait() * weight(0)).sum()
            dist_autograd.backward(context_id, [loss])
            record(context_id, 0, outfile)
            for peer in (1, 2):
                rpc.rpc_sync(f"worker{peer}", record_remote, args=(context_id, peer, outfile))
    rpc.shutdown()


if __name__ == "__main__":
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    mp.spawn(run, args=(sys.argv[2],), nprocs=3, join=True)
