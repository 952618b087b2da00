"""``torch.distributed.nn.RemoteModule`` for localrref.

A :class:`RemoteModule` creates a module on another worker (``"worker1/cpu"``,
``"rank:1/cpu"``) and holds an RRef to it. ``forward`` and ``forward_async``
run the module's ``forward`` there (its hooks are not run, as on torch);
inside a distributed autograd context the calls are recorded like any other,
so gradients reach the remote parameters. ``remote_parameters()`` gives RRefs
to them for :class:`localrref.optim.DistributedOptimizer`. The rest of
``nn.Module``'s methods fail with torch's errors: the parameters live
elsewhere. A RemoteModule passed in an RPC arrives as a RemoteModule on the
same remote module, with torch's attributes (``on``, ``device``,
``is_device_map_set``, ``is_scriptable``, ``generated_methods``,
``module_rref``, and ``forward``/``forward_async``) and no ``nn.Module``
state; plain ``pickle`` refuses it, with torch's error.

A world handed over to ``torch.distributed.rpc`` gets torch's own class.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed import _remote_device

from .. import api, handover
from ..agent import current
from ..codec.pickler import register_reducer
from ..rref import RRef

__all__ = ["RemoteModule"]


def _create_module(module_cls, args, kwargs, device):
    module = module_cls(*args, **kwargs)
    if not isinstance(module, nn.Module):
        raise ValueError(
            "Expect `module_cls(*args, **kwargs)` returns an instance of <class nn.Module>, "
            f"but it returns an instance of {type(module)}.")
    module.to(device)
    return module


def _remote_forward(module_rref, device, is_device_map_set, *args, **kwargs):
    return module_rref.local_value().forward(*args, **kwargs)


def _param_rrefs(module_rref, recurse) -> list:
    return [RRef(param) for param in module_rref.local_value().parameters(recurse)]


def _raise_not_supported(name: str) -> None:
    raise ValueError(f"Method ``{name}`` not supported for RemoteModule")


# What travels when a RemoteModule is sent in an RPC, in torch's order
# (torch.distributed.nn.api.remote_module._REMOTE_MODULE_PICKLED_ATTRIBUTES).
_PICKLED_ATTRIBUTES = ("on", "device", "is_device_map_set", "is_scriptable",
                       "generated_methods", "module_rref")


def _reduce_remote_module(module) -> tuple:
    return _receive, tuple(module.__dict__[name] for name in _PICKLED_ATTRIBUTES)


def _receive(*attributes) -> "RemoteModule":
    # As torch's _remote_module_receiver: only the pickled attributes and the
    # generated methods, no nn.Module state (the module lives elsewhere).
    module = object.__new__(RemoteModule)
    module.__dict__.update(zip(_PICKLED_ATTRIBUTES, attributes))
    module._install_generated_methods()
    return module


class _GeneratedMethod:
    """``forward`` or ``forward_async`` of a received RemoteModule, holding what the
    call needs (the module's RRef, device, device-map flag), not the module."""

    __slots__ = ("_function", "module_rref", "device", "is_device_map_set")

    def __init__(self, function, module_rref, device, is_device_map_set) -> None:
        self._function = function
        self.module_rref = module_rref
        self.device = device
        self.is_device_map_set = is_device_map_set

    @property
    def __name__(self) -> str:
        return self._function.__name__

    def __call__(self, *args, **kwargs):
        return self._function(self, *args, **kwargs)

    def __reduce__(self):
        return _GeneratedMethod, (self._function, self.module_rref, self.device,
                                  self.is_device_map_set)


class RemoteModule(nn.Module):
    """A module created on another worker, called through RPC (torch's API).

    Args:
        remote_device: ``"<worker name>/<device>"`` or ``"rank:<rank>/<device>"``;
            the device defaults to ``"cpu"``.
        module_cls: the ``nn.Module`` class to create there.
        args, kwargs: passed to ``module_cls`` there.
    """

    def __new__(cls, *args, **kwargs):
        torch_rpc = handover.active()
        if torch_rpc is not None and current.get() is None:
            torchs = handover.torch_original("torch.distributed.nn.RemoteModule")
            return torchs(*args, **kwargs)
        return super().__new__(cls)

    def __init__(self, remote_device: str, module_cls: type[nn.Module], args: tuple | None = None,
                 kwargs: dict | None = None) -> None:
        super().__init__()
        on, device = self._parse(remote_device)
        module_rref = api.remote(on, _create_module,
                                 (module_cls, tuple(args or ()), dict(kwargs or {}), device))
        self._set_fields(on, device, module_rref)

    @staticmethod
    def init_from_module_rref(remote_device: str, module_rref: RRef,
                              _module_interface_cls=None) -> "RemoteModule":
        """A RemoteModule on an existing remote module (several may share one)."""
        if _module_interface_cls is not None:
            raise NotImplementedError(
                "RemoteModule with a TorchScript module interface (_module_interface_cls) is not "
                "supported by localrref; leave it out to get the Python RemoteModule")
        module = RemoteModule.__new__(RemoteModule)
        nn.Module.__init__(module)
        on, device = module._parse(remote_device)
        module._set_fields(on, device, module_rref)
        return module

    @staticmethod
    def _parse(remote_device: str) -> tuple:
        current.require()  # torch: "RemoteModule only works in RPC."
        parsed = _remote_device(remote_device)
        on = parsed.worker_name() if parsed.worker_name() is not None else parsed.rank()
        return on, str(parsed.device())

    def _set_fields(self, on, device: str, module_rref: RRef) -> None:
        self.on = on
        self.device = device
        self.is_device_map_set = False  # localrref has no device maps: one host, CPU tensors
        self.is_scriptable = False
        self.generated_methods = (RemoteModule.forward_async, RemoteModule.forward)
        self.module_rref = module_rref

    def _install_generated_methods(self) -> None:
        # As torch's receiver does, but not as bound methods: those would make
        # a reference cycle, and a received module dropped by the program
        # would keep its RRef alive until a full collection (the leak report
        # at shutdown named it). The creator's module uses the class's methods.
        for method in self.generated_methods:
            self.__dict__[method.__name__] = _GeneratedMethod(
                method, self.module_rref, self.device, self.is_device_map_set)

    # -- what runs remotely ---------------------------------------------------------

    def forward_async(self, *args, **kwargs) -> torch.futures.Future:
        """``forward`` on the remote module; a future of its result."""
        return api.rpc_async(self.module_rref.owner(), _remote_forward,
                             (self.module_rref, self.device, self.is_device_map_set, *args),
                             kwargs)

    def forward(self, *args, **kwargs):
        """``forward`` on the remote module; waits for its result."""
        return api.rpc_sync(self.module_rref.owner(), _remote_forward,
                            (self.module_rref, self.device, self.is_device_map_set, *args),
                            kwargs)

    def remote_parameters(self, recurse: bool = True) -> list:
        """RRefs to the remote module's parameters (for DistributedOptimizer)."""
        return api.rpc_sync(self.on, _param_rrefs, args=(self.module_rref, recurse))

    def get_module_rref(self) -> RRef:
        """The RRef to the remote module."""
        return self.module_rref

    def train(self, mode: bool = True):
        return self.module_rref.rpc_sync().train()

    def eval(self):
        return self.module_rref.rpc_sync().eval()

    # -- pickling: in an RPC, the RRef travels and a RemoteModule is rebuilt ------------

    def __getstate__(self):
        raise RuntimeError("Cannot pickle RemoteModule in python pickler. RemoteModule can only "
                           "be pickled when using RPC")

    def __setstate__(self, state):
        raise RuntimeError("Cannot unpickle RemoteModule in python pickler. RemoteModule can "
                           "only be unpickled when using RPC")

    # -- what nn.Module offers that a remote module cannot (torch's errors) -------------

    def parameters(self, recurse: bool = True):
        raise ValueError("Method ``parameters`` not supported for RemoteModule. Please use "
                         "``remote_parameters`` instead.")


def _unsupported(name: str):
    def method(self, *args, **kwargs):
        _raise_not_supported(name)
    method.__name__ = method.__qualname__ = name
    return method


for _name in ("register_buffer", "register_parameter", "add_module", "apply", "cuda", "ipu",
              "xpu", "cpu", "type", "float", "double", "half", "bfloat16", "to",
              "register_backward_hook", "register_forward_pre_hook", "register_forward_hook",
              "state_dict", "load_state_dict", "named_parameters", "buffers", "named_buffers",
              "children", "named_children", "modules", "named_modules", "requires_grad_",
              "zero_grad", "share_memory", "extra_repr"):
    setattr(RemoteModule, _name, _unsupported(_name))
del _name

register_reducer(RemoteModule, _reduce_remote_module)
