"""``torch.distributed.autograd`` for localrref: ``context``, ``backward``, ``get_gradients``.

Inside ``with localrref.autograd.context() as context_id:``, every
``rpc_sync``/``rpc_async``/``remote`` whose arguments or result hold tensors
that require grad is recorded (a send on one side, a recv on the other), as
is every ``to_here()`` whose value holds such tensors, and the callee runs
inside the same context. ``backward(context_id, roots)`` runs torch's FAST
mode across every worker the pass reaches and returns when all of them have
finished; gradients accumulate in the context, never in ``.grad``:
``get_gradients(context_id)`` returns this worker's. See
``localrref/core/dist_autograd.py`` (the protocol) and
``localrref/agent/tape.py`` (the shell).

A world handed over to ``torch.distributed.rpc`` (see ``localrref.handover``)
uses ``torch.distributed.autograd`` through these same names.
"""

from __future__ import annotations

from .. import handover
from ..agent import current

__all__ = ["context", "backward", "get_gradients", "is_available"]


def is_available() -> bool:
    return True


def _torch_autograd():
    """torch's ``torch.distributed.autograd`` if this world was handed over to torch, else None."""
    if current.get() is None and handover.active() is not None:
        import torch.distributed.autograd as torch_autograd
        return torch_autograd
    return None


def _tape():
    return current.require().autograd_tape()


class context:
    """A distributed autograd context: ``with context() as context_id:`` (torch's API)."""

    def __enter__(self) -> int:
        torch_autograd = _torch_autograd()
        if torch_autograd is not None:
            self._torch = torch_autograd.context()
            return self._torch.__enter__()
        self._torch = None
        self._tape = _tape()
        self._context_id = self._tape.new_context()
        return self._context_id

    def __exit__(self, *exc) -> None:
        if self._torch is not None:
            self._torch.__exit__(*exc)
            return
        self._tape.release(self._context_id)


def backward(context_id: int, roots, retain_graph: bool = False) -> None:
    """Run the distributed backward pass from ``roots`` in ``context_id`` (FAST mode).

    Without ``retain_graph``, a second backward through the same nodes fails
    as torch's does.
    """
    torch_autograd = _torch_autograd()
    if torch_autograd is not None:
        torch_autograd.backward(context_id, roots, retain_graph)
        return
    _tape().backward(context_id, roots, retain_graph)


def get_gradients(context_id: int) -> dict:
    """This worker's gradients in ``context_id``: ``{tensor: gradient}``."""
    torch_autograd = _torch_autograd()
    if torch_autograd is not None:
        return torch_autograd.get_gradients(context_id)
    return _tape().get_gradients(context_id)


def _is_valid_context(context_id: int) -> None:
    """Raise torch's error if ``context_id`` is not a context this worker knows."""
    torch_autograd = _torch_autograd()
    if torch_autograd is not None:
        torch_autograd._is_valid_context(context_id)
        return
    _tape().check_context(context_id)


def _get_debug_info() -> dict[str, int]:
    """torch's two counters of this worker's distributed autograd, and its send and recv
    functions (the autograd part of ``localrref.get_debug_info()``)."""
    torch_autograd = _torch_autograd()
    if torch_autograd is not None:
        return torch_autograd._get_debug_info()
    return dict(_tape().debug_info())
