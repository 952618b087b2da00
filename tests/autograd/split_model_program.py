"""Distributed autograd, DistributedOptimizer and RemoteModule scenarios on either backend.

``python split_model_program.py BACKEND OUT`` starts three workers with
``torch.multiprocessing.spawn``; worker 0 runs every scenario below and
writes ``{scenario: "ok" or the error}`` to OUT as JSON, with the modules
its rpc, autograd, DistributedOptimizer and RemoteModule came from. Each scenario
checks itself against the same computation done by plain autograd (or a
plain optimizer) in one process, so the same file proves torch's semantics
on torch and on localrref.
"""

import json
import os
import pickle
import re
import sys
import time
import traceback

import torch
import torch.multiprocessing as mp
from torch import nn
from torch.testing import assert_close

BACKEND = sys.argv[1]  # spawned children get the parent's argv
if BACKEND == "torch":
    import torch.distributed.autograd as dist_autograd
    import torch.distributed.rpc as rpc
    from torch.distributed.nn import RemoteModule
    from torch.distributed.optim import DistributedOptimizer
else:
    import localrref as rpc
    import localrref.autograd as dist_autograd
    from localrref.nn import RemoteModule
    from localrref.optim import DistributedOptimizer


def weight(rank):
    """Worker ``rank``'s weight (every process makes the same values)."""
    cache = weight.__dict__.setdefault("cache", {})
    if rank not in cache:
        cache[rank] = torch.linspace(-1.0, 1.0, 4).add(rank + 1).requires_grad_()
    return cache[rank]


def local_weights():
    return [torch.linspace(-1.0, 1.0, 4).add(r + 1).requires_grad_() for r in range(3)]


def me():
    return rpc.get_worker_info().id


def grad_here(context_id):
    """This worker's gradient for its weight in ``context_id`` (None if none)."""
    assert weight(me()).grad is None, f"worker{me()}: .grad was written"
    return dist_autograd.get_gradients(context_id).get(weight(me()))


def stage(x):
    return torch.tanh(x * weight(me()))


def chain(x, path):
    """Multiply by this worker's weight, then go on along ``path`` (a hop per worker)."""
    h = torch.sin(x * weight(me()))
    if not path:
        return h
    return rpc.rpc_sync(f"worker{path[0]}", chain, args=(h, path[1:])) + h


def two_args(a, b, scale, plain):
    return a * weight(me()) * scale + b * plain


