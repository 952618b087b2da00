"""The process's current agent: the one piece of module-level mutable state."""

from __future__ import annotations

import threading

from ..errors import RPCNotInitializedError

_lock = threading.Lock()
_agent = None


def get():
    return _agent


def set(agent) -> None:  # noqa: A001 - mirrors torch's _set_and_start_rpc_agent
    global _agent
    with _lock:
        _agent = agent


def require():
    agent = _agent
    if agent is None:
        raise RPCNotInitializedError(
            "RPC has not been initialized. Call localrref.init_rpc first.")
    return agent
