"""``torch.distributed.autograd`` under ``python -m localrref.run``: localrref's own.

``context``, ``backward``, ``get_gradients``, ``DistAutogradContext`` and
the private ``_is_valid_context``, ``_get_debug_info``, ``_current_context``,
``_retrieve_context``, ``_new_context``, ``_release_context`` and
``_get_max_id`` are :mod:`localrref.autograd`. Other names (torch's
``_init``, say) fail naming themselves. ``is_available()`` says False, as
before this module had a body, so that torch's own modules that probe it
(``torch.jit`` registers torch's C++ operators when it is True) leave it
alone.
"""

from __future__ import annotations

from localrref.autograd import (  # noqa: F401
    DistAutogradContext, _current_context, _get_debug_info, _get_max_id, _is_valid_context,
    _new_context, _release_context, _retrieve_context, backward, context, get_gradients)

from .missing import refuse as _refuse

__all__ = ["context", "backward", "get_gradients", "is_available"]


def is_available() -> bool:
    return False


__getattr__ = _refuse(
    "torch.distributed.autograd",
    "whose torch.distributed.autograd is localrref's (context, backward, get_gradients and "
    "the private context calls). Run it without the runner to use torch's")
