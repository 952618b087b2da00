"""torch's RPC profiling events: what a call records while the legacy profiler runs.

Under ``torch.autograd.profiler_legacy.profile()`` (the profiler torch's RPC
layer reports to), torch records one event per ``rpc_sync``, ``rpc_async``
and ``remote()`` on the caller, from the call until its future completes,
named by ``torch.distributed.rpc.internal._build_rpc_profiling_key``:
``rpc_async#my_function(worker0 -> worker1)``; a user's ``to_here()``,
``to_here#(worker0)->(worker1)``. The RRef proxies and
``_get_type`` are calls of torch's helpers, so they show up under those
(``rpc_sync#_local_invoke(...)``, ``rpc_async#_rref_typeof_on_owner(...)``).
localrref records the same events on the caller under the same names, so a
profile, and a program or test that looks for its calls in one, read the
same on either engine. What it does not record: the callee's events, which
torch's profiler copies back into the caller's profile.

Without a legacy profiler a call pays one check (0.07 us); ``record_function``
itself costs about 4 us even when nothing records.
"""

from __future__ import annotations

import torch

from .tape import builtin_name

__all__ = ["mark_node", "start", "start_fetch", "end_when_done", "end_waited"]

_LEGACY = torch._C._profiler.ActiveProfilerType.LEGACY


def mark_node(rank: int) -> None:
    """Every event this process records from now on carries ``rank`` as its
    node id, as torch's ``init_rpc`` makes it: a profile that holds several
    workers' events tells them apart by it."""
    setter = getattr(getattr(torch._C, "_distributed_rpc", None), "_set_profiler_node_id", None)
    if setter is not None:  # a torch built without distributed has none
        setter(rank)


def start(kind: str, func, agent, dst: int):
    """Open the event of ``agent``'s call (``kind``: ``"sync"``, ``"async"`` or
    ``"remote"``) of ``func`` on rank ``dst``; None when torch would record none.
    Close it with :func:`end_when_done`."""
    if not _recording():
        return None
    return _open(f"rpc_{kind}#{_name_of(func)}({agent.name} -> {_name(agent, dst)})")


def start_fetch(agent, owner: int):
    """Open the event of a user's ``to_here()`` from rank ``owner`` (torch's C++
    names it ``to_here#(caller)->(owner)``); None when torch would record none."""
    if not _recording():
        return None
    return _open(f"to_here#({agent.name})->({_name(agent, owner)})")


def end_when_done(event, future, *, waited: bool = False) -> None:
    """Close ``event`` (from :func:`start`) once ``future`` completes.

    ``waited``: the calling thread waits for ``future`` next (``Reader.wait_reply``,
    which closes it with :func:`end_waited`). A future's waiters wake before its
    callbacks run, so a callback closing it would race the caller out of the
    profiled block, and the event would be lost. Otherwise it is closed by
    torch's own callback, on whichever thread completes the future, with the
    caller's profiler state (an ``__exit__`` on that thread would record nothing).
    """
    if event is None:
        return
    if waited:
        future._localrref_event = event
        return
    event._call_end_callbacks_on_future(future)
    event.__exit__(None, None, None)  # leaves the event open, for the future to end


def end_waited(future) -> None:
    """Close the event :func:`end_when_done` left to the thread that waited for ``future``."""
    event = future.__dict__.pop("_localrref_event", None)
    if event is not None:
        event.__exit__(None, None, None)


def _recording() -> bool:
    return torch.autograd._profiler_enabled() and \
        torch._C._autograd._profiler_type() == _LEGACY


def _open(name: str):
    event = torch.autograd.profiler.record_function(name)
    event.__enter__()
    return event


def _name(agent, rank: int) -> str:
    return agent.name if rank == agent.rank else agent.peer(rank).name


def _name_of(func) -> str:
    # torch's choice (rpc/api.py, _enable_rpc_profiler): a builtin operator's
    # schema name, a ScriptFunction's qualified name, else __qualname__.
    builtin = builtin_name(func)
    if builtin is not None:
        return builtin
    if isinstance(func, torch.jit.ScriptFunction):
        return torch._jit_internal._qualified_name(func)
    return getattr(func, "__qualname__", type(func).__qualname__)