class Boom(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        raise ValueError("boom in a remote backward")


def explode(x):
    return Boom.apply(x * weight(me()))


class Det(nn.Module):
    """A small MLP whose parameters depend only on ``seed`` (same on every process)."""

    def __init__(self, seed, d_in=4, d_out=4):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.lin = nn.Linear(d_in, d_out)
        with torch.no_grad():
            self.lin.weight.copy_(torch.randn(d_out, d_in, generator=gen) * 0.5)
            self.lin.bias.copy_(torch.randn(d_out, generator=gen) * 0.1)

    def forward(self, x):
        return torch.tanh(self.lin(x))


def param_rrefs(module_rref):
    return [rpc.RRef(p) for p in module_rref.local_value().parameters()]


def params_of(module_rref):
    return [p.detach().clone() for p in module_rref.local_value().parameters()]


def attribute_names(remote_module) -> list:
    return list(remote_module.__dict__)


def forward_through(remote_module, x):
    return remote_module.forward(x) * 2


def context_known(context_id):
    try:
        dist_autograd._is_valid_context(context_id)
    except RuntimeError:
        return False
    return True


X = torch.tensor([0.5, -1.0, 2.0, 0.25])


def check_grads(context_id, expected):
    """``expected``: the reference gradient of each worker's weight (None: none there)."""
    seen = [grad_here(context_id)] + [rpc.rpc_sync(f"worker{r}", grad_here, args=(context_id,))
                                      for r in (1, 2)]
    for rank, (got, want) in enumerate(zip(seen, expected)):
        if want is None:
            assert got is None, f"worker{rank} has a gradient it should not have: {got}"
        else:
            assert got is not None, f"worker{rank} has no gradient"
            assert_close(got, want, msg=lambda m: f"worker{rank}: {m}")
    assert weight(0).grad is None, ".grad was written"


def reference(loss_fn):
    w = local_weights()
    grads = torch.autograd.grad(loss_fn(w), w, allow_unused=True)
    return list(grads)


# -- scenarios -------------------------------------------------------------------------

def one_hop():
    with dist_autograd.context() as cid:
        loss = rpc.rpc_sync("worker1", stage, args=(X * weight(0),)).sum()
        dist_autograd.backward(cid, [loss])
        check_grads(cid, reference(lambda w: torch.tanh(X * w[0] * w[1]).sum()) )


def three_hops_and_back_to_the_caller():
    def local(w):
        def hop(x, path):
            h = torch.sin(x * w[path[0]])
            return h if len(path) == 1 else hop(h, path[1:]) + h
        return (hop(X * w[0], [1, 2, 0]) * w[0]).sum()
    with dist_autograd.context() as cid:
        out = rpc.rpc_async("worker1", chain, args=(X * weight(0), [2, 0])).wait()
        loss = (out * weight(0)).sum()
        dist_autograd.backward(cid, [loss])
        check_grads(cid, reference(local))


def several_roots():
    with dist_autograd.context() as cid:
        a = rpc.rpc_sync("worker1", stage, args=(X * weight(0),))
        b = rpc.rpc_sync("worker2", stage, args=(X + weight(0),))
        dist_autograd.backward(cid, [a.sum(), (b * b).sum()])
        check_grads(cid, reference(lambda w: torch.tanh(X * w[0] * w[1]).sum()
                                   + torch.tanh((X + w[0]) * w[2]).pow(2).sum()))


def retain_graph():
    expected = reference(lambda w: torch.tanh(X * w[0] * w[1]).sum())
    with dist_autograd.context() as cid:
        loss = rpc.rpc_sync("worker1", stage, args=(X * weight(0),)).sum()
        dist_autograd.backward(cid, [loss], retain_graph=True)
        dist_autograd.backward(cid, [loss], retain_graph=True)
        check_grads(cid, [g * 2 if g is not None else None for g in expected])
        dist_autograd.backward(cid, [loss])
        check_grads(cid, [g * 3 if g is not None else None for g in expected])
        try:
            dist_autograd.backward(cid, [loss])
        except RuntimeError as exc:
            assert "backward through the graph a second time" in str(exc), str(exc)
        else:
            raise AssertionError("a backward through a freed graph passed")


def a_tensor_sent_twice_accumulates():
    def local(w):
        t = X * w[0]
        return ((t * w[1] * 3 + t * 5) + torch.tanh(t * w[1])).sum()
    with dist_autograd.context() as cid:
        t = X * weight(0)
        a = rpc.rpc_sync("worker1", two_args, args=(t, t, 3, 5))
        b = rpc.rpc_sync("worker1", stage, args=(t,))
        dist_autograd.backward(cid, [(a + b).sum()])
        check_grads(cid, reference(local))


def tensors_that_do_not_require_grad():
    plain = torch.arange(4.0)
    with dist_autograd.context() as cid:
        out = rpc.rpc_sync("worker1", two_args, args=(plain, X * weight(0), 2, 7))
        untouched = rpc.rpc_sync("worker2", torch.add, args=(plain, 1))  # no grad anywhere
        assert not untouched.requires_grad
        dist_autograd.backward(cid, [out.sum()])
        check_grads(cid, reference(lambda w: (plain * w[1] * 2 + X * w[0] * 7).sum()))


def backward_refuses_bad_arguments_in_torchs_words():
    # torch's DistAutogradTest.test_backward_invalid_args
    def refused(error, text, context_id, roots):
        try:
            dist_autograd.backward(context_id, roots)
        except error as exc:
            assert text in str(exc), str(exc)
        else:
            raise AssertionError(f"backward({context_id!r}, {roots!r}) passed")
    with dist_autograd.context() as cid:
        refused(TypeError, "incompatible function arguments", cid, None)
        refused(TypeError, "incompatible function arguments", None, None)
        refused(RuntimeError, "No tensors provided for gradient computation", cid, [])
        refused(RuntimeError, "requires_grad not set on", cid, [torch.rand(3, 3)])
        refused(RuntimeError, "is not a scalar, all roots need to be scalar", cid,
                [torch.rand(3, 3, requires_grad=True)])
        refused(RuntimeError, "does not have a valid gradient function", cid,
                [torch.rand(1, requires_grad=True)])


def an_error_in_a_remote_backward_reaches_the_caller():
    with dist_autograd.context() as cid:
        loss = rpc.rpc_sync("worker1", explode, args=(X * weight(0),)).sum()
        try:
            dist_autograd.backward(cid, [loss])
        except RuntimeError as exc:
            # torch's words, which its own tests match
            assert re.search(r"Error on Node 1: (ValueError: )?boom in a remote backward",
                             str(exc)), str(exc)
        else:
            raise AssertionError("backward passed")


def cleanup_reaches_every_participant():
    with dist_autograd.context() as cid:
        loss = rpc.rpc_sync("worker1", chain, args=(X * weight(0), [2])).sum()
        dist_autograd.backward(cid, [loss])
        assert all(rpc.rpc_sync(f"worker{r}", context_known, args=(cid,)) for r in (1, 2))
    assert not context_known(cid)
    deadline = time.monotonic() + 30
    while any(rpc.rpc_sync(f"worker{r}", context_known, args=(cid,)) for r in (1, 2)):
        assert time.monotonic() < deadline, "a worker still knows the context after 30 s"
        time.sleep(0.01)


def remote_and_to_here():
    with dist_autograd.context() as cid:
        rref = rpc.remote("worker1", stage, args=(X * weight(0),))
        loss = (rref.to_here() * weight(0)).sum()
        dist_autograd.backward(cid, [loss])
        check_grads(cid, reference(lambda w: (torch.tanh(X * w[0] * w[1]) * w[0]).sum()))


def rref_proxies():
    net = rpc.remote("worker2", Det, args=(7,))
    local = Det(7)
    with dist_autograd.context() as cid:
        a = net.rpc_sync().forward(X * weight(0))
        b = net.remote().forward(X - weight(0)).to_here()
        c = net.rpc_async().forward(X).wait()
        dist_autograd.backward(cid, [(a * b + c).sum()])
        w = local_weights()
        ref = (local(X * w[0]) * local(X - w[0]) + local(X)).sum()
        want = torch.autograd.grad(ref, [w[0]] + list(local.parameters()))
        assert_close(dist_autograd.get_gradients(cid)[weight(0)], want[0])
        remote = rpc.rpc_sync("worker2", remote_param_grads, args=(net, cid))
        for got, expected in zip(remote, want[1:]):
            assert_close(got, expected)


def remote_param_grads(module_rref, context_id):
    grads = dist_autograd.get_gradients(context_id)
    return [grads[p] for p in module_rref.local_value().parameters()]


def _train_split(optimizer_class, kwargs, steps=3, local_kwargs=None):
    """Two remote MLPs (on workers 1 and 2), trained with DistributedOptimizer, against
    local training with ``local_kwargs`` (default: the same ``kwargs``)."""
    first = rpc.remote("worker1", Det, args=(1,))
    second = rpc.remote("worker2", Det, args=(2,))
    params = (rpc.rpc_sync("worker1", param_rrefs, args=(first,))
              + rpc.rpc_sync("worker2", param_rrefs, args=(second,)))
    optimizer = DistributedOptimizer(optimizer_class, params, **kwargs)
    local = nn.Sequential(Det(1), Det(2))
    local_optimizer = optimizer_class(local.parameters(), **(local_kwargs or kwargs))
    for step in range(steps):
        x = torch.randn(8, 4, generator=torch.Generator().manual_seed(step))
        with dist_autograd.context() as cid:
            h = first.rpc_sync().forward(x)
            out = second.rpc_sync().forward(h)
            loss = (out - 0.5).pow(2).mean()
            dist_autograd.backward(cid, [loss])
            optimizer.step(cid)
        local_optimizer.zero_grad()
        (local(x) - 0.5).pow(2).mean().backward()
        local_optimizer.step()
        got = (rpc.rpc_sync("worker1", params_of, args=(first,))
               + rpc.rpc_sync("worker2", params_of, args=(second,)))
        for g, want in zip(got, local.parameters()):
            assert_close(g, want.detach(), msg=lambda m: f"step {step}: {m}")
    for owner, module in (("worker1", first), ("worker2", second)):
        grads = rpc.rpc_sync(owner, grads_of, args=(module,))
        assert grads == [None] * len(grads), f"{owner}: a step left .grad set"


def grads_of(module_rref):
    return [p.grad for p in module_rref.local_value().parameters()]


def distributed_optimizer_sgd():
    _train_split(torch.optim.SGD, {"lr": 0.1, "momentum": 0.9})


def distributed_optimizer_adam():
    _train_split(torch.optim.Adam, {"lr": 0.05})


def distributed_optimizer_takes_torchs_defaults_and_arguments():
    # torch makes SGD and Adamax in their functional forms, whose default
    # learning rates (0.01, 0.001) are not the optimizer classes' (0.001, 0.002).
    _train_split(torch.optim.SGD, {}, steps=2, local_kwargs={"lr": 0.01})
    _train_split(torch.optim.Adamax, {}, steps=2, local_kwargs={"lr": 0.001})
    mine = torch.ones(4, requires_grad=True)  # a parameter of this worker's: stepped here
    optimizer = DistributedOptimizer(torch.optim.SGD, [rpc.RRef(mine)])
    with dist_autograd.context() as cid:
        dist_autograd.backward(cid, [(mine * 2).sum()])
        optimizer.step(cid)
    assert_close(mine.detach(), torch.full((4,), 1 - 0.01 * 2))
    assert mine.grad is None
    first = rpc.remote("worker1", Det, args=(1,))
    params = rpc.rpc_sync("worker1", param_rrefs, args=(first,))
    try:  # an argument of SGD's that its functional form lacks
        DistributedOptimizer(torch.optim.SGD, params, lr=0.1, differentiable=True)
    except TypeError as exc:
        assert "differentiable" in str(exc), str(exc)
    else:
        raise AssertionError("DistributedOptimizer took SGD(differentiable=True)")


def distributed_optimizer_step_outside_a_context():
    first = rpc.remote("worker1", Det, args=(1,))
    optimizer = DistributedOptimizer(torch.optim.SGD,
                                     rpc.rpc_sync("worker1", param_rrefs, args=(first,)), lr=0.1)
    try:
        optimizer.step(12345)
    except RuntimeError as exc:
        assert "Could not find autograd context with id: 12345" in str(exc), str(exc)
    else:
        raise AssertionError("a step in a context that does not exist passed")


class FailingOnWorker2(torch.optim.SGD):
    def step(self, closure=None):
        if me() == 2:
            raise ValueError("a step that fails on worker2")
        return super().step(closure)


def an_error_in_one_owners_step_surfaces_and_the_others_step():
    first = rpc.remote("worker1", Det, args=(1,))
    second = rpc.remote("worker2", Det, args=(2,))
    mine = torch.zeros(4, requires_grad=True)  # a parameter of this worker's: stepped here
    params = (rpc.rpc_sync("worker1", param_rrefs, args=(first,))
              + rpc.rpc_sync("worker2", param_rrefs, args=(second,)) + [rpc.RRef(mine)])
    optimizer = DistributedOptimizer(FailingOnWorker2, params, lr=1.0)
    before = rpc.rpc_sync("worker1", params_of, args=(first,))
    with dist_autograd.context() as cid:
        out = second.rpc_sync().forward(first.rpc_sync().forward(X + mine))
        dist_autograd.backward(cid, [out.sum()])
        try:
            optimizer.step(cid)
        except ValueError as exc:  # the remote type, on both
            assert "a step that fails on worker2" in str(exc), str(exc)
        else:
            raise AssertionError("the failed step passed")
    after = rpc.rpc_sync("worker1", params_of, args=(first,))
    assert not torch.equal(before[0], after[0]), "worker1 did not step"
    assert mine.abs().sum() > 0, "this worker did not step"


def remote_module_forward_and_training():
    remote = RemoteModule("worker1/cpu", Det, args=(3,))
    other = RemoteModule("rank:2/cpu", Det, kwargs={"seed": 4})
    local = [Det(3), Det(4)]
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(9))
    assert_close(remote.forward(x), local[0](x).detach())
    assert_close(other.forward_async(x).wait(), local[1](x).detach())
    assert remote.get_module_rref().owner().name == "worker1"
    assert len(remote.remote_parameters()) == 2
    assert_close(rpc.rpc_sync("worker2", forward_through, args=(remote, x)),
                 local[0](x).detach() * 2)
    # torch's test_send_remote_module_over_the_wire: what a receiver gets.
    assert rpc.rpc_sync("worker2", attribute_names, args=(remote,)) == [
        "on", "device", "is_device_map_set", "is_scriptable", "generated_methods",
        "module_rref", "forward_async", "forward"]
    try:
        pickle.dumps(remote)
    except RuntimeError as exc:
        assert "Cannot pickle RemoteModule in python pickler" in str(exc), str(exc)
    else:
        raise AssertionError("plain pickle took a RemoteModule")
    for method in (lambda: remote.parameters(), lambda: remote.to("cpu"),
                   lambda: remote.state_dict()):
        try:
            method()
        except ValueError as exc:
            assert "not supported for RemoteModule" in str(exc), str(exc)
        else:
            raise AssertionError("an nn.Module method that RemoteModule lacks passed")
    optimizer = DistributedOptimizer(torch.optim.SGD,
                                     remote.remote_parameters() + other.remote_parameters(),
                                     lr=0.2)
    local_optimizer = torch.optim.SGD(list(local[0].parameters()) + list(local[1].parameters()),
                                      lr=0.2)
    for step in range(3):
        with dist_autograd.context() as cid:
            loss = other(remote(x)).sum()
            dist_autograd.backward(cid, [loss])
            optimizer.step(cid)
        local_optimizer.zero_grad()
        local[1](local[0](x)).sum().backward()
        local_optimizer.step()
    assert_close(remote.forward(x), local[0](x).detach())
    assert_close(other.forward(x), local[1](x).detach())


