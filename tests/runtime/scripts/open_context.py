"""Rank 0 calls shutdown() inside a distributed autograd context that reached rank 1."""
import os

import torch

import localrref as rpc
import localrref.autograd as dist_autograd

rank = int(os.environ["RANK"])
rpc.init_rpc(f"worker{rank}")
if rank == 0:
    context = dist_autograd.context()
    context_id = context.__enter__()  # never exited
    rpc.rpc_sync("worker1", torch.mul, args=(torch.ones(2, requires_grad=True), 2))
    print(f"open context {context_id}", flush=True)
rpc.shutdown()
