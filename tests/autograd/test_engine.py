"""One local pass of distributed autograd (agent/autograd_pass.py), against torch's own autograd."""

from __future__ import annotations

import pytest
import torch

from localrref.agent.autograd_pass import (EarlierLeaves, attach_recv, engine_backward,
                                           find_leaves, run_pass, send_node)


def accumulator():
    grads = {}

    def accumulate(leaf, grad):
        grads[leaf] = grads[leaf] + grad if leaf in grads else grad
    return grads, accumulate


def test_a_send_node_shows_the_edges_of_the_tensors_sent_and_is_never_run():
    leaf = torch.ones(3, requires_grad=True)
    other = torch.ones(3, requires_grad=True)
    made = leaf * 2
    with torch.no_grad():  # built whatever the caller's grad mode
        node = send_node([leaf, made, other])
    assert node.name() == "torch::distributed::autograd::SendRpcBackward"
    edges = node.next_functions
    assert [(n.name(), i) for n, i in edges] == [
        ("torch::autograd::AccumulateGrad", 0), ("MulBackward0", 0),
        ("torch::autograd::AccumulateGrad", 0)]
    assert edges[0][0].variable is leaf and edges[2][0].variable is other
    # The tensors' own graph is as it was: a backward through it is unchanged.
    made.sum().backward()
    assert torch.equal(leaf.grad, torch.full((3,), 2.0)) and other.grad is None


def test_leaves_are_found_once_through_shared_subgraphs():
    a = torch.randn(3, requires_grad=True)
    b = torch.randn(3, requires_grad=True)
    c = torch.randn(3)  # no grad: not a leaf of interest
    shared = a * b
    loss = (shared + shared * c).sum() + a.sum()
    leaves = find_leaves([loss])
    assert len(leaves) == 2 and {id(t) for t in leaves} == {id(a), id(b)}
    assert find_leaves([a]) == [a]  # a start that is itself a leaf


def test_a_pass_from_the_roots_matches_torch_and_leaves_grad_alone():
    torch.manual_seed(0)
    w = torch.randn(4, 3, requires_grad=True)
    x = torch.randn(3, requires_grad=True)
    loss = torch.tanh(w @ x).pow(2).sum()
    grads, accumulate = accumulator()
    outgoing = run_pass([loss], [torch.ones(())], accumulate)
    assert outgoing == {}
    expected_w, expected_x = torch.autograd.grad(loss, [w, x], retain_graph=True)
    assert torch.allclose(grads[w], expected_w) and torch.allclose(grads[x], expected_x)
    assert w.grad is None and x.grad is None  # the context holds gradients, not .grad


def test_received_tensors_send_their_gradients_back_by_message_and_index():
    local = torch.randn(2, requires_grad=True)
    # Arrived in one RPC from worker 3, as leaves that require grad.
    other, received = torch.randn(2, requires_grad=True), torch.randn(2, requires_grad=True)
    values = received.detach().clone()
    node = attach_recv([other, received], src=3, message_id=77)
    assert received.grad_fn is node and other.grad_fn is node and not received.is_leaf
    assert node.name() == "torch::distributed::autograd::RecvRpcBackward"
    loss = (local * received).sum()
    grads, accumulate = accumulator()
    outgoing = run_pass([loss], [torch.ones(())], accumulate)
    # The unused index 0 travels back too, as zeros, as from torch's node.
    assert list(outgoing) == [(3, 77)] and sorted(outgoing[(3, 77)]) == [0, 1]
    assert torch.allclose(outgoing[(3, 77)][1], local.detach())
    assert torch.equal(outgoing[(3, 77)][0], torch.zeros(2))
    assert list(grads) == [local] and torch.allclose(grads[local], values)


