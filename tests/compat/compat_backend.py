"""Which RPC library a compatibility test runs against, in every worker.

The same test bodies run on ``localrref`` and on ``torch.distributed.rpc``
(TensorPipe on loopback). Each worker calls :func:`install` before
``init_rpc``; scenario code and the functions it sends to other workers
reach the library as ``compat_backend.rpc`` and ask ``compat_backend.NAME``
only where the two differ on purpose (each such place says why).
"""

from __future__ import annotations

import socket

BACKENDS = ("localrref", "torch")

rpc = None
autograd = None  # the backend's distributed autograd
NAME: str | None = None


def install(name: str) -> None:
    global rpc, autograd, NAME
    if name == "localrref":
        import localrref as module
        import localrref.autograd as autograd_module
    elif name == "torch":
        import torch.distributed.autograd as autograd_module
        import torch.distributed.rpc as module
    else:
        raise ValueError(f"unknown backend {name!r}; use one of {BACKENDS}")
    rpc, autograd, NAME = module, autograd_module, name


def is_torch() -> bool:
    return NAME == "torch"


def backend_options(name: str, port: int, rpc_timeout: float = 60.0):
    """Options for ``init_rpc``: TensorPipe meets on 127.0.0.1:``port``."""
    if name == "torch":
        import torch.distributed.rpc as torch_rpc
        return torch_rpc.TensorPipeRpcBackendOptions(
            init_method=f"tcp://127.0.0.1:{port}", rpc_timeout=rpc_timeout,
            num_worker_threads=16)
    import localrref
    return localrref.RpcBackendOptions(rpc_timeout=rpc_timeout)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
