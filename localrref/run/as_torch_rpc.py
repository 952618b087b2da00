"""localrref's API under the names of ``torch.distributed.rpc``, for ``python -m localrref.run``.

What a program written for torch's RPC reaches through ``torch.distributed.rpc``
once the runner swapped this module in (``alias.py``). Names localrref does
not provide raise an ``AttributeError`` that names them and says why, rather
than a bare "module has no attribute". Submodules are torch's: those torch
loaded stay in ``sys.modules``, and the others load from torch's package.
"""

from __future__ import annotations

# Imported while the real torch.distributed.rpc is still in place.
import torch.distributed.rpc as _torch_rpc
from torch.distributed.rpc import backend_registry  # noqa: F401 - torch's, shared
# torch's C++ classes that its faulty agent (torch.distributed.rpc._testing)
# subclasses as it loads: its C++ reads them off this module.
from torch.distributed.rpc import TensorPipeAgent, _TensorPipeRpcBackendOptionsBase  # noqa: F401
from torch.distributed.rpc import BackendType

import localrref
from localrref import constants, functions
# The private names are what torch's test helpers (torch.testing._internal.
# dist_utils) and some programs reach for.
from localrref.api import (WorkerInfo, _get_current_rpc_agent,  # noqa: F401
                           _is_current_rpc_agent_set, _rref_context_get_debug_info,
                           get_debug_info, get_rpc_timeout, get_worker_info, init_rpc, remote,
                           rpc_async, rpc_sync, set_rpc_timeout, shutdown)
from localrref.options import RpcBackendOptions, TensorPipeRpcBackendOptions
from localrref.rref import RRef

from . import as_torch_rpc_api as api
from .missing import refuse as _refuse

__all__ = ["init_rpc", "rpc_sync", "rpc_async", "remote", "shutdown", "get_worker_info",
           "WorkerInfo", "RRef", "RpcBackendOptions", "TensorPipeRpcBackendOptions",
           "BackendType", "functions", "is_available", "get_rpc_timeout"]

_set_rpc_timeout = set_rpc_timeout
_get_debug_info = get_debug_info
_DEFAULT_INIT_METHOD = constants.DEFAULT_INIT_METHOD
_DEFAULT_RPC_TIMEOUT_SEC = constants.DEFAULT_RPC_TIMEOUT_SEC
_UNSET_RPC_TIMEOUT = constants.UNSET_RPC_TIMEOUT
_DEFAULT_NUM_WORKER_THREADS = constants.DEFAULT_NUM_WORKER_THREADS
share_tensor = localrref.share_tensor


def is_available() -> bool:
    return True


# A submodule of torch's package that torch did not import while it loaded
# (``torch.distributed.rpc._testing``, whose faulty backend registers itself
# in the shared ``backend_registry``) is found where torch keeps it.
__path__ = list(_torch_rpc.__path__)
del _torch_rpc


__getattr__ = _refuse(
    "torch.distributed.rpc",
    "which puts localrref in place of torch.distributed.rpc. Run it without the runner (plain "
    "torch) to use {name}")
