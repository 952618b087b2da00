"""torch.distributed.rpc's defaults, with torch's names and values."""

DEFAULT_RPC_TIMEOUT_SEC: float = 60.0
DEFAULT_INIT_METHOD: str = "env://"
DEFAULT_SHUTDOWN_TIMEOUT: float = 0
DEFAULT_NUM_WORKER_THREADS: int = 16
UNSET_RPC_TIMEOUT: float = -1.0
# Not torch's: how long init_rpc waits for every peer, and the shared-memory
# threshold (tensors at least this big travel as shared-memory handles).
DEFAULT_INIT_TIMEOUT_SEC: float = 300.0
DEFAULT_SHM_THRESHOLD: int = 64 * 1024
# Not torch's: how long a reader polls its inbox without sleeping after a
# frame (see transport.mpqueue.Endpoint._wait_readable); 0 never spins.
DEFAULT_SPIN_US: float = 300.0
