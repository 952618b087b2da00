"""Ctrl-C while rank 0 waits inside torch.futures.wait_all, where no signal reaches Python.

Rank 1 serves that call either by calling rank 0 back in a loop ("calling")
or by blocking forever without replying ("blocked").
"""
import os
import sys
import threading

import torch

import localrref as rpc


def ping():
    return 1


def keep_calling():
    while True:  # until this worker is stopped
        rpc.rpc_sync("worker0", ping)


def block():
    threading.Event().wait()


rank = int(os.environ["RANK"])
rpc.init_rpc(f"worker{rank}", rpc_backend_options=rpc.RpcBackendOptions(rpc_timeout=0))
if rank == 0:
    call = rpc.rpc_async("worker1", keep_calling if sys.argv[1] == "calling" else block)
    print("waiting", flush=True)
    torch.futures.wait_all([call])  # torch's C++ wait: SIGINT is only noted, not raised
rpc.shutdown()
