"""How the agent completes torch futures: internal ones, and the ones users see.

Every call has an *internal* future, completed by the thread that reads the
reply: with the value, or with a :class:`Failed` record holding the error.
A caller that blocks (``rpc_sync``, ``to_here``) waits on it through
:func:`wait`, which raises a fresh copy of the error with its type intact.

A future handed to the application (``rpc_async``, ``RRef._get_future``)
is :func:`expose`\\ d: a child of the internal one, made by ``then``. A
failure makes that child fail *in C++*, so torch's combinators see it:
``torch.futures.wait_all`` exits early, ``collect_all`` completes at once,
``then`` callbacks see the error from ``wait()`` and ``value()``. The cost
is the type: torch turns an exception raised in a ``then`` callback into a
``RuntimeError`` whose message starts "Got the following error when running
the callback: ValueError: ...". torch's own RPC futures keep the type
because its C++ stores the Python exception itself, which Python code
cannot do; ``torch.futures.Future.set_exception`` instead stores the error
as a *value* with an unwrap function, which the combinators take for
success. We choose failures torch can see over the type.

Why errors are never stored as raisable objects in a C++ future: torch
keeps a future's contents in C++, out of sight of Python's cycle collector.
Raising a stored exception attaches a traceback whose frames hold the
future and the caller's locals (RRefs, tensors): an uncollectable cycle, and
RRefs that are never deleted. So what is raised is always a copy (or, for
exposed futures, an error torch rebuilds from text).
"""

from __future__ import annotations

import copy

import torch

__all__ = ["Failed", "fail", "wait", "expose", "raise_copy"]


class Failed:
    """The outcome of an internal future whose call failed."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        # The frames of wherever it was raised are of no use to the caller
        # and would be kept alive by the future (see the module docstring).
        error.__traceback__ = None
        self.error = error


def fail(future: torch.futures.Future, error: BaseException) -> None:
    """Complete an internal future with ``error``."""
    future.set_result(Failed(error))


def raise_copy(error: BaseException):
    """Raise a fresh copy of ``error``: nothing that stores ``error`` is reached from its traceback."""
    try:
        fresh = copy.copy(error)
    except Exception:
        fresh = RuntimeError(f"{type(error).__name__}: {error}")
    fresh.__traceback__ = None
    raise fresh


def wait(future: torch.futures.Future):
    """Wait for an internal future; its value, or a copy of its error raised."""
    return _outcome(future.wait())


def _settle(future: torch.futures.Future):
    return _outcome(future.value())


def _outcome(value):
    if type(value) is Failed:
        raise_copy(value.error)
    return value


def expose(future: torch.futures.Future) -> torch.futures.Future:
    """The future the application gets for the internal ``future`` (see the module docstring)."""
    return future.then(_settle)
