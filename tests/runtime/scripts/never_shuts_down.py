"""Rank 1 never reaches shutdown(); rank 0's shutdown must fail naming it."""
import os
import threading

import localrref as rpc

rank = int(os.environ["RANK"])
rpc.init_rpc(f"worker{rank}")
if rank == 1:
    threading.Event().wait(120)  # stopped by the launcher once rank 0 fails
rpc.shutdown()
