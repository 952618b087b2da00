"""The process's current agent: the one piece of module-level mutable state.

A worker has one agent at a time. A test world that runs several agents in
one process (``Agent(driver=...)``) binds a thread to the agent whose work
it is doing (:func:`using`), so that user code calling the public API from
inside a job reaches that agent.
"""

from __future__ import annotations

import contextlib
import threading

from ..errors import RPCNotInitializedError

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


def require():
    agent = getattr(_bound, "agent", None) or _agent
    if agent is None:
        raise RPCNotInitializedError(
            "RPC has not been initialized. Call localrref.init_rpc first.")
    return agent


def mark_serving() -> None:
    """This thread serves the agent (an IO thread, the housekeeper, a pool
    thread): it must never wait for room in a peer's pipe, since that peer's
    progress may depend on it (``transport/outbox.py``)."""
    _bound.serving = True


def serving() -> bool:
    return getattr(_bound, "serving", False)
