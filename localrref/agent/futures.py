"""How the agent completes torch futures: internal ones, and the ones users see.

Every call has an *internal* future, completed by the thread that reads the
reply: with the value, or with a :class:`Failed` record holding the error.
A caller that blocks (``rpc_sync``, ``to_here``) waits on it through
:func:`wait`, which raises a fresh copy of the error with its type intact.

A future handed to the application (``rpc_async``, ``RRef._get_future``)
is :func:`expose`\\ d: a child of the internal one, made by ``then``, and it
fails the way torch's RPC futures fail:

* An exception raised by the user's function (a :class:`Failed` record
  marked ``user``) completes the child *successfully* in C++, with the
  record as its value, and the child's unwrap function raises a fresh copy
  of the exception, type intact, from ``wait()`` and ``value()`` (as in
  torch, whose RPC futures unwrap a ``RemoteException`` the same way; it is
  also what ``torch.futures.Future.set_exception`` does). So
  ``fut.wait()``, ``torch.futures.wait_all`` and a ``then`` callback that
  calls ``fut.wait()`` raise the ``ValueError`` the function raised. What
  differs from torch: its future is also failed in C++ (its C++ holds the
  Python exception, which Python code cannot store there), so its
  ``collect_all`` and ``wait_all`` give up at the first failure, where
  localrref's wait for every future first.
* Anything else fails the child in C++: the ``then`` callback raises, and
  torch turns that into a ``RuntimeError`` whose message carries the
  error's text ("Got the following error when running the callback:
  RPCTimeoutError: RPC ran for more than set timeout ..."). That is a
  timeout, a dead peer or a closed agent, where torch raises a
  ``RuntimeError`` too, and a remote ``RuntimeError`` itself (a builtin's
  "size of tensor" error, say): its type survives the C++ failure, so it
  keeps the early exit as well.

Why the child is completed only through the internal future, never by
``set_result`` on it directly (which would save a completion and a Python
callback per call): the callback ``then`` leaves on the internal future
holds that future's own wrapper until it runs, so an internal future never
completed keeps itself, the child and the child's value alive for good (an
RRef that ``rpc_async`` returned would outlive the program's last reference
to it and be reported leaked at shutdown).

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
# torch's own: while a rpc.api._wait_all() block is open in a thread, its
# future_list collects the futures that rpc_async returns there.
from torch.distributed.rpc.api import _thread_local_var

__all__ = ["Failed", "fail", "wait", "expose", "raise_copy", "collected"]


class Failed:
    """The outcome of an internal future whose call failed.

    ``user``: the user's function raised ``error`` (remotely, or, for a
    proxy, its lookup on the value's type), as opposed to the RPC layer
    (see the module docstring).
    """

    __slots__ = ("error", "user")

    def __init__(self, error: BaseException, user: bool = False) -> None:
        # The frames of wherever it was raised are of no use to the caller
        # and would be kept alive by the future (see the module docstring).
        error.__traceback__ = None
        self.error = error
        self.user = user


def fail(future: torch.futures.Future, error: BaseException, *, user: bool = False) -> None:
    """Complete an internal future with ``error`` (``user``: see :class:`Failed`)."""
    future.set_result(Failed(error, user))


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
    value = future.value()
    if type(value) is Failed and (not value.user or type(value.error) is RuntimeError):
        raise_copy(value.error)
    return value


def _unwrap(value) -> None:
    if type(value) is Failed:
        raise_copy(value.error)


def _outcome(value):
    if type(value) is Failed:
        raise_copy(value.error)
    return value


def expose(future: torch.futures.Future) -> torch.futures.Future:
    """The future the application gets for the internal ``future`` (see the module docstring)."""
    child = future.then(_settle)
    child._set_unwrap_func(_unwrap)
    return child


def collected(future: torch.futures.Future) -> torch.futures.Future:
    """``future``, an ``rpc_async``'s, also in the list of a ``_wait_all()`` block open
    in this thread (as torch's ``rpc_async`` puts its own), so that the block waits for it."""
    future_list = getattr(_thread_local_var, "future_list", None)
    if future_list is not None:
        future_list.append(future)
    return future