def _ddp_trainer(remote, pg_file, steps, lr):
    """A trainer of the ddp_rpc tutorial: its own data through a RemoteModule, then a
    DDP-wrapped Linear; DistributedOptimizer over the Linear. Its parameters after each step."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    rank = me() - 1
    dist.init_process_group("gloo", init_method=f"file://{pg_file}", rank=rank, world_size=2)

    def train():
        model = DistributedDataParallel(Det(7).lin)
        optimizer = DistributedOptimizer(torch.optim.SGD,
                                         [rpc.RRef(p) for p in model.parameters()], lr=lr)
        seen = []
        for step in range(steps):
            with dist_autograd.context() as cid:
                loss = model(remote.forward(_ddp_input(rank, step))).pow(2).mean()
                dist_autograd.backward(cid, [loss])
                optimizer.step(cid)
            assert all(p.grad is None for p in model.parameters()), ".grad was written"
            seen.append([p.detach().clone() for p in model.parameters()])
        return seen

    try:
        # The model dies with train(), before the process group: freed last by
        # DDP's reducer, the group would join gloo's threads with the GIL held
        # while one of them may need it (torch's hang; see the README).
        return train()
    finally:
        dist.destroy_process_group()


def _ddp_input(rank, step):
    return torch.randn(6, 4, generator=torch.Generator().manual_seed(100 * rank + step))


def ddp_trainers_average_their_gradients():
    """DistributedDataParallel under distributed autograd (torch's ddp_rpc tutorial): the
    backward runs DDP's hooks, so both trainers step with the average of their gradients."""
    pg_file = OUTFILE + ".pg"
    remote = RemoteModule("worker0/cpu", Det, args=(5,))
    steps, lr = 3, 0.5
    try:
        futures = [rpc.rpc_async(f"worker{r}", _ddp_trainer, args=(remote, pg_file, steps, lr))
                   for r in (1, 2)]
        first, second = [f.wait() for f in futures]
    finally:
        if os.path.exists(pg_file):
            os.remove(pg_file)
    embed, dense = Det(5), Det(7).lin
    for step in range(steps):
        grads = [torch.autograd.grad(dense(embed(_ddp_input(r, step))).pow(2).mean(),
                                     list(dense.parameters())) for r in (0, 1)]
        with torch.no_grad():
            for p, g0, g1 in zip(dense.parameters(), *grads):
                p -= lr * (g0 + g1) / 2
        for got in (first[step], second[step]):
            for g, want in zip(got, dense.parameters()):
                assert_close(g, want.detach(), msg=lambda m: f"step {step}: {m}")


def _sum(x):
    return (x * weight(me())).sum()


def _identity(x):
    return x


def _raises(fn, text):
    try:
        fn()
    except RuntimeError as exc:
        assert text in str(exc), str(exc)
    else:
        raise AssertionError(f"no error; expected one saying {text!r}")


def rref_backward_on_the_owner_and_from_a_user():
    """``RRef.backward``: distributed from the owner and from a user (run on the
    owner), twice with retain_graph; locally on the owner; torch's errors."""
    t = torch.linspace(0.0, 1.0, 4).requires_grad_()
    w1 = local_weights()[1]
    with dist_autograd.context() as cid:
        rref = rpc.remote("worker1", _sum, args=(t,))
        rref.backward(cid, retain_graph=True)
        rref.backward(cid)
        assert_close(dist_autograd.get_gradients(cid)[t], w1.detach() * 2)
        assert_close(rpc.rpc_sync("worker1", grad_here, args=(cid,)), t.detach() * 2)
        _raises(lambda: rpc.remote("worker1", _identity, args=("foo",)).backward(cid),
                "RRef should contain a tensor for .backward()")
        _raises(lambda: rref.backward(), "User RRefs require 'dist_autograd_ctx_id' to be "
                                         "specified")
    with dist_autograd.context() as cid:
        mine = rpc.rpc_sync("worker1", torch.mul, args=(t, 3.0))
        owned = rpc.RRef(mine.sum())
        owned.backward(cid, retain_graph=True)
        owned.backward(cid)
        assert_close(dist_autograd.get_gradients(cid)[t], torch.full((4,), 6.0))
    local = torch.linspace(0.0, 1.0, 3).requires_grad_()
    rpc.RRef((local * 5).sum()).backward()
    assert_close(local.grad, torch.full((3,), 5.0))
    _raises(lambda: rpc.RRef(torch.rand(3)).backward(), "does not require grad")
    _raises(lambda: rpc.RRef(torch.rand(3, requires_grad=True).sum()).backward(123),
            "Could not find autograd context with id: 123")
    _raises(lambda: rpc.RRef("foo").backward(), "RRef should contain a tensor for .backward()")


SCENARIOS = [one_hop, three_hops_and_back_to_the_caller, several_roots, retain_graph,
             a_tensor_sent_twice_accumulates, tensors_that_do_not_require_grad,
             an_error_in_a_remote_backward_reaches_the_caller,
             backward_refuses_bad_arguments_in_torchs_words, cleanup_reaches_every_participant,
             remote_and_to_here, rref_proxies, distributed_optimizer_sgd,
             distributed_optimizer_adam, distributed_optimizer_takes_torchs_defaults_and_arguments,
             distributed_optimizer_step_outside_a_context,
             an_error_in_one_owners_step_surfaces_and_the_others_step,
             remote_module_forward_and_training, ddp_trainers_average_their_gradients,
             rref_backward_on_the_owner_and_from_a_user]


OUTFILE = sys.argv[2]


def run(rank, outfile):
    rpc.init_rpc(f"worker{rank}", rank=rank, world_size=3)
    if rank == 0:
        results = {}
        for scenario in SCENARIOS:
            try:
                scenario()
            except Exception:  # noqa: BLE001 - reported per scenario
                results[scenario.__name__] = traceback.format_exc()
            else:
                results[scenario.__name__] = "ok"
        classes = [rpc.__name__, dist_autograd.context.__module__,
                   DistributedOptimizer.__module__, RemoteModule.__module__]
        with open(outfile, "w") as f:
            json.dump({"scenarios": results, "modules": classes}, f)
    rpc.shutdown()


if __name__ == "__main__":
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    mp.spawn(run, args=(sys.argv[2],), nprocs=3, join=True)
