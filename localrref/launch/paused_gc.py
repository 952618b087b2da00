"""Spawned workers start with Python's cyclic garbage collector paused.

A fresh worker spends most of its start importing torch: about 1.2 s of CPU
here, and 10-20 % of that is the cyclic collector. The import makes some
170,000 tracked objects (modules, functions, classes) and almost no garbage
(about 7,000 objects, 1 MB), yet the collector keeps scanning the growing
heap while it runs: gen-0/1 passes during the import, then a full pass of
about 55-70 ms soon after. With four workers on two cores that CPU is wall
time, so the world starts that much later.

So a ``spawn`` worker's interpreter runs ``gc.disable()`` before anything
else. Everything up to the user's code runs paused: the user's main module
(re-imported as ``__mp_main__``), the modules that unpickling ``fn`` imports,
and the bootstrap. Just before the user's code runs, :func:`resume` calls
``gc.freeze()`` and then ``gc.enable()``. Freezing moves the startup objects
into the permanent generation, so later collections skip them; without it,
re-enabling only postpones the scans to the first full pass. The cost is
that startup's cyclic garbage is never collected: about 1 MB once per worker
for ``import torch``. This is CPython's documented ``gc.freeze`` pattern.

Only the command line changes: :class:`SpawnProcess` is the standard spawn
process, whose launcher puts the pause in front of ``spawn_main``. A
program whose modules import torch lazily, inside ``fn``, gets no gain:
its import runs after :func:`resume`. ``fork`` and ``forkserver`` workers
inherit their parent's collector state; nothing here touches them.

Workers that another launcher started (``torch.multiprocessing.spawn``,
torchrun, a shell) cannot start paused, but their first ``init_rpc`` calls
:func:`freeze_at_first_init`: what exists then (torch and the program's
modules) moves into the permanent generation before the full pass that
follows the import comes due, so the worker never scans it. Measured with
four ``torch.multiprocessing.spawn`` workers on two cores: every
``init_rpc`` returns about 100 ms sooner. Only the first ``init_rpc`` of a
process freezes, so garbage of one RPC session is never frozen by the next.

Under ``python -m localrref.run``, whose ``sitecustomize`` runs first in
every Python process the program starts, a ``spawn`` child of any launcher
(``--multiprocessing-fork`` on its command line: ``torch.multiprocessing.spawn``,
``multiprocessing.Process``, a pool) starts paused too, through
:func:`pause_until_target`: its target's ``_bootstrap`` resumes first, as
the bootstrap of a ``localrref.spawn`` worker does. A child that is not a
``spawn`` child is left alone, since nothing would resume its collector.

Two things change for the user. Cyclic garbage made before ``fn`` runs is
frozen with the rest, so a main module that builds and drops large cyclic
structures at import time (outside ``if __name__ == "__main__"``) keeps
them; and a main module that calls ``gc.disable()`` at import finds the
collector on again in ``fn``. ``LOCALRREF_PAUSE_GC_AT_START=0`` in the
supervisor's environment turns all of this off.
"""

from __future__ import annotations

import gc
import io
import multiprocessing.context
import os
import sys
from multiprocessing import popen_spawn_posix, reduction, resource_tracker, spawn, util
from multiprocessing.context import set_spawning_popen
from multiprocessing.process import BaseProcess
from typing import Any

__all__ = ["SWITCH_ENV", "SpawnProcess", "freeze_at_first_init", "pause_until_target",
           "process_class", "resume"]

SWITCH_ENV = "LOCALRREF_PAUSE_GC_AT_START"

_PAUSE = "import gc; gc.disable(); "

# Set once this process has frozen its startup objects (resume() or the first init_rpc).
_frozen = False


def _command_line_with_pause(**kwds: Any) -> list[str]:
    cmd = spawn.get_command_line(**kwds)
    # A frozen executable's command line has no `-c` program; it then starts
    # with the collector on, and resume() has nothing to do.
    if "-c" in cmd:
        i = cmd.index("-c") + 1
        cmd[i] = _PAUSE + cmd[i]
    return cmd


class _PausedPopen(popen_spawn_posix.Popen):
    # CPython's _launch (identical from 3.10 to 3.13) with one change: the
    # command line. It has no hook for that, and patching the module-level
    # get_command_line would reach processes other code spawns meanwhile.
    def _launch(self, process_obj: Any) -> None:
        tracker_fd = resource_tracker.getfd()
        self._fds.append(tracker_fd)
        prep_data = spawn.get_preparation_data(process_obj._name)
        fp = io.BytesIO()
        set_spawning_popen(self)
        try:
            reduction.dump(prep_data, fp)
            reduction.dump(process_obj, fp)
        finally:
            set_spawning_popen(None)

        parent_r = child_w = child_r = parent_w = None
        try:
            parent_r, child_w = os.pipe()
            child_r, parent_w = os.pipe()
            cmd = _command_line_with_pause(tracker_fd=tracker_fd, pipe_handle=child_r)
            self._fds.extend([child_r, child_w])
            self.pid = util.spawnv_passfds(spawn.get_executable(), cmd, self._fds)
            self.sentinel = parent_r
            with open(parent_w, "wb", closefd=False) as f:
                f.write(fp.getbuffer())
        finally:
            fds_to_close = [fd for fd in (parent_r, parent_w) if fd is not None]
            self.finalizer = util.Finalize(self, util.close_fds, fds_to_close)
            for fd in (child_r, child_w):
                if fd is not None:
                    os.close(fd)


class SpawnProcess(multiprocessing.context.SpawnProcess):
    """A ``spawn`` process whose interpreter starts with the collector paused."""

    @staticmethod
    def _Popen(process_obj: Any) -> Any:
        return _PausedPopen(process_obj)


def _switched_off() -> bool:
    return os.environ.get(SWITCH_ENV, "").strip() == "0"


def process_class(ctx: Any) -> Any:
    """The Process class to start workers with under multiprocessing context ``ctx``."""
    if ctx.get_start_method() != "spawn" or _switched_off():
        return ctx.Process
    return SpawnProcess


def resume() -> None:
    """Freeze what startup made and turn the collector back on (idempotent).

    A worker that did not start paused (fork, forkserver, frozen executable)
    is left as it is.
    """
    global _frozen
    if gc.isenabled():
        return
    gc.freeze()
    _frozen = True
    gc.enable()


def freeze_at_first_init() -> None:
    """Freeze what this process made before its first ``init_rpc`` (see the
    module's doc); later calls, a worker :func:`resume` froze, and
    ``LOCALRREF_PAUSE_GC_AT_START=0`` in the worker's environment do nothing."""
    global _frozen
    if _frozen or _switched_off():
        return
    _frozen = True
    gc.freeze()


def pause_until_target() -> None:
    """In a ``spawn`` child (``--multiprocessing-fork`` in ``sys.argv``), pause the
    collector now and :func:`resume` just before the process's target runs.

    Call it at interpreter start (``run/site/sitecustomize.py``): everything
    up to the target (the main module imported again, what unpickling the
    process object imports) then runs paused. Anything else is left as it
    is: another process, a collector already paused (a worker that a
    localrref supervisor started), and ``LOCALRREF_PAUSE_GC_AT_START=0``.
    """
    if not spawn.is_forking(sys.argv) or not gc.isenabled() or _switched_off():
        return
    gc.disable()
    bootstrap = BaseProcess._bootstrap

    def _bootstrap(self, *args, **kwargs):
        BaseProcess._bootstrap = bootstrap
        resume()
        return bootstrap(self, *args, **kwargs)

    BaseProcess._bootstrap = _bootstrap
