"""torch's RPC profiling events: what a call records while the legacy profiler runs.

Under ``torch.autograd.profiler_legacy.profile()`` (the profiler torch's RPC
layer reports to), torch records one event per ``rpc_sync``, ``rpc_async``
and ``remote()`` on the caller, from the call until its future completes,
named by ``torch.distributed.rpc.internal._build_rpc_profiling_key``:
``rpc_async#my_function(worker0 -> worker1)``. The RRef proxies and
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

__all__ = ["start", "end_when_done"]

_LEGACY = torch._C._profiler.ActiveProfilerType.LEGACY


def start(kind: str, func, agent, dst: int):
    """Open the event of ``agent``'s call (``kind``: ``"sync"``, ``"async"`` or
    ``"remote"``) of ``func`` on rank ``dst``; None when torch would record none.
    Close it with :func:`end_when_done`."""
    if not torch.autograd._profiler_enabled() or \
            torch._C._autograd._profiler_type() != _LEGACY:
        return None
    dst_name = agent.name if dst == agent.rank else agent.peer(dst).name
    event = torch.autograd.profiler.record_function(
        f"rpc_{kind}#{_name_of(func)}({agent.name} -> {dst_name})")
    event.__enter__()
    return event


def end_when_done(event, future) -> None:
    """Close ``event`` (from :func:`start`) once ``future`` completes, on whichever
    thread completes it (torch's own way: a ``__exit__`` there would not)."""
    if event is not None:
        event._call_end_callbacks_on_future(future)
        event.__exit__(None, None, None)  # leaves the event open, for the future to end


def _name_of(func) -> str:
    # torch's choice (rpc/api.py, _enable_rpc_profiler): a builtin operator's
    # schema name, a ScriptFunction's qualified name, else __qualname__.
    builtin = torch.jit._builtins._find_builtin(func)
    if builtin is not None:
        return builtin
    if isinstance(func, torch.jit.ScriptFunction):
        return torch._jit_internal._qualified_name(func)
    return getattr(func, "__qualname__", type(func).__qualname__)
