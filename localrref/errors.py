"""The exception hierarchy of localrref.

Rules (see STYLE.md, rule 4):

* Every class derives from ``RuntimeError`` through :class:`LocalRRefError`, so
  code written for ``torch.distributed.rpc`` (which raises ``RuntimeError`` for
  nearly everything) keeps working with ``except RuntimeError``.
* The class says *who* is at fault: :class:`WorkerClosedError` means your own
  code shut the agent down (trio's "Closed"); :class:`WorkerGoneError` means a
  peer died under you (trio's "Broken", loky's ``TerminatedWorkerError``);
  :class:`RRefInternalError` means localrref itself broke an invariant, which
  is always a bug to report.
* Every class pickles (it may cross a process boundary inside a reply), so any
  class whose ``__init__`` differs from ``(msg,)`` defines ``__reduce__``.

This module is a leaf: it imports nothing of ours, so the pure protocol core
may use it.
"""

from __future__ import annotations

__all__ = [
    "LocalRRefError",
    "RRefInternalError",
    "ProtocolError",
    "RRefLeakError",
    "RPCTimeoutError",
    "RRefCreationError",
    "WorkerClosedError",
    "WorkerGoneError",
    "RPCNotInitializedError",
    "UnknownWorkerError",
    "AsyncExecutionError",
]


class LocalRRefError(RuntimeError):
    """Root of every error localrref raises on its own account."""


class RRefInternalError(LocalRRefError):
    """An internal invariant of the Remote Reference Protocol does not hold.

    The port of the seed's ``TORCH_INTERNAL_ASSERT``: the message names the
    ids involved. Seeing one is a bug in localrref (or a message forged by
    hand), never a misuse of the public API.
    """


class ProtocolError(LocalRRefError):
    """A message cannot be handled in the state the receiver is in."""


class RRefLeakError(LocalRRefError):
    """``checkRRefLeaks`` found forks still registered and leaks are not ignored."""


class RPCTimeoutError(LocalRRefError):
    """A call ran past its deadline.

    The message keeps torch's wording ("RPC ran for more than set timeout")
    so that code matching on it keeps working.
    """


class RRefCreationError(LocalRRefError):
    """The ``remote()`` that created this RRef failed or timed out.

    Raised by every later use of such an RRef (``to_here``, forking it to
    another worker, the proxies), as soon as the failure is known.
    """


class WorkerClosedError(LocalRRefError):
    """The local RPC agent was shut down by this process's own code."""


class WorkerGoneError(LocalRRefError):
    """A peer worker died; calls that depended on it cannot complete.

    Carries the dead worker's name, rank, pid and exit code (negative for a
    signal, as ``multiprocessing`` reports it).
    """

    def __init__(self, msg: str, *, name: str | None = None, rank: int | None = None,
                 pid: int | None = None, exitcode: int | None = None) -> None:
        super().__init__(msg)
        self.name = name
        self.rank = rank
        self.pid = pid
        self.exitcode = exitcode

    def __reduce__(self):
        return _rebuild_worker_gone, (self.args[0], self.name, self.rank, self.pid, self.exitcode)


def _rebuild_worker_gone(msg, name, rank, pid, exitcode):
    return WorkerGoneError(msg, name=name, rank=rank, pid=pid, exitcode=exitcode)


class RPCNotInitializedError(LocalRRefError):
    """An RPC API was used before ``init_rpc`` or after ``shutdown``."""


# torch's words first, as programs match them; then localrref's fix. torch
# has two: its Python API's guard (rpc_sync, rpc_async, remote,
# get_worker_info, shutdown, _all_gather) and its C++ agent lookup (RRef(),
# get_rpc_timeout, and everything else).
NOT_INITIALIZED_MESSAGE = (
    "RPC has not been initialized. Call torch.distributed.rpc.init_rpc first. It was "
    "not initialized, or was shut down, in this process: call localrref.init_rpc first.")
AGENT_NOT_SET_MESSAGE = (
    "Current RPC agent is not set! Did you initialize the RPC framework (e.g. by calling "
    "`rpc.init_rpc`)? RPC has not been initialized, or was shut down: call "
    "localrref.init_rpc first.")


class UnknownWorkerError(LocalRRefError, ValueError):
    """A destination (name, rank or ``WorkerInfo``) names no worker of this world.

    A ``RuntimeError``, as torch raises, and a ``ValueError``, as localrref
    raised before it matched torch.
    """


class AsyncExecutionError(LocalRRefError, TypeError):
    """A function decorated with ``@rpc.functions.async_execution`` returned no future.

    A ``RuntimeError`` with torch's wording, and a ``TypeError``, which it is.
    """
