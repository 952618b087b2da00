"""When a world outgrows this machine: the whole API hands over to ``torch.distributed.rpc``.

localrref runs worlds of one machine; across machines the engine is torch's
own RPC (TensorPipe), not a second implementation. :func:`choose` decides,
from what ``init_rpc`` was given and the environment, which engine a world
runs on; it is pure, so every rule is tested without processes:

* ``init_rpc(backend="torch")`` or ``LOCALRREF_BACKEND=torch``: torch, asked for.
* ``backend="localrref"`` or ``LOCALRREF_BACKEND=localrref``: localrref, even
  where it would hand over (a rendezvous on another host then fails, naming it).
* A worker started by ``localrref.spawn`` / ``python -m localrref.launch``: localrref.
* torchrun with several nodes (``GROUP_WORLD_SIZE`` > 1, or fewer local
  workers than workers, ``LOCAL_WORLD_SIZE`` < ``WORLD_SIZE``): torch.
* An ``init_method`` (or ``MASTER_ADDR``) naming another host: torch.
* Otherwise localrref.

Once :func:`start` ran, :func:`active` returns the ``torch.distributed.rpc``
module and every public function of localrref forwards to it until
:func:`stop`. What only localrref has degrades to what torch offers:
``get_debug_info()`` is torch's ``_get_debug_info()``, ``share_tensor`` returns
the tensor itself, and there is no leak report (torch's graceful shutdown
deletes every RRef without one).
"""

from __future__ import annotations

import enum
import importlib
import sys
from dataclasses import dataclass
from types import ModuleType
from typing import Callable, Mapping

__all__ = ["ENV", "Engine", "Choice", "choose", "active", "start", "stop",
           "swap_in", "torch_original"]

ENV = "LOCALRREF_BACKEND"


class Engine(enum.Enum):
    LOCALRREF = "localrref"
    TORCH = "torch"


@dataclass(frozen=True, slots=True)
class Choice:
    engine: Engine
    reason: str


# torch's words first (a TypeError, as torch raises), then what localrref takes.
_BAD_BACKEND = ("Argument backend must be a member of BackendType, got {backend!r}: localrref "
                "takes None or torch's BackendType.TENSORPIPE (localrref chooses), 'localrref' "
                "(this machine) and 'torch' (torch.distributed.rpc with TensorPipe, for worlds "
                "across machines)")


def _asked(backend: object, environ: Mapping[str, str]) -> tuple[Engine, str] | None:
    if isinstance(backend, str):
        try:
            return Engine(backend.lower()), f"init_rpc(backend={backend!r})"
        except ValueError:
            raise TypeError(_BAD_BACKEND.format(backend=backend)) from None
    if backend is not None and type(backend).__name__ != "BackendType":
        raise TypeError(_BAD_BACKEND.format(backend=backend))
    # None or torch's BackendType.TENSORPIPE (torch programs pass it routinely): no preference.
    value = environ.get(ENV, "").strip().lower()
    if not value:
        return None
    try:
        return Engine(value), f"{ENV}={value}"
    except ValueError:
        raise ValueError(f"{ENV}={environ[ENV]!r}: set it to 'localrref' or 'torch' "
                         f"(or unset it to let localrref choose)") from None


def _int(environ: Mapping[str, str], name: str) -> int | None:
    try:
        return int(environ[name])
    except (KeyError, ValueError):
        return None


def choose(backend: object, environ: Mapping[str, str], *, launcher_world: bool,
           remote_host: Callable[[], str | None]) -> Choice:
    """Which engine runs this world.

    Args:
        backend: ``init_rpc``'s ``backend`` argument.
        environ: the process environment.
        launcher_world: a localrref launcher started this worker.
        remote_host: returns the rendezvous host if it is not this machine,
            else None; called only when nothing else decided (finding out
            imports the rendezvous code and may look up this host's names).
    """
    asked = _asked(backend, environ)
    if asked is not None:
        engine, why = asked
        return Choice(engine, f"{why} asks for it")
    if launcher_world:
        return Choice(Engine.LOCALRREF, "started by a localrref launcher")
    nodes = _int(environ, "GROUP_WORLD_SIZE")
    if nodes is not None and nodes > 1:
        return Choice(Engine.TORCH, f"torchrun started {nodes} nodes (GROUP_WORLD_SIZE={nodes})")
    local, world = _int(environ, "LOCAL_WORLD_SIZE"), _int(environ, "WORLD_SIZE")
    if local is not None and world is not None and local < world:
        return Choice(Engine.TORCH, f"{local} of the {world} workers run on this machine "
                                    f"(LOCAL_WORLD_SIZE={local}, WORLD_SIZE={world})")
    host = remote_host()
    if host is not None:
        return Choice(Engine.TORCH, f"the rendezvous is on another host ({host})")
    return Choice(Engine.LOCALRREF, "every worker is on this machine")


