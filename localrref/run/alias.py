"""Make ``torch.distributed.rpc`` resolve to localrref's API in this process.

:func:`install` puts a finder first on ``sys.meta_path`` that only watches
for the module ``torch``: its loader runs torch's own, then swaps
``sys.modules["torch.distributed.rpc"]`` and the ``torch.distributed.rpc``
attribute for :mod:`localrref.run.as_torch_rpc` (and ``autograd`` for
:mod:`localrref.run.as_torch_autograd`). If torch is already
imported, the swap happens at once. Modules of torch that imported the real
``rpc`` while torch loaded keep it; the program's own imports, done later,
get localrref's.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys

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
    if "torch" in sys.modules:
        _swap()
    else:
        sys.meta_path.insert(0, _TorchWatcher())


def _swap() -> None:
    from . import as_torch_autograd, as_torch_rpc  # as_torch_rpc imports localrref's API
    import torch.distributed
    for name, module in (("rpc", as_torch_rpc), ("autograd", as_torch_autograd)):
        sys.modules[f"torch.distributed.{name}"] = module
        setattr(torch.distributed, name, module)


class _TorchWatcher(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the loader of ``torch`` to swap once torch has loaded."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "torch":
            return None
        sys.meta_path.remove(self)  # one shot; also keeps find_spec below from finding us
        spec = importlib.util.find_spec("torch")
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _SwapAfter(spec.loader)
        return spec


class _SwapAfter(importlib.abc.Loader):
    def __init__(self, loader) -> None:
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        _swap()

    def __getattr__(self, name):  # get_resource_reader, is_package, ... of the real loader
        return getattr(self._loader, name)
