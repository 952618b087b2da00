"""The process's current agent (the one piece of module-level mutable state),
and what the agent's own threads note or set up about themselves.

A worker has one agent at a time. A test world that runs several agents in
one process (``Agent(driver=...)``) binds a thread to the agent whose work
it is doing (:func:`using`), so that user code calling the public API from
inside a job reaches that agent.
"""

from __future__ import annotations

import contextlib
import threading

import torch

from ..errors import AGENT_NOT_SET_MESSAGE, RPCNotInitializedError

_lock = threading.Lock()
_agent = None
_bound = threading.local()


def get():
    return getattr(_bound, "agent", None) or _agent


@contextlib.contextmanager
def using(agent):
    """Make ``agent`` this thread's current agent for the block (test worlds)."""
    previous = getattr(_bound, "agent", None)
    _bound.agent = agent
    try:
        yield agent
    finally:
        _bound.agent = previous


def set(agent) -> None:  # noqa: A001 - mirrors torch's _set_and_start_rpc_agent
    global _agent
    with _lock:
        _agent = agent


def require(message: str = AGENT_NOT_SET_MESSAGE):
    """This thread's agent; ``message`` is the error when there is none (torch's words)."""
    agent = getattr(_bound, "agent", None) or _agent
    if agent is None:
        raise RPCNotInitializedError(message)
    return agent


def mark_serving() -> None:
    """This thread serves the agent (an IO thread, the housekeeper, a pool
    thread): it must never wait for room in a peer's pipe, since that peer's
    progress may depend on it (``transport/outbox.py``)."""
    _bound.serving = True


def serving() -> bool:
    return getattr(_bound, "serving", False)


def runs_user_code() -> None:
    """This thread will run user functions (an IO or pool thread): give it
    the process's torch thread settings.

    OpenMP keeps the thread count per thread. ``torch.set_num_threads(n)``
    sets the calling thread's, and records ``n`` for ATen's own parallel
    loops to apply in other threads lazily; BLAS and oneDNN kernels open
    OpenMP regions of their own, which in a thread that never ran such a
    loop get a team of one thread per core. On a machine shared by several
    workers that team's idle members spin after every kernel (a trainer's
    job thread here had one burning a core). torch's first call in a thread
    applies the recorded setting; a program that never set one keeps
    OpenMP's defaults, as its main thread does.
    """
    torch.get_num_threads()
