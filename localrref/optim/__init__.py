"""``torch.distributed.optim.DistributedOptimizer`` for localrref.

One local optimizer per worker that owns parameters, created there by an
RPC and held through an RRef. ``step(context_id)`` asks every owner at once
to step its optimizer with its gradients from the distributed autograd
context, and returns when all have; an error in any step is raised (after
the others finished), as torch's does.

The local optimizer is the one torch's class makes: for the optimizers
torch has a functional form of (``SGD``, ``Adam``, ``AdamW``, ``Adagrad``,
``Adadelta``, ``RMSprop``, ``Rprop``, ``Adamax``; its ``functional_optim_map``)
that form, unless TorchScript is off (``PYTORCH_JIT=0``), so its defaults
and the arguments it takes are torch's (``DistributedOptimizer(SGD, params)``
steps with lr 0.01 there, not ``SGD``'s 0.001). The caller decides, as in
torch, so a form registered there with torch's ``register_functional_optim``
counts. The form takes the context's gradients as a list and never touches
``.grad``. torch compiles it with TorchScript to step without the GIL; here
it runs as Python, which in a worker that just served other calls costs
about half of what ``torch.optim.SGD.step`` does (no profiler hooks, less
code to bring back into the caches; compiled, it costs more than as
Python there). Any other optimizer class steps with each parameter's
``.grad`` set to its gradient in the context (None for one the context has
no gradient for, so the optimizer skips it) and put back afterwards, so
distributed training never leaves anything in ``.grad`` either. Steps of
several optimizers in one process are serialised (torch's ``global_lock``).

A world handed over to ``torch.distributed.rpc`` gets torch's own class.
"""

from __future__ import annotations

import threading
import warnings
from collections import defaultdict

import torch

from .. import api, autograd, constants, handover
from ..agent import current
from ..agent.autograd_pass import GRAD_LOCK
from ..agent.futures import wait
from ..rref import RRef

__all__ = ["DistributedOptimizer"]


class _LocalOptimizer:
    """The optimizer of the parameters one worker owns (lives on that worker)."""

    # torch's global_lock serialises the steps; it is also the lock a
    # distributed backward pass holds while it sets .grad aside, since a
    # step of a non-functional optimizer sets .grad to the context's
    # gradients meanwhile.
    global_lock = GRAD_LOCK

    def __init__(self, optimizer_class, functional: bool, local_params_rref,
                 *args, **kwargs) -> None:
        self._local_params = [rref.local_value() for rref in local_params_rref]
        self._functional = functional
        if functional:
            self.optim = _without_torchscript_notice(optimizer_class, self._local_params,
                                                     *args, **kwargs)
        else:
            self.optim = optimizer_class(self._local_params, *args, **kwargs)

    def step(self, context_id: int) -> None:
        grads = autograd.get_gradients(context_id)
        with _LocalOptimizer.global_lock:
            params = self._local_params
            if self._functional:
                self.optim.step([grads.get(param) for param in params])
                return
            kept = [param.grad for param in params]
            try:
                for param in params:
                    param.grad = grads.get(param)
                self.optim.step()
            finally:
                for param, grad in zip(params, kept):
                    param.grad = grad


# warnings.catch_warnings swaps process-wide state: two threads in it at
# once could leave the other's recorder installed for good.
_CATCHING = threading.Lock()


def _without_torchscript_notice(functional_class, params, *args, **kwargs):
    """A functional optimizer, made without its notice that TorchScript support
    for it is deprecated (nothing here compiles it); other warnings pass on."""
    with _CATCHING, warnings.catch_warnings(record=True) as caught:
        optimizer = functional_class(params, *args, **kwargs)
    for warning in caught:
        if not (issubclass(warning.category, DeprecationWarning)
                and "TorchScript" in str(warning.message)):
            warnings.warn_explicit(warning.message, warning.category, warning.filename,
                                   warning.lineno)
    return optimizer


def _local_form(optimizer_class) -> tuple[type, bool]:
    """The class each owner makes, and whether it is functional (torch's choice)."""
    try:
        from torch.distributed.optim.utils import functional_optim_map
    except ImportError:  # a torch without functional optimizers
        return optimizer_class, False
    functional = functional_optim_map.get(optimizer_class)
    if functional is None or not torch.jit._state._enabled:
        return optimizer_class, False
    return functional, True


def _new_local_optimizer(optimizer_class, functional, local_params_rref, *args, **kwargs) -> RRef:
    return RRef(_LocalOptimizer(optimizer_class, functional, local_params_rref, *args, **kwargs))


def _local_optimizer_step(local_optim_rref: RRef, context_id: int) -> None:
    local_optim_rref.local_value().step(context_id)


def _wait_for_all(futures, wait=None) -> list:
    """Every future's value; the last error, once all are done (torch's ``_wait_for_all``).

    ``wait``: how to wait for one future (default: its ``wait()``).
    """
    error = None
    results = []
    for future in futures:
        try:
            results.append(future.wait() if wait is None else wait(future))
        except Exception as exc:  # noqa: BLE001 - raised below, after the others
            results.append(exc)
            error = exc
    if error is not None:
        raise error
    return results


class DistributedOptimizer:
    """An optimizer over parameters held by RRefs on any workers (torch's API).

    Args:
        optimizer_class: a ``torch.optim.Optimizer`` class, made on each owner.
        params_rref: RRefs to the parameters, local or remote.
        *args, **kwargs: passed to ``optimizer_class`` on each owner.
    """

    def __new__(cls, *args, **kwargs):
        torch_rpc = handover.active()
        if torch_rpc is not None and current.get() is None:
            torchs = handover.torch_original("torch.distributed.optim.DistributedOptimizer")
            return torchs(*args, **kwargs)
        return object.__new__(cls)

    def __init__(self, optimizer_class, params_rref, *args, **kwargs) -> None:
        per_worker = defaultdict(list)
        for param in params_rref:
            if not isinstance(param, RRef):
                raise TypeError(
                    f"DistributedOptimizer takes RRefs to parameters, got a "
                    f"{type(param).__name__}; wrap a local parameter in localrref.RRef(param), "
                    f"or use RemoteModule.remote_parameters()")
            per_worker[param.owner()].append(param)
        local_class, functional = _local_form(optimizer_class)
        futures = [api.rpc_async(worker, _new_local_optimizer,
                                 args=(local_class, functional, params) + args, kwargs=kwargs)
                   for worker, params in per_worker.items()]
        self.remote_optimizers = _wait_for_all(futures)

    def step(self, context_id: int) -> None:
        """One step on every owner with its gradients in ``context_id``; waits for all.

        The other owners' steps are started first; this worker's own runs
        here meanwhile (torch sends it an RPC to itself). This thread then
        reads the owners' replies itself, in the order they come
        (``Reader.wait_replies``): no hand-off of the inbox to the IO thread
        and back, and none of a reply to the pool.
        """
        autograd._is_valid_context(context_id)
        agent = current.require()
        futures, here = [], []
        for optimizer in self.remote_optimizers:
            if optimizer.is_owner():
                here.append(optimizer)
            else:
                futures.append(agent.calls.rpc_async(
                    optimizer._record.owner, _local_optimizer_step, (optimizer, context_id), {},
                    constants.UNSET_RPC_TIMEOUT, will_wait=True))
        error = None
        for optimizer in here:
            try:
                _local_optimizer_step(optimizer, context_id)
            except Exception as exc:  # noqa: BLE001 - raised after the others finished
                error = exc
        try:
            agent.reader.wait_replies(futures)
            _wait_for_all(futures, wait)
        except Exception:
            if error is None:
                raise
        if error is not None:
            raise error
