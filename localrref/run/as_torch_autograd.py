"""``torch.distributed.autograd`` under ``python -m localrref.run``, until localrref has its own.

torch's distributed autograd records send and receive functions inside
torch's own RPC agent; calls made through localrref never reach it, so
torch's ``backward`` would silently compute only this worker's part of the
gradients. Every name therefore fails loudly, naming itself, except
``is_available()``, which says False so torch's own modules that probe it
(``torch.jit``) carry on.
"""

from __future__ import annotations


def is_available() -> bool:
    return False


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    raise AttributeError(
        f"torch.distributed.autograd.{name} is not provided by localrref yet: this program runs "
        f"under `python -m localrref.run`, whose RPCs torch's distributed autograd cannot see. "
        f"Run it without the runner (plain torch.distributed.rpc) to train with distributed autograd")
