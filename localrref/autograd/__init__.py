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
from ..agent.tape import AUTOGRAD_DEBUG_KEYS
from ..core.dist_autograd import max_id

__all__ = ["context", "backward", "get_gradients", "is_available", "DistAutogradContext"]

# torch's words (DistAutogradContainer::currentContext)
NO_CURRENT_CONTEXT = (
    "Current thread doesn't have a valid autograd context. Please wrap your code using: "
    "`with torch.distributed.autograd.context() as context_id` to generate a valid context")


def is_available() -> bool:
    return True


def _torch_autograd():
    """torch's ``torch.distributed.autograd`` if this world was handed over to torch, else None."""
    if current.get() is None and handover.active() is not None:
        return handover.torch_original("torch.distributed.autograd")
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
    """torch's two counters of this worker's distributed autograd (live contexts, backward
    passes running); ``localrref.get_debug_info()`` counts the send and recv functions too."""
    torch_autograd = _torch_autograd()
    if torch_autograd is not None:
        return torch_autograd._get_debug_info()
    counts = _tape().debug_info()
    return {key: counts[key] for key in AUTOGRAD_DEBUG_KEYS}


# -- torch's private context API ------------------------------------------------
# Programs and torch's own tests reach into contexts through these: to check
# that a context was cleaned up on every worker (_retrieve_context raising),
# which workers it reached, or to manage one without a ``with`` block.


class DistAutogradContext:
    """A handle on one of this worker's contexts (torch's ``DistAutogradContext``)."""

    __slots__ = ("_id",)

    def __init__(self, context_id: int) -> None:
        self._id = context_id

    def _context_id(self) -> int:
        return self._id

    def _known_worker_ids(self) -> set[int]:
        """The workers this context went to or came from on this worker."""
        return set(_tape().known_workers(self._id))

    def _send_functions(self) -> dict:
        """Message id -> a node per send of tensors that require grad, whose
        ``next_functions`` are those tensors' edges, as torch's
        ``SendRpcBackward`` (and named so)."""
        return _tape().send_functions(self._id)

    def _recv_functions(self) -> dict:
        """Message id -> the ``RecvRpcBackward`` node of each message that brought
        tensors requiring grad: those tensors are its outputs, as on torch."""
        return _tape().recv_functions(self._id)

    def __repr__(self) -> str:
        return f"DistAutogradContext(context_id={self._id})"


def _retrieve_context(context_id: int):
    """This worker's part of ``context_id``; torch's error if it has none (released, or never
    reached this worker)."""
    torch_autograd = _torch_autograd()
    if torch_autograd is not None:
        return torch_autograd._retrieve_context(context_id)
    _tape().check_context(context_id)
    return DistAutogradContext(context_id)


def _current_context():
    """The context of this thread's ``with context()`` block (or of the call it serves)."""
    torch_autograd = _torch_autograd()
    if torch_autograd is not None:
        return torch_autograd._current_context()
    tape = _tape()
    context_id = tape.current()
    if context_id is None:
        raise RuntimeError(NO_CURRENT_CONTEXT)
    tape.check_context(context_id)
    return DistAutogradContext(context_id)


def _new_context():
    """A new context, current on this thread until ``_release_context`` (``context()``'s halves)."""
    torch_autograd = _torch_autograd()
    if torch_autograd is not None:
        return torch_autograd._new_context()
    return DistAutogradContext(_tape().new_context())


def _release_context(context_id: int) -> None:
    """Release ``context_id`` here and on every worker it reached; torch's error if it is
    not a context of this worker."""
    torch_autograd = _torch_autograd()
    if torch_autograd is not None:
        torch_autograd._release_context(context_id)
        return
    tape = _tape()
    tape.check_context(context_id)
    tape.release(context_id)


def _get_max_id() -> int:
    """The largest context id this worker can make (torch's layout: worker id in the high 16 bits)."""
    torch_autograd = _torch_autograd()
    if torch_autograd is not None:
        return torch_autograd._get_max_id()
    return max_id(current.require().rank)
