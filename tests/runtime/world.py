"""A reusable world for runtime tests: spawn once per module, run many scenarios.

The test process is the supervisor (it calls ``localrref.spawn(join=False)``).
Rank 0 runs scenarios on command: the test sends ``(module, function,
args)`` through a SimpleQueue, rank 0 imports and runs it (usually it makes
RPCs to the other ranks) and sends back ``("ok", result)`` or
``("error", type name, formatted traceback)``. Every other rank calls
``shutdown()`` at once: a graceful shutdown serves RPCs until every worker
has arrived, which rank 0 does when the world closes.
"""

from __future__ import annotations

import contextlib
import importlib
import multiprocessing
import threading
import traceback

import localrref

SCENARIO_TIMEOUT = 60.0


def _worker_main(rank, commands, results, world_size, options):
    import localrref as rpc
    rpc.init_rpc(f"worker{rank}", rpc_backend_options=options)
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
    rpc.shutdown()
    # shutdown() returns only once every agent thread has finished, frame
    # teardown included: one still running into interpreter finalization,
    # inside torch, aborts the process (pytorch/pytorch#38228).
    left = [t.name for t in threading.enumerate() if t.name.startswith("localrref")]
    if left:
        raise RuntimeError(f"rank {rank}: agent threads alive after shutdown(): {left}")


class World:
    def __init__(self, nprocs: int = 3, options=None) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.nprocs = nprocs
        self._commands = ctx.SimpleQueue()
        self._results = ctx.SimpleQueue()
        self.context = localrref.spawn(_worker_main, args=(self._commands, self._results,
                                                          nprocs, options),
                                       nprocs=nprocs, join=False)

    def run(self, fn, *args, timeout: float = SCENARIO_TIMEOUT):
        """Run ``fn(*args)`` on rank 0; return its result or raise AssertionError."""
        self._commands.put((fn.__module__, fn.__name__, args))
        if not self._wait_result(timeout):
            raise AssertionError(f"scenario {fn.__name__} did not finish in {timeout} s")
        reply = self._results.get()
        if reply[0] == "error":
            raise AssertionError(f"scenario {fn.__name__} raised {reply[1]} on rank 0:\n"
                                 f"{reply[2]}")
        return reply[1]

    def _wait_result(self, timeout: float) -> bool:
        from multiprocessing.connection import wait
        sentinels = [self._results._reader]
        ready = wait(sentinels + [p.sentinel for p in self.context.group.processes], timeout)
        if self._results._reader in ready:
            return True
        if ready:
            self.context.join(timeout=0)  # raises the worker's failure
        return False

    def close(self, timeout: float = 60.0) -> None:
        self._commands.put(None)
        while not self.context.join(timeout):
            raise AssertionError(f"world did not shut down within {timeout} s")
        self._commands.close()
        self._results.close()


@contextlib.contextmanager
def running(nprocs: int = 3, options=None):
    """A :class:`World` for a ``with`` block (a module fixture's body), closed after it."""
    world = World(nprocs, options)
    try:
        yield world
    finally:
        world.close()
