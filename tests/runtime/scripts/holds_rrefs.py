"""Rank 0 still holds an RRef to a tensor on rank 1 when it calls shutdown()."""
import os

import torch

import localrref as rpc

KEEP = []
rank = int(os.environ["RANK"])
rpc.init_rpc(f"worker{rank}")
if rank == 0:
    KEEP.append(rpc.remote("worker1", torch.zeros, args=(256,)))
    KEEP[0].to_here()
rpc.shutdown()
