"""localrref: PyTorch's RPC and Remote Reference Protocol on one machine.

``import localrref as rpc`` gives the ``torch.distributed.rpc`` API for
workers started by :func:`localrref.spawn` or ``python -m localrref.launch``.

The names below load on first use (PEP 562), so ``python -m
localrref.launch`` and other torch-free parts start without importing torch.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "init_rpc": "api", "rpc_sync": "api", "rpc_async": "api", "remote": "api",
    "shutdown": "api", "get_worker_info": "api", "WorkerInfo": "api",
    "get_debug_info": "api", "get_rpc_timeout": "api", "set_rpc_timeout": "api",
    "share_tensor": "api", "BackendType": "api", "is_available": "api",
    "RRef": "rref", "spawn": "launch.supervisor",
    "RpcBackendOptions": "options", "TensorPipeRpcBackendOptions": "options",
    "FaultyRpcBackendOptions": "options",
    "DEFAULT_RPC_TIMEOUT_SEC": "constants", "UNSET_RPC_TIMEOUT": "constants",
}
_SUBMODULES = {"functions", "api", "testing", "launch", "examples", "errors", "world", "autograd",
               "optim", "nn"}

__all__ = sorted([*_EXPORTS, "functions"])


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    elif name == "_set_rpc_timeout":
        # torch.distributed.rpc spells it with a leading underscore.
        value = __getattr__("set_rpc_timeout")
    elif name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module 'localrref' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS) | _SUBMODULES)
