"""Rank 1 is SIGKILLed while serving rank 0's rpc_sync; rank 0 reports what it saw."""
import os
import signal
import sys

import localrref as rpc
from localrref.errors import WorkerGoneError


def die():
    os.kill(os.getpid(), signal.SIGKILL)


rank = int(os.environ["RANK"])
rpc.init_rpc(f"worker{rank}", rpc_backend_options=rpc.RpcBackendOptions(rpc_timeout=0))
if rank == 0:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # live long enough to report
    try:
        rpc.rpc_sync("worker1", die)
    except WorkerGoneError as exc:
        print(f"caller saw: {type(exc).__name__}: {exc}", flush=True)
    sys.exit(3)
rpc.shutdown()