def test_a_received_tensor_may_change_in_place_and_its_gradient_follows():
    received = torch.ones(3, requires_grad=True)
    attach_recv([received], src=1, message_id=5)
    received.mul_(2)   # torch's error for a leaf that requires grad; fine for a recv
    loss = (received * 3).sum()
    outgoing = run_pass([loss], [torch.ones(())], lambda *_: None)
    torch.testing.assert_close(outgoing[(1, 5)][0], torch.full((3,), 6.0))
    # The graph is kept: a second pass gets the same gradient again, not a sum.
    outgoing = run_pass([loss], [torch.ones(())], lambda *_: None)
    torch.testing.assert_close(outgoing[(1, 5)][0], torch.full((3,), 6.0))


def test_received_views_and_parameters_take_the_node_too():
    base = torch.arange(6.0).reshape(2, 3)
    view = base[1]
    view.requires_grad_()
    param = torch.nn.Parameter(torch.ones(3))
    node = attach_recv([view, param], src=2, message_id=9)
    assert view.grad_fn is node and param.grad_fn is node
    outgoing = run_pass([(view * param).sum()], [torch.ones(())], lambda *_: None)
    torch.testing.assert_close(outgoing[(2, 9)][0], torch.ones(3))
    torch.testing.assert_close(outgoing[(2, 9)][1], torch.tensor([3.0, 4.0, 5.0]))


def test_a_pass_from_a_send_runs_the_graph_again_and_accumulates():
    # The tensors a send carried, with the gradients that came back for them.
    w = torch.randn(3, requires_grad=True)
    sent = w * 2
    grads, accumulate = accumulator()
    for _ in range(2):  # FAST mode: the graph may be entered twice (retained)
        run_pass([sent], [torch.ones(3)], accumulate)
    assert torch.allclose(grads[w], torch.full((3,), 4.0))


def test_starts_without_gradients_or_grad_are_skipped():
    plain = torch.ones(2)
    assert run_pass([plain], [torch.ones(2)], lambda *_: None) == {}
    w = torch.ones(2, requires_grad=True)
    assert run_pass([w * 1], [None], lambda *_: None) == {}


def test_a_second_backward_through_freed_nodes_fails_as_on_torch():
    from localrref.agent.autograd_pass import SECOND_BACKWARD
    from localrref.agent.tape import _free

    a = torch.randn(3, requires_grad=True)
    saved = (a * a).sum()            # MulBackward keeps its inputs: torch frees them
    unsaved = (a + 1).sum()          # AddBackward keeps no tensor: torch can run it again
    for loss, freed_by_torch in ((saved, True), (unsaved, False)):
        first = torch.autograd.grad(loss, [a], retain_graph=False)
        try:
            torch.autograd.grad(loss, [a])
        except RuntimeError as exc:
            assert SECOND_BACKWARD.split(".")[0] in str(exc)
            assert freed_by_torch
        else:
            assert not freed_by_torch
        assert first is not None

    b = torch.randn(3, requires_grad=True)
    for loss, freed_by_torch in (((b * b).sum(), True), ((b + 1).sum(), False)):
        freed = {}
        nodes = []
        run_pass([loss], [torch.ones(())], lambda leaf, grad: None,
                 lambda seen: (nodes.extend(seen), _free(freed, 1, False, seen)))
        # another pass of the same backward (FAST mode) goes through freely
        run_pass([loss], [torch.ones(())], lambda leaf, grad: None,
                 lambda seen: _free(freed, 1, False, seen))
        try:
            run_pass([loss], [torch.ones(())], lambda leaf, grad: None,
                     lambda seen: _free(freed, 2, False, seen))
        except RuntimeError as exc:
            assert str(exc) == SECOND_BACKWARD and freed_by_torch
        else:
            assert not freed_by_torch
    # with retain_graph nothing is marked
    c = torch.randn(3, requires_grad=True)
    loss, freed = (c * c).sum(), {}
    for backward_id in (1, 2, 3):
        run_pass([loss], [torch.ones(())], lambda leaf, grad: None,
                 lambda seen, i=backward_id: _free(freed, i, True, seen))
    assert freed == {}