# -- the shell: this process's hand-over, if any ---------------------------

_torch_rpc: ModuleType | None = None

# What ``python -m localrref.run`` put in place of torch's objects
# (run/alias.py swaps through :func:`swap_in`): ``(where, name, torch's,
# localrref's)``, where ``where`` is ``sys.modules`` or a module. A world that
# hands over to torch puts torch's back while it runs: torch's own code
# reaches its package through them at every call (``dist.rpc.PyRRef``, ``from
# . import TensorPipeAgent``); the program's own names, bound already, are
# localrref's, which forward to torch.
_swaps: list[tuple[object, str, object, object]] = []


def swap_in(where, name: str, ours: object) -> None:
    """Put ``ours`` in place of torch's ``name`` in ``where`` (``sys.modules``
    or a module), keeping torch's for :func:`torch_original` and the hand-over."""
    torchs = where.get(name) if isinstance(where, dict) else getattr(where, name)
    _swaps.append((where, name, torchs, ours))
    _put(where, name, ours)


def _put(where, name: str, value: object) -> None:
    if isinstance(where, dict):
        where[name] = value
    else:
        setattr(where, name, value)


def _put_all(torchs: bool) -> None:
    for where, name, torch_value, ours in _swaps:
        _put(where, name, torch_value if torchs else ours)


def torch_original(name: str) -> object:
    """torch's own ``name`` (``"torch.distributed.rpc"``,
    ``"torch.distributed.optim.DistributedOptimizer"``, ...), even under the runner."""
    for where, key, torchs, _ in _swaps:
        full = key if where is sys.modules else f"{where.__name__}.{key}"
        if full == name and torchs is not None:
            return torchs
    try:
        return importlib.import_module(name)
    except ImportError:
        module, _, attribute = name.rpartition(".")
        return getattr(importlib.import_module(module), attribute)


def active() -> ModuleType | None:
    """``torch.distributed.rpc`` while this process's world runs on torch, else None."""
    return _torch_rpc


def torch_options(options) -> object:
    """torch's ``TensorPipeRpcBackendOptions`` for localrref's (torch's own pass through)."""
    torch_rpc = torch_original("torch.distributed.rpc")
    # torch's own (its faulty agent's too) pass through
    if options is None or isinstance(options, torch_rpc._TensorPipeRpcBackendOptionsBase):
        return options
    return torch_rpc.TensorPipeRpcBackendOptions(
        num_worker_threads=options.num_worker_threads, rpc_timeout=options.rpc_timeout,
        init_method=options.init_method, device_maps=options.device_maps or None,
        devices=options.devices or None)


def start(name: str, rank: int, world_size: int | None, options, reason: str,
          backend: object = None) -> None:
    """Start torch's RPC in this process for this world; localrref's API forwards to it.

    ``backend``: ``init_rpc``'s; one of torch's ``BackendType`` members (its
    faulty agent's, say) is torch's to run, anything else means TensorPipe.
    """
    global _torch_rpc
    torch_rpc = torch_original("torch.distributed.rpc")
    print(f"localrref: this world runs on torch.distributed.rpc (TensorPipe): {reason}",
          file=sys.stderr, flush=True)
    # Forward first: torch's agent serves peers before its init_rpc returns,
    # and a function they run here may already call localrref's API.
    _torch_rpc = torch_rpc
    _put_all(torchs=True)
    try:
        if type(backend).__name__ != "BackendType":
            backend = torch_rpc.BackendType.TENSORPIPE
        torch_rpc.init_rpc(name, backend=backend, rank=rank, world_size=world_size,
                           rpc_backend_options=torch_options(options))
    except BaseException:
        _torch_rpc = None
        _put_all(torchs=False)
        raise


def stop() -> None:
    global _torch_rpc
    if _torch_rpc is not None:
        _put_all(torchs=False)
    _torch_rpc = None

