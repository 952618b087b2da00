"""Worlds of real worker processes on either backend (see compat_backend.py).

:class:`World` starts once per test module and runs many scenarios: the test
sends ``(module, function, args)`` to rank 0, which runs it (usually making
RPCs to the others) and answers ``("ok", result)`` or ``("error", type name,
traceback)``. The other ranks call ``shutdown()`` at once; a graceful
shutdown serves calls until every worker arrives, which rank 0 does when the
world closes.

:func:`run_world` starts a fresh world in which every rank runs one function
and then shuts down, for what happens *at* shutdown.

localrref worlds start with ``localrref.spawn``; torch worlds with
``torch.multiprocessing.start_processes`` and TensorPipe on loopback, as
torch's own tests do.
"""

from __future__ import annotations

import importlib
import multiprocessing
import time
import traceback
from multiprocessing.connection import wait

import compat_backend

SCENARIO_TIMEOUT = 60.0


def _start(backend: str, fn, args: tuple, nprocs: int):
    if backend == "localrref":
        import localrref
        context = localrref.spawn(fn, args=args, nprocs=nprocs, join=False)
        return context, context.group.processes
    import torch.multiprocessing as tmp
    context = tmp.start_processes(fn, args=args, nprocs=nprocs, join=False,
                                  start_method="spawn")
    return context, context.processes


def _join(context, timeout: float) -> bool:
    """Wait for every process (torch's join returns after each one exits).

    Then release each process's sentinel pipe: torch's context keeps them
    open until it is garbage collected, which the leak audit would report.
    """
    deadline = time.monotonic() + timeout
    while not context.join(max(0.0, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            return False
    for process in getattr(context, "processes", ()):
        process.close()
    return True


def _init(rank: int, backend: str, nprocs: int, port: int) -> None:
    compat_backend.install(backend)
    compat_backend.rpc.init_rpc(
        f"worker{rank}", rank=rank, world_size=nprocs,
        rpc_backend_options=compat_backend.backend_options(backend, port))


def _serve_scenarios(rank, backend, commands, results, nprocs, port):
    _init(rank, backend, nprocs, port)
    if rank == 0:
        while True:
            command = commands.get()
            if command is None:
                break
            module, function, args = command
            try:
                fn = getattr(importlib.import_module(module), function)
                results.put(("ok", fn(*args)))
            except BaseException as exc:  # reported to the test, which fails
                results.put(("error", type(exc).__name__, traceback.format_exc()))
    compat_backend.rpc.shutdown()


class World:
    def __init__(self, backend: str, nprocs: int = 4) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.backend = backend
        self.nprocs = nprocs
        self._commands = ctx.SimpleQueue()
        self._results = ctx.SimpleQueue()
        self.context, self.processes = _start(
            backend, _serve_scenarios,
            (backend, self._commands, self._results, nprocs, compat_backend.free_port()),
            nprocs)

    def run(self, fn, *args, timeout: float = SCENARIO_TIMEOUT):
        """Run ``fn(*args)`` on rank 0; return its result or raise AssertionError."""
        self._commands.put((fn.__module__, fn.__name__, args))
        sentinels = [p.sentinel for p in self.processes]
        ready = wait([self._results._reader, *sentinels], timeout)
        if self._results._reader not in ready:
            if ready:
                self.context.join(timeout=0)  # raises the worker's failure
            raise AssertionError(f"[{self.backend}] scenario {fn.__name__} did not finish "
                                 f"in {timeout} s")
        reply = self._results.get()
        if reply[0] == "error":
            raise AssertionError(f"[{self.backend}] scenario {fn.__name__} raised {reply[1]} "
                                 f"on rank 0:\n{reply[2]}")
        return reply[1]

    def close(self, timeout: float = 60.0) -> None:
        self._commands.put(None)
        if not _join(self.context, timeout):
            raise AssertionError(f"[{self.backend}] world did not shut down within {timeout} s")
        self._commands.close()
        self._results.close()


def _run_rank(rank, backend, fn_ref, results, nprocs, port):
    _init(rank, backend, nprocs, port)
    module, name = fn_ref
    fn = getattr(importlib.import_module(module), name)
    try:
        outcome = ("ok", fn(rank, nprocs))
    except BaseException as exc:
        outcome = ("error", type(exc).__name__, traceback.format_exc())
    compat_backend.rpc.shutdown()
    # What fn left to be checked after shutdown() returned.
    after = getattr(importlib.import_module(module), "after_shutdown", None)
    results.put((rank, outcome, after() if after is not None else None))


def run_world(backend: str, fn, nprocs: int, timeout: float = 120.0) -> dict:
    """Run ``fn(rank, world_size)`` on every rank of a fresh world, then ``shutdown()``.

    Returns ``{rank: (result, after)}`` where ``after`` is what the module's
    ``after_shutdown()`` (if any) returned once ``shutdown()`` had returned.
    """
    results = multiprocessing.get_context("spawn").SimpleQueue()
    context, _ = _start(backend, _run_rank,
                        (backend, (fn.__module__, fn.__name__), results, nprocs,
                         compat_backend.free_port()), nprocs)
    if not _join(context, timeout):
        raise AssertionError(f"[{backend}] world did not finish within {timeout} s")
    out = {}
    while not results.empty():
        rank, outcome, after = results.get()
        if outcome[0] == "error":
            raise AssertionError(f"[{backend}] rank {rank} raised {outcome[1]}:\n{outcome[2]}")
        out[rank] = (outcome[1], after)
    results.close()
    return out
