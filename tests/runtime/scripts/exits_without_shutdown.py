"""Rank 0 leaves without shutdown(): its agent's threads must stop before finalization."""
import atexit
import os
import sys
import threading


@atexit.register  # before localrref registers its hook, so this one runs after it
def report():
    left = sorted(t.name for t in threading.enumerate() if t.name.startswith("localrref"))
    print(f"rank 0 agent threads at exit: {left}", flush=True)


import torch  # noqa: E402

import localrref as rpc  # noqa: E402

rank = int(os.environ["RANK"])
rpc.init_rpc(f"worker{rank}")
if rank == 0:
    assert rpc.rpc_sync("worker1", torch.add, args=(torch.ones(2), 1)).tolist() == [2.0, 2.0]
    running = sorted(t.name for t in threading.enumerate() if t.name.startswith("localrref"))
    print(f"rank 0 agent threads before exit: {running}", flush=True)
    sys.exit(3)
rpc.shutdown()  # fails once rank 0 is gone
