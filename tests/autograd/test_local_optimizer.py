"""The local optimizer DistributedOptimizer makes on each owner, without processes."""

from __future__ import annotations

import warnings

import torch

from localrref.optim import _local_form, _without_torchscript_notice


def test_optimizers_with_a_functional_form_take_it_as_torchs_class_does(monkeypatch):
    from torch.distributed.optim.utils import functional_optim_map

    for optimizer_class, functional in functional_optim_map.items():
        assert _local_form(optimizer_class) == (functional, True)
    assert _local_form(torch.optim.LBFGS) == (torch.optim.LBFGS, False)

    class MySGD(torch.optim.SGD):  # torch maps the class itself, not its subclasses
        pass

    assert _local_form(MySGD) == (MySGD, False)
    monkeypatch.setattr(torch.jit._state._enabled, "enabled", False)  # PYTORCH_JIT=0
    assert _local_form(torch.optim.SGD) == (torch.optim.SGD, False)


def test_the_torchscript_notice_is_dropped_and_other_warnings_pass_on():
    sgd, _ = _local_form(torch.optim.SGD)
    params = [torch.zeros(3, requires_grad=True)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        optimizer = _without_torchscript_notice(sgd, params, lr=0.5)
    assert optimizer.defaults["lr"] == 0.5
    assert caught == []

    class Noisy(sgd):
        def __init__(self, *args, **kwargs):
            warnings.warn("a warning of the optimizer's own", UserWarning)
            super().__init__(*args, **kwargs)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _without_torchscript_notice(Noisy, params)
    assert [str(w.message) for w in caught] == ["a warning of the optimizer's own"]
