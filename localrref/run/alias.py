"""Make ``torch.distributed.rpc`` resolve to localrref's API in this process.

:func:`install` puts a finder first on ``sys.meta_path`` that finds nothing
itself: it watches for a few of torch's modules and wraps their loaders, so
that right after one has loaded its names are swapped:

* ``torch``: ``sys.modules["torch.distributed.rpc"]`` and the
  ``torch.distributed.rpc`` attribute become :mod:`localrref.run.as_torch_rpc`
  (``autograd`` likewise :mod:`localrref.run.as_torch_autograd`);
* ``torch.distributed.optim`` and ``torch.distributed.nn``:
  ``DistributedOptimizer`` and ``RemoteModule`` become localrref's
  (:mod:`localrref.optim`, :mod:`localrref.nn`): torch's own reach into
  torch's C++ RPC and autograd internals.

A module already imported when :func:`install` runs is swapped at once.
Modules of torch that imported the real ``rpc`` while torch loaded keep it;
the program's own imports, done later, get localrref's. Every swap goes
through :func:`localrref.handover.swap_in`, which keeps torch's original: a
world that hands over to torch puts them back while it runs on torch.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys

from localrref import handover

__all__ = ["ENV", "install", "installed"]

ENV = "LOCALRREF_AS_TORCH_RPC"
_installed = False


def installed() -> bool:
    return _installed


def install() -> None:
    """Swap ``torch.distributed.rpc`` for localrref now, or right after torch is imported."""
    global _installed
    if _installed:
        return
    _installed = True
    os.environ[ENV] = "1"  # processes started from here on do the same (run/site)
    pending = {}
    for name, swap in _SWAPS.items():
        if name in sys.modules:
            swap(sys.modules[name])
        else:
            pending[name] = swap
    if pending:
        sys.meta_path.insert(0, _Watcher(pending))


def _swap_torch(torch_module) -> None:
    import torch.distributed
    from . import as_torch_autograd, as_torch_rpc  # as_torch_rpc imports localrref's API
    for name, module in (("rpc", as_torch_rpc), ("autograd", as_torch_autograd)):
        handover.swap_in(sys.modules, f"torch.distributed.{name}", module)
        handover.swap_in(torch.distributed, name, module)


def _replace(package, names: tuple[str, ...], attribute: str, ours: type) -> None:
    handover.swap_in(package, attribute, ours)
    for name in names:  # where torch defines it, for `from <there> import <it>`
        module = sys.modules.get(name)
        if module is not None and hasattr(module, attribute):
            handover.swap_in(module, attribute, ours)


def _swap_optim(package) -> None:
    from localrref.optim import DistributedOptimizer
    _replace(package, ("torch.distributed.optim.optimizer",), "DistributedOptimizer",
             DistributedOptimizer)


def _swap_nn(package) -> None:
    from localrref.nn import RemoteModule
    _replace(package, ("torch.distributed.nn.api.remote_module",), "RemoteModule", RemoteModule)


_SWAPS = {"torch": _swap_torch, "torch.distributed.optim": _swap_optim,
          "torch.distributed.nn": _swap_nn}


class _Watcher(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the loaders of the watched modules to swap once they load."""

    def __init__(self, pending: dict) -> None:
        self._pending = pending

    def find_spec(self, fullname, path=None, target=None):
        swap = self._pending.pop(fullname, None)  # one shot per module
        if swap is None:
            return None
        if not self._pending:
            sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _SwapAfter(spec.loader, swap)
        return spec


class _SwapAfter(importlib.abc.Loader):
    def __init__(self, loader, swap) -> None:
        self._loader = loader
        self._swap = swap

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        self._swap(module)

    def __getattr__(self, name):  # get_resource_reader, is_package, ... of the real loader
        return getattr(self._loader, name)
