"""``torch.distributed.autograd`` for localrref: ``context``, ``backward``, ``get_gradients``.

Inside ``with localrref.autograd.context() as context_id:``, every
``rpc_sync``/``rpc_async`` whose arguments or result hold tensors that
require grad is recorded (a send on one side, a recv on the other), and the
callee runs inside the same context. ``backward(context_id, roots)`` runs
torch's FAST mode across every worker the pass reaches and returns when all
of them have finished; gradients accumulate in the context, never in
``.grad``: ``get_gradients(context_id)`` returns this worker's. See
``localrref/core/dist_autograd.py`` (the protocol) and
``localrref/agent/tape.py`` (the shell).
"""

from __future__ import annotations

from ..agent import current

__all__ = ["context", "backward", "get_gradients", "is_available"]


def is_available() -> bool:
    return True


def _tape():
    return current.require().autograd_tape()


class context:
    """A distributed autograd context: ``with context() as context_id:`` (torch's API)."""

    def __enter__(self) -> int:
        self._tape = _tape()
        self._context_id = self._tape.new_context()
        return self._context_id

    def __exit__(self, *exc) -> None:
        self._tape.release(self._context_id)


def backward(context_id: int, roots, retain_graph: bool = False) -> None:
    """Run the distributed backward pass from ``roots`` in ``context_id`` (FAST mode)."""
    _tape().backward(context_id, roots, retain_graph)


def get_gradients(context_id: int) -> dict:
    """This worker's gradients in ``context_id``: ``{tensor: gradient}``."""
    return _tape().get_gradients(context_id)
