"""torch's error texts and the private helpers programs reach for, on both backends.

Found by running torch's own RpcTest against localrref (tools/torch_suites.py):
programs match these texts (``assertRaisesRegex`` in torch's tests, ``in
str(exc)`` in programs), so localrref puts torch's words first and its own
fix after them. Each scenario runs on rank 0 of a compatibility world, or
on every rank of a fresh one (``gather_and_barrier``).
"""

from __future__ import annotations

import re
import sys
import threading
import time

import torch

import compat_backend as B
from compat_scenarios import _raises, block_on, release, reset, worker


def _only_on_rank0():
    return "defined on rank 0 only"


def error_texts():
    # An unknown destination: torch's "could not find destination".
    text = _raises(RuntimeError, B.rpc.get_worker_info, "WorkerUnknown")
    assert "could not find destination" in text, text

    # local_value() on a user: torch's words name the user and the owner.
    rref = B.rpc.remote(worker(1), torch.add, args=(torch.ones(1), torch.ones(1)))
    text = _raises(RuntimeError, rref.local_value)
    assert re.search(r"For UserRRef\(rref_id=GloballyUniqueId\(created_on=0, local_id=\d+\), "
                     r"fork_id=GloballyUniqueId\(created_on=0, local_id=\d+\)\), can't call "
                     r"localValue\(\) on user WorkerInfo\(id=0, name=worker0\)\. Call it on "
                     r"owner WorkerInfo\(id=1, name=worker1\)", text), text
    del rref

    # A function the callee's modules lack: torch names the fix.
    module = sys.modules[__name__]
    module.only_here = _only_on_rank0
    _only_on_rank0.__qualname__ = _only_on_rank0.__name__ = "only_here"
    try:
        text = _raises(RuntimeError, B.rpc.rpc_sync, worker(1), _only_on_rank0)
    finally:
        del module.only_here
        _only_on_rank0.__qualname__ = _only_on_rank0.__name__ = "_only_on_rank0"
    assert "RPC pickler does not serialize" in text and "only_here" in text, text

    # A remote() that times out: its creation future fails with the timeout
    # itself, later uses of the RRef name the creation.
    reset("slow-create")
    rref = B.rpc.remote(worker(1), block_on, args=("slow-create",), timeout=0.2)
    text = _raises(RuntimeError, rref._get_future().wait)
    assert "RPC ran for more than" in text, text
    B.rpc.rpc_sync(worker(1), release, args=("slow-create",))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            rref.to_here()
        except RuntimeError as exc:
            if "RRef creation" in str(exc):
                break
        time.sleep(0.05)
    else:
        raise AssertionError("to_here() of a timed-out remote() never named the creation")
    del rref
    return True


def agent_view():
    infos = B.rpc.api._get_current_rpc_agent().get_worker_infos()
    assert sorted((info.id, info.name) for info in infos) == [(i, worker(i)) for i in range(4)]
    assert B.rpc.api._get_current_rpc_agent().get_worker_info().name == "worker0"
    # torch's RemoteModule asks it before placing a module; no device maps here
    agent = B.rpc.api._get_current_rpc_agent()
    assert agent._get_device_map(B.rpc.get_worker_info(worker(1))) == {}
    return True


# ------------------------------------------------------ every rank of a fresh world

_AFTER: list = []
_ARRIVALS: dict = {}
_ARRIVALS_LOCK = threading.Lock()  # calls may run on several threads at once


def _arrive(round_):
    with _ARRIVALS_LOCK:
        _ARRIVALS[round_] = _ARRIVALS.get(round_, 0) + 1


def _arrivals(round_):
    return _ARRIVALS.get(round_, 0)


def gather_and_barrier(rank, world_size):
    everyone = B.rpc.api._all_gather(rank * 10)
    assert everyone == {f"worker{r}": r * 10 for r in range(world_size)}, everyone
    evens = [f"worker{r}" for r in range(world_size) if r % 2 == 0]
    odds = [f"worker{r}" for r in range(world_size) if r % 2 == 1]
    B.rpc.api._barrier(evens if rank % 2 == 0 else odds)
    again = B.rpc.api._all_gather(f"second {rank}")
    assert again == {f"worker{r}": f"second {r}" for r in range(world_size)}, again
    # _wait_all_workers returns once every worker called it: each one's
    # arrival, recorded before, is seen by all after (twice over, as torch's
    # test_wait_all_workers_twice_dense).
    for round_ in (1, 2):
        B.rpc.rpc_sync("worker0", _arrive, args=(round_,))
        B.rpc.api._wait_all_workers(**({"timeout": 30} if round_ == 2 else {}))
        assert B.rpc.rpc_sync("worker0", _arrivals, args=(round_,)) == world_size
    # An RRef kept past shutdown(): torch's "after deletion" words.
    _AFTER.append(B.rpc.remote(f"worker{(rank + 1) % world_size}", torch.add,
                               args=(torch.ones(2), 1)))
    _AFTER[-1].to_here()
    return True


def after_shutdown():
    """What each use after shutdown() says: ``{use: text}``."""
    def text_of(use):
        try:
            use()
        except RuntimeError as exc:
            return str(exc)
        return "raised nothing"

    texts = {"rpc_sync": text_of(lambda: B.rpc.rpc_sync("worker0", torch.add,
                                                        args=(torch.ones(2), 1)))}
    if not _AFTER:
        texts["to_here"] = "no RRef was kept"  # gather_and_barrier failed; its error is reported
    else:
        texts["to_here"] = text_of(_AFTER.pop().to_here)
    return texts


def debug_info_parts():
    # torch's test_debug_info: the RRef context's, the agent's and distributed
    # autograd's parts share no key and add up to _get_debug_info().
    if B.is_torch():
        from torch.distributed.rpc import _get_debug_info, _rref_context_get_debug_info
    else:
        from localrref.api import _rref_context_get_debug_info
        _get_debug_info = B.rpc.get_debug_info
    import torch.distributed.autograd as torch_autograd
    autograd = torch_autograd if B.is_torch() else __import__("localrref.autograd").autograd
    parts = [_rref_context_get_debug_info(), B.rpc.api._get_current_rpc_agent().get_debug_info(),
             autograd._get_debug_info()]
    keys = [set(part) for part in parts]
    assert not (keys[0] & keys[1]) and not (keys[0] & keys[2]) and not (keys[1] & keys[2]), keys
    assert set(_get_debug_info()) == keys[0] | keys[1] | keys[2]
    assert {"num_owner_rrefs", "num_pending_users", "num_forks"} <= keys[0]
    assert {"num_autograd_contexts", "num_current_backward_passes"} <= keys[2]
    # The agent's, with torch's TensorPipe agent's keys (16 worker threads
    # on both engines, by default or as the world asks).
    agent = parts[1]
    assert {"agent.thread_pool_size", "agent.num_idle_threads", "agent.client_active_calls",
            "agent.server_active_calls", "agent.server_active_async_calls"} <= keys[1]
    assert int(agent["agent.thread_pool_size"]) == 16
    assert 0 <= int(agent["agent.num_idle_threads"]) <= 16
    return True