def test_a_pass_runs_the_hooks_of_each_leafs_accumulator_and_puts_grad_back():
    # DistributedDataParallel's all-reduce starts from hooks on the parameters'
    # accumulators; torch's distributed engine runs them, and so must a pass.
    w = torch.randn(3, requires_grad=True)
    earlier = torch.full((3,), 7.0)
    w.grad = earlier  # left by some local backward: the pass must not touch it
    ran = []
    w.register_post_accumulate_grad_hook(lambda leaf: ran.append(leaf.grad.clone()))
    loss = (w * torch.tensor([1.0, 2.0, 3.0])).sum()
    grads, accumulate = accumulator()
    run_pass([loss], [torch.ones(())], accumulate)
    assert len(ran) == 1 and torch.equal(ran[0], torch.tensor([1.0, 2.0, 3.0]))
    assert torch.equal(grads[w], torch.tensor([1.0, 2.0, 3.0]))  # not 7 + that
    assert w.grad is earlier


def test_a_pass_leaves_no_python_object_in_the_state_its_hooks_capture():
    # A collective a hook starts (DDP's all-reduce) captures the thread's
    # state, and gloo's thread frees it later: a Python object there needs the
    # GIL then, and a trainer that holds it while its process group is
    # destroyed waits for that thread for ever. torch.autograd.backward
    # stashes one for its run; torch's distributed backward does not.
    w = torch.randn(3, requires_grad=True)
    stashed = []
    w.register_hook(lambda grad: stashed.append(torch._C._is_key_in_tls("context")))
    grads, accumulate = accumulator()
    run_pass([(w * 2).sum()], [torch.ones(())], accumulate)
    assert stashed == [False]
    assert torch.allclose(grads[w], torch.full((3,), 2.0))


def test_engine_backward_is_torch_autograd_backward_in_its_results_and_errors():
    # RRef.backward() on an owner outside a context runs it (torch's runs its
    # engine from C++ there too): same gradients, same errors, nothing stashed.
    w = torch.randn(3, requires_grad=True)
    stashed = []
    w.register_hook(lambda grad: stashed.append(torch._C._is_key_in_tls("context")))
    loss = (w * 3).sum()
    engine_backward([loss], retain_graph=False)
    assert stashed == [False] and torch.equal(w.grad, torch.full((3,), 3.0))
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        engine_backward([loss], retain_graph=False)
    with pytest.raises(RuntimeError, match="only for scalar outputs"):
        engine_backward([w * 2])
    with pytest.raises(RuntimeError, match="does not require grad"):
        engine_backward([torch.rand(3)])


