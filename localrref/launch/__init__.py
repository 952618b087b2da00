"""Starting, watching and stopping localrref worker processes.

* ``localrref.launch.spawn`` / ``start_processes``: torch.multiprocessing.spawn
  for a localrref world (``supervisor.py``).
* ``python -m localrref.launch``: a single-node torchrun (``cli.py`` parses,
  ``launcher.py`` runs).

Workers import ``localrref.launch.bootstrap`` (and so this package) before any
user code, so nothing here is imported eagerly: the names below load on first
use.
"""

from __future__ import annotations

from typing import Any

__all__ = ["spawn", "start_processes", "ProcessContext", "RunOptions", "WorkerGroup"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from localrref.launch import supervisor

        return getattr(supervisor, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
