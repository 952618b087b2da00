"""Distributed autograd scenarios, run on rank 0 of a live 3-worker world (test_autograd_world)."""

from __future__ import annotations

import time

import torch

import localrref as rpc
import localrref.autograd as dist_autograd


def _contexts_here() -> int:
    return len(rpc.api.current.require().autograd_tape().core.contexts())


def _times_two(x):
    return x * 2


def _nested(x):
    return rpc.rpc_sync("worker2", _times_two, args=(x,)) + 1


def _wait_until(predicate, bound: float = 30.0) -> bool:
    deadline = time.monotonic() + bound
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def contexts_are_released_everywhere():
    w = torch.ones(3, requires_grad=True)
    with dist_autograd.context() as context_id:
        loss = rpc.rpc_sync("worker1", _nested, args=(w,)).sum()
        info = rpc.get_debug_info()  # torch's counters, and the send/recv tables
        assert (info["num_autograd_contexts"], info["num_send_functions"],
                info["num_recv_functions"]) == ("1", "1", "1"), info
        # torch's two counters, and only those (torch's test_debug_info).
        assert dist_autograd._get_debug_info() == {"num_autograd_contexts": 1,
                                                   "num_current_backward_passes": 0}
        dist_autograd.backward(context_id, [loss])
        grads = dist_autograd.get_gradients(context_id)
        assert torch.equal(grads[w], torch.full((3,), 2.0)) and w.grad is None
        # Every worker the context reached holds it until the block ends.
        assert [rpc.rpc_sync(f"worker{r}", _contexts_here) for r in (1, 2)] == [1, 1]
    assert _contexts_here() == 0
    assert rpc.get_debug_info()["num_autograd_contexts"] == "0"
    # The cleanup travels worker 0 -> 1 -> 2 (worker 0 never called worker 2).
    assert _wait_until(lambda: [rpc.rpc_sync(f"worker{r}", _contexts_here)
                                for r in (1, 2)] == [0, 0])
    return True


def errors_in_torchs_words():
    with dist_autograd.context() as context_id:
        try:
            with dist_autograd.context():
                pass
        except RuntimeError as exc:
            assert "Already have an autograd context id for this thread" in str(exc)
        else:
            raise AssertionError("a nested context was allowed")
    for call in (lambda: dist_autograd.backward(context_id, [torch.ones((), requires_grad=True)]),
                 lambda: dist_autograd.get_gradients(context_id)):
        try:
            call()
        except RuntimeError as exc:
            assert f"Could not find autograd context with id: {context_id}" in str(exc), exc
        else:
            raise AssertionError("a released context was found")
    # Calls outside a context carry no context: the peer records nothing.
    rpc.rpc_sync("worker1", _times_two, args=(torch.ones(2, requires_grad=True),))
    assert rpc.rpc_sync("worker1", _contexts_here) == 0
    return True


class _Scale:
    def __init__(self):
        self.w = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)

    def forward(self, x):
        return x * self.w

    def grad_of_w(self, context_id):
        return dist_autograd.get_gradients(context_id)[self.w]


@rpc.functions.async_execution
def _async_square(x):
    future = torch.futures.Future()
    future.set_result(x * x)
    return future


def through_proxies_and_async_execution():
    owner = rpc.remote("worker1", _Scale)
    x = torch.ones(3, requires_grad=True)
    with dist_autograd.context() as context_id:
        y = owner.rpc_sync().forward(x)                       # a proxy call
        z = owner.rpc_async().forward(y).wait()               # and an async one
        loss = rpc.rpc_sync("worker2", _async_square, args=(z,)).sum()
        dist_autograd.backward(context_id, [loss])
        grads = dist_autograd.get_gradients(context_id)
        w_grad = owner.rpc_sync().grad_of_w(context_id)
    # Reference: loss = sum((x * w * w)^2); d/dx = 2 x w^4, d/dw = 4 x^2 w^3
    w = torch.tensor([1.0, 2.0, 3.0])
    assert torch.allclose(grads[x], 2 * w ** 4), grads[x]
    assert torch.allclose(w_grad, 4 * w ** 3), w_grad
    return True


def _double_in_place(t):
    t.mul_(2)
    return t * 3


def a_received_tensor_changed_in_place_sends_the_right_gradient():
    x = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    with dist_autograd.context() as context_id:
        out = rpc.rpc_sync("worker1", _double_in_place, args=(x,))
        loss = (out * out).sum()
        dist_autograd.backward(context_id, [loss])
        got = dist_autograd.get_gradients(context_id)[x]
        recvs = dist_autograd._current_context()._recv_functions()
        assert list(recvs.values()) == [out.grad_fn], recvs
    local = x.detach().clone().requires_grad_()
    y = local * 1
    y.mul_(2)
    ((y * 3) ** 2).sum().backward()
    torch.testing.assert_close(got, local.grad)
    return True