def test_passes_on_two_threads_through_one_leaf_keep_their_gradients_apart():
    import threading
    w = torch.randn(256, 256, requires_grad=True)
    results = {}

    def one(scale: float) -> None:
        grads, accumulate = accumulator()
        for _ in range(20):
            grads.clear()
            loss = (w * scale).sum()
            run_pass([loss], [torch.ones(())], accumulate)
            if not torch.equal(grads[w], torch.full_like(w, scale)):
                results[scale] = grads[w]
                return
        results[scale] = None

    threads = [threading.Thread(target=one, args=(s,)) for s in (1.0, 2.0)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results == {1.0: None, 2.0: None}
    assert w.grad is None


class _Held:
    """What an RRef gives its owner: the value itself."""

    def __init__(self, value) -> None:
        self.value = value

    def local_value(self):
        return self.value


def test_optimizer_steps_and_passes_through_one_parameter_do_not_mix(monkeypatch):
    # A parameter server: one trainer's DistributedOptimizer step (of an
    # optimizer torch has no functional form of) sets .grad to its context's
    # gradient while another trainer's pass sets .grad aside.
    import threading

    import localrref.optim as optim
    w = torch.zeros(512, 512, requires_grad=True)
    context_grad = torch.ones(512, 512)
    monkeypatch.setattr(optim.autograd, "get_gradients", lambda context_id: {w: context_grad})
    stepper = optim._LocalOptimizer(torch.optim.SGD, False, [_Held(w)], lr=0.0)
    bad = []

    def passes() -> None:
        grads, accumulate = accumulator()
        for _ in range(200):
            grads.clear()
            run_pass([(w * 2).sum()], [torch.ones(())], accumulate)
            if not torch.equal(grads[w], torch.full_like(w, 2.0)):
                bad.append("a pass saw another gradient")
                return

    def steps() -> None:
        for _ in range(200):
            stepper.step(1)

    threads = [threading.Thread(target=passes), threading.Thread(target=steps)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not bad
    assert torch.equal(context_grad, torch.ones(512, 512)), "a pass added into a context's gradient"
    assert w.grad is None


def test_ddp_bucket_views_are_copied_into_the_context(tmp_path):
    # DDP with gradient_as_bucket_view leaves a view of its bucket in .grad;
    # its next backward overwrites the bucket, and a context keeps its own.
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0,
                            world_size=1)
    try:
        model = DistributedDataParallel(torch.nn.Linear(4, 2), gradient_as_bucket_view=True)
        kept = []
        for step in range(3):  # DDP rebuilds its buckets once, after the first
            grads, accumulate = accumulator()
            x = torch.full((3, 4), float(step + 1))
            run_pass([model(x).sum()], [torch.ones(())], accumulate)
            kept.append(grads[model.module.weight])
        assert torch.equal(kept[0], torch.full((2, 4), 3.0))  # three rows of ones
        assert torch.equal(kept[1], torch.full((2, 4), 6.0))
        assert torch.equal(kept[2], torch.full((2, 4), 9.0))
        assert model.module.weight.grad is None
        del model  # before the group: see _ddp_trainer in split_model_program.py
    finally:
        dist.destroy_process_group()


def test_ddp_over_a_model_split_by_an_rpc_gives_each_pass_the_reduced_gradient(tmp_path):
    # torch's DdpUnderDistAutogradTest.test_backward_ddp_outside, on one
    # worker: DDP wraps a model whose forward leaves through an RPC and comes
    # back, so its parameters are reached by two passes of one backward. The
    # reducer writes the reduced gradients of both layers at the end of the
    # second; the context must hold those (torch's reducer writes into the
    # context), and .grad must stay untouched.
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    class Split(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.fc1 = torch.nn.Linear(4, 3)
            self.fc2 = torch.nn.Linear(3, 1)

        def forward(self, x):
            self.sent = self.fc1(x)
            self.received = self.sent.detach().requires_grad_()  # there and back
            attach_recv([self.received], src=1, message_id=5)
            return self.fc2(self.received).sum()

    def times_ten(state, bucket):  # a reduction that shows whose gradient is kept
        future = torch.futures.Future()
        future.set_result(bucket.buffer() * 10)
        return future

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0,
                            world_size=1)
    try:
        model = DistributedDataParallel(Split())
        model.register_comm_hook(None, times_ten)
        x = torch.randn(5, 4)
        for _ in range(2):
            grads, accumulate = accumulator()
            earlier = EarlierLeaves()
            loss = model(x)
            inner = model.module
            def replace(leaf, grad):
                grads[leaf] = grad
            back = run_pass([loss], [torch.ones(())], accumulate,
                            earlier=earlier, replace=replace)
            run_pass([inner.sent], [back[(1, 5)][0]], accumulate, earlier=earlier,
                     replace=replace)
            expected = torch.autograd.grad(inner.fc2(inner.fc1(x)).sum(),
                                           list(inner.parameters()))
            for param, local in zip(inner.parameters(), expected, strict=True):
                torch.testing.assert_close(grads[param], local * 10)
                assert param.grad is None
        del model, loss  # before the group: see _ddp_trainer in split_model_program.py
    finally:
        dist.destroy_process_group()
