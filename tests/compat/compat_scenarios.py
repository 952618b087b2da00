"""Scenarios that run on rank 0 of a compatibility world; each returns or raises.

Written once against ``compat_backend.rpc``; they must pass on torch and on
localrref alike. Workers are named worker0..worker3. The functions sent to
other workers are defined here too, so every worker can import them.
"""

from __future__ import annotations

import threading

import torch
# localrref.functions.async_execution is this very decorator.
from torch.distributed.rpc.functions import async_execution

import compat_backend as B


def me() -> str:
    return B.rpc.get_worker_info().name


def worker(i: int) -> str:
    return f"worker{i % 4}"


# ------------------------------------------------------------ remote-side functions

def my_function(a, b, c):
    return a + b + c


def my_rref_function(rref_a, rref_b):
    return rref_a.to_here() + rref_b.to_here()


def sum_nested(container):
    """Sum every RRef's value found in nested lists, tuples and dicts."""
    if isinstance(container, dict):
        return sum(sum_nested(v) for v in container.values())
    if isinstance(container, (list, tuple)):
        return sum(sum_nested(v) for v in container)
    return container.to_here()


# ------------------------------------------------------------ item 1: RRefs passed between users

def rref_args_same_owner():
    # torch's test_py_rref_args: both argument RRefs and the result on one worker.
    a = B.rpc.remote(worker(1), torch.add, args=(torch.ones(2, 2), 1))
    b = B.rpc.remote(worker(1), torch.add, args=(torch.ones(2, 2), 2))
    c = B.rpc.remote(worker(1), my_rref_function, args=(a, b))
    torch.testing.assert_close(c.to_here(), torch.ones(2, 2) * 2 + 3)
    return True


def rref_args_user_share(rounds):
    # torch's test_py_rref_args_user_share: owner worker1, user worker2.
    for i in range(rounds):
        a = B.rpc.remote(worker(1), my_function, args=(torch.ones(2, 2), 1, i))
        b = B.rpc.remote(worker(1), my_function, args=(torch.ones(2, 2), 3, 4))
        c = B.rpc.remote(worker(2), my_rref_function, args=(a, b))
        torch.testing.assert_close(c.to_here(), torch.ones(2, 2) * 2 + 8 + i)
        # The same through rpc_sync (torch's test_py_rpc_rref_args).
        torch.testing.assert_close(B.rpc.rpc_sync(worker(2), my_rref_function, args=(a, b)),
                                   torch.ones(2, 2) * 2 + 8 + i)
    return True


def rrefs_nested_in_containers():
    rrefs = [B.rpc.remote(worker(1 + i % 3), torch.mul, args=(torch.ones(3), i + 1))
             for i in range(6)]
    nested = {"list": [rrefs[0], (rrefs[1], rrefs[2])], "tuple": (rrefs[3],),
              "dict": {"deep": [rrefs[4], {"x": rrefs[5]}]}}
    expected = torch.ones(3) * sum(range(1, 7))
    for dst in (1, 2, 3):
        torch.testing.assert_close(B.rpc.rpc_sync(worker(dst), sum_nested, args=(nested,)),
                                   expected)
        torch.testing.assert_close(
            B.rpc.remote(worker(dst), sum_nested, args=(nested,)).to_here(), expected)
    futures = [B.rpc.rpc_async(worker(d), sum_nested, args=(nested,)) for d in (1, 2, 3)]
    for fut in futures:
        torch.testing.assert_close(fut.wait(), expected)
    return True


# ------------------------------------------------------------ the mesh (run_world)

def _sum_and_pass_on(rrefs, hop):
    total = sum(r.to_here() for r in rrefs)
    if hop == 0:
        return total
    nxt = (B.rpc.get_worker_info().id + 1) % 4
    return total + B.rpc.rpc_sync(worker(nxt), _sum_and_pass_on, args=(rrefs, hop - 1))


def mesh_pass_rrefs(rank, world_size):
    """Every rank passes an RRef it owns and one it was given to every other rank
    at once; each receiver fetches them and passes them on to its neighbour."""
    own = B.rpc.RRef(torch.full((2,), float(rank)))
    given = B.rpc.remote(worker(rank + 1), torch.full, args=((2,), float(10 * rank)))
    futures = [B.rpc.rpc_async(worker(dst), _sum_and_pass_on, args=([own, given], 2))
               for dst in range(world_size) if dst != rank]
    values = [fut.wait() for fut in futures]
    return [v.tolist() for v in values]


# ------------------------------------------------------------ item 2: async_execution via proxies

_EVENTS: dict = {}


def _event(name):
    import threading
    return _EVENTS.setdefault(name, threading.Event())


def block_on(name, bound=30.0):
    """Wait until release(name) (the bound only matters if a test fails)."""
    if not _event(name).wait(bound):
        raise RuntimeError(f"event {name} never released")
    return name


def release(name):
    _event(name).set()


def reset(name):
    _EVENTS.pop(name, None)


class AsyncExecutionClass:
    """torch's rpc_test.AsyncExecutionClass: static, class and bound async methods."""

    def __init__(self, z=0):
        self.z = z

    @staticmethod
    @async_execution
    def static_async_add(to, x, y, z):
        return B.rpc.rpc_async(to, torch.add, args=(x, y)).then(lambda fut: fut.wait() + z)

    @classmethod
    @async_execution
    def class_async_add(cls, to, x, y, z):
        ret_fut = torch.futures.Future()
        B.rpc.rpc_async(to, torch.add, args=(x, y)).then(
            lambda fut: ret_fut.set_result(fut.wait() + z))
        return ret_fut

    @async_execution
    def bound_async_add(self, to, x, y, z):
        return B.rpc.rpc_async(to, torch.add, args=(x, y)).then(
            lambda fut: fut.wait() + z + self.z)

    def plain(self, x):
        return x + self.z


def async_execution_through_proxies():
    expected = torch.ones(2, 2) * 2 + 3
    for owner in (worker(1), worker(0)):  # a remote owner, then this worker itself
        rref = B.rpc.remote(owner, AsyncExecutionClass)
        for name in ("static_async_add", "class_async_add", "bound_async_add"):
            args = (worker(2), torch.ones(2, 2), torch.ones(2, 2), 3)
            torch.testing.assert_close(getattr(rref.rpc_sync(), name)(*args), expected)
            torch.testing.assert_close(getattr(rref.rpc_async(), name)(*args).wait(), expected)
            torch.testing.assert_close(getattr(rref.remote(), name)(*args).to_here(), expected)
        torch.testing.assert_close(rref.rpc_sync().plain(torch.ones(2)), torch.ones(2))
        # A fresh RRef object knows no type yet: rpc_async must not block for it.
        fresh = B.rpc.remote(owner, AsyncExecutionClass, args=(1,))
        fut = fresh.rpc_async().bound_async_add(worker(2), torch.ones(2), torch.ones(2), 1)
        torch.testing.assert_close(fut.wait(), torch.ones(2) * 4)
    return True


# The batched RL program of torch's tutorial ("Distributed RPC: batch processing"):
# observers call the agent's @async_execution method through an RRef proxy and
# the agent answers all of them at once, swapping a future under a lock.

class Observer:
    def __init__(self):
        self.id = B.rpc.get_worker_info().id
        self.state = torch.zeros(4)

    def run_episode(self, agent_rref, n_steps):
        actions = []
        for step in range(n_steps):
            action = agent_rref.rpc_sync().select_action(self.id, self.state)
            actions.append(action)
            self.state = self.state + 0.1 * (action + 1)
            agent_rref.rpc_sync().report_reward(self.id, float(action))
        return actions


class BatchAgent:
    def __init__(self, observers):
        import threading
        torch.manual_seed(0)
        self.observers = observers
        self.policy = torch.nn.Linear(4, 2)
        self.lock = threading.Lock()
        self.states = torch.zeros(len(observers), 4)
        self.pending = len(observers)
        self.future_actions = torch.futures.Future()
        self.rewards = {}

    @async_execution
    def select_action(self, ob_id, state):
        index = ob_id - 1
        self.states[index].copy_(state)
        answer = self.future_actions.then(lambda fut: int(fut.wait()[index]))
        with self.lock:
            self.pending -= 1
            if self.pending == 0:
                self.pending = len(self.observers)
                with torch.no_grad():
                    actions = self.policy(self.states).argmax(dim=1)
                ready, self.future_actions = self.future_actions, torch.futures.Future()
                ready.set_result(actions)
        return answer

    def report_reward(self, ob_id, reward):
        with self.lock:
            self.rewards.setdefault(ob_id, []).append(reward)


def batched_rl(rank, world_size):
    if rank != 0:
        return None
    observers = [B.rpc.remote(worker(r), Observer) for r in range(1, world_size)]
    agent = BatchAgent(observers)
    agent_rref = B.rpc.RRef(agent)
    futures = [ob.rpc_async().run_episode(agent_rref, 25) for ob in observers]
    episodes = torch.futures.wait_all(futures)
    counts = {ob_id: len(r) for ob_id, r in agent.rewards.items()}
    return [len(e) for e in episodes], counts


# ------------------------------------------------------------ item 3: futures that fail

def raise_value_error(text="Expected error"):
    raise ValueError(text)


def type_of_a_failed_remote():
    """_get_type() of an RRef whose remote() raised raises that error, blocking or not,
    also once the failure is known here (torch's test_rref_type_with_error_*)."""
    for blocking in (True, False):
        rref = B.rpc.remote(worker(1), raise_value_error)
        # Its failure is known here now (the owner answers the remote() first).
        assert "Expected error" in _raises(ValueError, rref.to_here)

        def get_type(rref=rref, blocking=blocking):
            found = rref._get_type(blocking=blocking)
            return found if blocking else found.wait()
        assert "Expected error" in _raises(ValueError, get_type)
    return True


def failed_futures_raise_the_remote_type():
    """An rpc_async future whose function raised raises that type, as on torch."""
    import time
    bad = B.rpc.rpc_async(worker(1), raise_value_error)
    for get in (bad.wait, bad.value):
        assert "Expected error" in _raises(ValueError, get)
    # A then() callback sees the type from value(); one that lets it escape
    # fails its child with torch's RuntimeError naming it (torch's own rule).
    seen = []

    def inspect(fut):
        seen.append(_raises(ValueError, fut.value))
        return "saw the error"

    assert bad.then(inspect).wait() == "saw the error" and "Expected error" in seen[0]
    text = _raises(RuntimeError, bad.then(lambda fut: fut.value()).wait)
    assert "ValueError" in text and "Expected error" in text
    # torch.futures.wait_all and collect_all raise the type too.
    reset("slow")
    B.rpc.rpc_sync(worker(1), reset, args=("slow",))
    slow = B.rpc.rpc_async(worker(1), block_on, args=("slow",))
    bad = B.rpc.rpc_async(worker(1), raise_value_error)
    _raises(ValueError, bad.wait)
    combined = torch.futures.collect_all([slow, bad])
    if B.is_torch():
        # torch's C++ holds the exception too, so its combinators give up at
        # the first failure. localrref's futures fail in Python only: they
        # wait for every future (the one deliberate difference here, see
        # localrref/agent/futures.py).
        started = time.monotonic()
        assert "Expected error" in _raises(ValueError, torch.futures.wait_all, [slow, bad])
        assert not slow.done() and time.monotonic() - started < 20
        assert combined.done()
    else:
        assert not combined.done()
    B.rpc.rpc_sync(worker(1), release, args=("slow",))
    assert "Expected error" in _raises(ValueError, torch.futures.wait_all, [slow, bad])
    assert slow.wait() == "slow" and combined.done()
    # Its list of futures comes out through their unwrapping.
    assert "Expected error" in _raises(ValueError, combined.wait)
    # rpc_sync raises the remote type on both.
    assert "Expected error" in _raises(ValueError, B.rpc.rpc_sync, worker(1), raise_value_error)
    return True


def wait_all_with_partial_exception():
    # torch's test_wait_all_with_partial_exception.
    futures = [B.rpc.rpc_async(worker(1), torch.add, args=(torch.ones(2), 1)) for _ in range(10)]
    futures.append(B.rpc.rpc_async(worker(1), raise_value_error))
    assert "Expected error" in _raises(ValueError, torch.futures.wait_all, futures)
    return True


def wait_all_block():
    # torch's test_wait_all, test_wait_all_multiple_call and
    # test_wait_all_raise_in_user_func: rpc.api._wait_all() waits, when the
    # block ends, for the futures rpc_async returned in this thread inside it.
    api = B.rpc.api
    others = []
    with api._wait_all():
        assert api._thread_local_var.future_list == []
        fut = B.rpc.rpc_async(worker(1), torch.add, args=(torch.ones(2, 2), 1))
        B.rpc.rpc_sync(worker(1), torch.add, args=(torch.ones(2, 2), 1))
        thread = threading.Thread(target=lambda: others.append(
            B.rpc.rpc_async(worker(1), torch.add, args=(torch.ones(1), 1)).wait()))
        thread.start()
        thread.join()
        # Neither rpc_sync nor another thread's call is collected.
        assert len(api._thread_local_var.future_list) == 1
        assert isinstance(api._thread_local_var.future_list[0], torch._C.Future)
    assert fut.done() and not hasattr(api._thread_local_var, "future_list")
    torch.testing.assert_close(fut.wait(), torch.ones(2, 2) + 1)
    assert others == [torch.ones(1) + 1]
    # A failure reaches the end of the block as the remote type.
    assert "Expected error" in _raises(ValueError, _in_wait_all_block, api, raise_value_error)
    assert not hasattr(api._thread_local_var, "future_list")
    # A proxy's rpc_async joins the block too, once the proxy knows the
    # value's type (before, its call leaves from the thread that learns it).
    rref = B.rpc.remote(worker(1), AsyncExecutionClass, args=(1,))
    torch.testing.assert_close(rref.rpc_sync().plain(torch.ones(1)), torch.ones(1) * 2)
    with api._wait_all():
        proxied = rref.rpc_async().plain(torch.ones(1))
        assert len(api._thread_local_var.future_list) == 1
    torch.testing.assert_close(proxied.wait(), torch.ones(1) * 2)
    return True


def _in_wait_all_block(api, func):
    with api._wait_all():
        B.rpc.rpc_async(worker(1), func)


# ------------------------------------------------------------ item 4: shutdown drains work

_CHAIN_ENDS: list = []


def _hop(left, origin):
    if left == 0:
        _CHAIN_ENDS.append(origin)
        return
    nxt = (B.rpc.get_worker_info().id + 1) % 4
    B.rpc.rpc_async(worker(nxt), _hop, args=(left - 1, origin))  # never waited


def fire_and_forget_chains(rank, world_size):
    """Start a 20-hop chain nobody waits for, then shut down at once."""
    B.rpc.rpc_async(worker(rank + 1), _hop, args=(19, rank))
    return None


def after_shutdown():
    return sorted(_CHAIN_ENDS)


# ------------------------------------------------------------ item 5: torch's exception types

def ident(x):
    return x


@async_execution
def async_wrong_type():
    return torch.zeros(2, 2)


def _call(api, to, func, args=()):
    result = getattr(B.rpc, api)(to, func, args=args)
    if api == "rpc_async":
        return result.wait()
    if api == "remote":
        return result.to_here()
    return result


def _raises(kind, fn, *args):
    try:
        fn(*args)
    except kind as exc:
        return str(exc)
    except BaseException as exc:
        raise AssertionError(f"{fn.__name__}{args} raised {type(exc).__name__}, not "
                             f"{kind.__name__}: {exc}") from None
    raise AssertionError(f"{fn.__name__}{args} raised nothing")


def torchs_exception_types():
    for api in ("rpc_sync", "rpc_async", "remote"):
        for to, named in (("nope", "nope"), (99, "99"), (-1, "-1"),
                          (B.rpc.WorkerInfo("ghost", 1), "ghost")):
            assert named in _raises(RuntimeError, _call, api, to, ident, (1,))
        # A fractional rank is not a name at all: ValueError on both.
        assert "1.5" in _raises(ValueError, _call, api, 1.5, ident, (1,))
        text = _raises(RuntimeError, _call, api, worker(1), async_wrong_type)
        assert "must return a torch.futures.Future object" in text, text
    assert "nope" in _raises(RuntimeError, B.rpc.get_worker_info, "nope")
    return True


def _context_here(context_id):
    """Whether this worker holds a part of ``context_id`` (torch's error text if not)."""
    try:
        return B.autograd._retrieve_context(context_id)._context_id() == context_id
    except RuntimeError as exc:
        assert str(exc).startswith(f"Could not find autograd context with id: {context_id}"), exc
        return False


def _released_everywhere(context_id, workers, bound=30.0):
    # The cleanup travels on its own (torch: an async RPC served by a pool),
    # so each worker is asked until it has let the context go.
    import time
    deadline = time.monotonic() + bound
    for w in workers:
        while B.rpc.rpc_sync(worker(w), _context_here, args=(context_id,)):
            assert time.monotonic() < deadline, f"worker{w} still holds context {context_id}"
    return True


def private_context_calls():
    # torch's DistAutogradTest reaches into contexts through these (cleanup on
    # every worker, known workers, ids); programs' own tests do too.
    ag = B.autograd
    rank = B.rpc.get_worker_info().id
    assert ag._get_max_id() == (rank << 48) + (1 << 48) - 1
    no_current = "Current thread doesn't have a valid autograd context"
    assert no_current in _raises(RuntimeError, ag._current_context)
    with ag.context() as context_id:
        assert context_id >> 48 == rank
        current = ag._current_context()
        assert current._context_id() == context_id
        assert ag._retrieve_context(context_id)._context_id() == context_id
        assert current._known_worker_ids() == set()
        # A builtin operator takes the context along only with tensors that
        # require grad; a Python function always does (its result might).
        B.rpc.rpc_sync(worker(1), torch.add, args=(torch.ones(2), torch.ones(2)))
        assert current._send_functions() == {} and current._recv_functions() == {}
        t1, t2 = torch.ones(3, 3, requires_grad=True), torch.ones(2, requires_grad=True)
        stacked = B.rpc.rpc_sync(worker(2), torch.stack, args=([t1, torch.zeros(3, 3), t1 * 2],))
        assert current._known_worker_ids() == {2}, current._known_worker_ids()
        # The send's node: one edge per tensor that requires grad, in order.
        sends = current._send_functions()
        assert len(sends) == 1, sends
        (send,) = sends.values()
        assert current._send_functions()[next(iter(sends))] is send
        edges = [(node.name(), index) for node, index in send.next_functions]
        assert edges == [("torch::autograd::AccumulateGrad", 0), ("MulBackward0", 0)], edges
        assert send.next_functions[0][0].variable is t1
        assert send.name() == "torch::distributed::autograd::SendRpcBackward", send.name()
        # The reply's tensor is the output of the recv's node, not a leaf.
        recvs = current._recv_functions()
        assert len(recvs) == 1, recvs
        (recv,) = recvs.values()
        assert recv.name() == "torch::distributed::autograd::RecvRpcBackward", recv.name()
        assert stacked.grad_fn == recv and not stacked.is_leaf
        B.rpc.rpc_sync(worker(2), torch.add, args=(t2, 1))
        assert len(current._send_functions()) == 2
        B.rpc.rpc_sync(worker(1), torch.is_grad_enabled)  # a builtin without tensors
        assert current._known_worker_ids() == {2}, current._known_worker_ids()
        B.rpc.rpc_sync(worker(1), ident, args=(1,))
        assert current._known_worker_ids() == {1, 2}, current._known_worker_ids()
        assert B.rpc.rpc_sync(worker(2), _context_here, args=(context_id,))
    gone = f"Could not find autograd context with id: {context_id}"
    assert gone in _raises(RuntimeError, ag._retrieve_context, context_id)
    assert _released_everywhere(context_id, (1, 2))
    # A context without the with block: current until released.
    made = ag._new_context()
    made_id = made._context_id()
    try:
        assert ag._current_context()._context_id() == made_id
        assert "Already have an autograd context id for this thread." in _raises(
            RuntimeError, ag._new_context)
        B.rpc.rpc_sync(worker(3), ident, args=(1,))
        assert made._known_worker_ids() == {3}
    finally:
        ag._release_context(made_id)
    assert no_current in _raises(RuntimeError, ag._current_context)
    assert f"Could not find autograd context with id: {made_id}" in _raises(
        RuntimeError, ag._release_context, made_id)
    assert _released_everywhere(made_id, (3,))
    return True


def _describe_then_double_in_place(t):
    described = (t.is_leaf, t.requires_grad, None if t.grad_fn is None else t.grad_fn.name())
    if t.requires_grad and t.is_leaf:
        return described, None  # torch's error for a leaf that requires grad
    t.mul_(2)
    return described, t * 3


def received_tensors_are_recv_outputs():
    """Inside a context a tensor that arrives requiring grad is an output of its
    message's RecvRpcBackward node (so the callee may change it in place), and
    one that arrives outside any context is a leaf that requires grad."""
    ag = B.autograd
    x = torch.ones(3, requires_grad=True)
    recv = "torch::distributed::autograd::RecvRpcBackward"
    with ag.context():
        described, out = B.rpc.rpc_sync(worker(1), _describe_then_double_in_place, args=(x,))
        assert described == (False, True, recv), described
        assert torch.equal(out.detach(), torch.full((3,), 6.0)) and out.requires_grad
        assert out.grad_fn.name() == recv and not out.is_leaf
    described, out = B.rpc.rpc_sync(worker(1), _describe_then_double_in_place, args=(x,))
    assert described == (True, True, None) and out is None, described
    return True


def _first_times_two(a, b):
    return a * 2


def _both_doubled_and_tripled(x):
    return x * 2, x * 3


def _context_grads(dst, func, *tensors):
    """The gradient of each of ``tensors`` that a distributed backward from the
    sum of ``func(*tensors)``, run on ``dst``, leaves in the caller's context
    (None for one it has none for)."""
    ag = B.autograd
    with ag.context() as context_id:
        out = B.rpc.rpc_sync(dst, func, args=tensors)
        ag.backward(context_id, [out.sum()])
        grads = ag.get_gradients(context_id)
    return [grads.get(t) for t in tensors]


def unused_received_tensors_get_zero_gradients():
    """A received tensor the backward does not reach gets zeros from its message's
    node, once the node runs: the sender's leaf has a zero gradient in the
    context (DistributedOptimizer steps it). The same for a reply's tensors."""
    ag = B.autograd
    t1, t2 = torch.ones(3, requires_grad=True), torch.ones(2, requires_grad=True)
    g1, g2 = _context_grads(worker(1), _first_times_two, t1, t2)
    assert torch.equal(g1, torch.full((3,), 2.0)), g1
    assert torch.equal(g2, torch.zeros(2)), g2
    x = torch.ones(2, requires_grad=True)
    with ag.context() as context_id:
        doubled, _ = B.rpc.rpc_sync(worker(1), _both_doubled_and_tripled, args=(x,))
        ag.backward(context_id, [doubled.sum()])
        assert torch.equal(ag.get_gradients(context_id)[x], torch.full((2,), 2.0))
    return True


def profiled_backward():
    """torch's test_dist_autograd_profiling: a profile of a distributed backward
    shows it, the send whose gradients came back and the recv that sent some."""
    ag = B.autograd
    with ag.context() as context_id:
        t1 = torch.rand(3, 3, requires_grad=True)
        t2 = torch.rand(3, 3, requires_grad=True)
        loss = B.rpc.rpc_sync(worker(1), torch.add, args=(t1, t2)).sum()
        with torch.autograd.profiler.profile() as prof:
            ag.backward(context_id, [loss])
        assert torch.equal(ag.get_gradients(context_id)[t1], torch.ones(3, 3))
    events = prof.function_events

    def first(key):
        # As torch's test reads them: the first event whose name holds the key
        # (autograd also wraps a node's own event in an evaluate_function one).
        return next(e for e in events if key in e.name)

    assert [e.name for e in events].count("torch::distributed::autograd::backward") == 1
    send = first("torch::distributed::autograd::SendRpcBackward")
    recv = first("torch::distributed::autograd::RecvRpcBackward")
    whole = first("torch::distributed::autograd::backward")
    assert send.count == 1 and recv.count == 1
    assert whole.cpu_time_total > send.cpu_time_total
    assert whole.cpu_time_total > recv.cpu_time_total
    return True


def rpc_profiling_events():
    """torch's RPC events under the legacy profiler (what RpcTest's test_rref_type_*
    look for), named as torch names them; none under the default profiler."""
    from torch.autograd.profiler_legacy import profile as legacy_profile

    me = B.rpc.get_worker_info().name
    rref = B.rpc.remote(worker(1), torch.add, args=(torch.ones(2), 1))
    rref.to_here()
    with legacy_profile() as prof:
        B.rpc.rpc_sync(worker(1), ident, args=(1,))
        B.rpc.rpc_async(worker(2), torch.add, args=(torch.ones(2), 1)).wait()
        made = B.rpc.remote(worker(1), ident, args=(2,))
        made.to_here()
        made._get_future().wait()  # its event ends with the owner's confirmation
        first = rref._get_type(blocking=False)
        assert first.wait() is torch.Tensor
        assert rref._get_type(blocking=False) is first  # torch caches the future itself
        rref._get_type()  # cached: no call
        rref.to_here()
        B.rpc.RRef(torch.ones(1)).to_here()  # an owner's: no event
    fetches = [e.name for e in prof.function_events if e.name.startswith("to_here#")]
    assert fetches == [f"to_here#({me})->({worker(1)})"] * 2, fetches  # remote(ident), rref
    # torch also copies the callee's own events into this profile ("...#remote_op:
    # aten::add"); localrref does not.
    names = sorted(e.name for e in prof.function_events
                   if e.name.startswith("rpc_") and "#remote_op:" not in e.name)
    # Every event this worker records carries its rank as the node id (torch's
    # init_rpc sets it), so a profile tells the workers' events apart.
    rank = B.rpc.get_worker_info().id
    local = [e for e in prof.function_events if "#remote_op:" not in e.name]
    assert local and {e.node_id for e in local} == {rank}, {(e.name, e.node_id) for e in local}
    assert names == [f"rpc_async#_rref_typeof_on_owner({me} -> {worker(1)})",
                     f"rpc_async#aten::add({me} -> {worker(2)})",
                     f"rpc_remote#ident({me} -> {worker(1)})",
                     f"rpc_sync#ident({me} -> {worker(1)})"], names
    with torch.autograd.profiler.profile() as prof:
        B.rpc.rpc_sync(worker(1), ident, args=(1,))
    assert not [e.name for e in prof.function_events if e.name.startswith("rpc_")]
    return True


def proxies_look_methods_up_on_the_type():
    """torch's test_rref_proxy_non_exist, and the method that exists."""
    rref = B.rpc.remote(worker(1), my_function, args=(torch.ones(2, 2), 1, 3))
    for make in (lambda: rref.rpc_sync().non_exist(),
                 lambda: rref.rpc_async().non_exist().wait(),
                 lambda: rref.remote().non_exist()):
        assert "has no attribute 'non_exist'" in _raises(AttributeError, make)
    # Again with the type known, and a method that exists.
    assert "has no attribute 'non_exist'" in _raises(
        AttributeError, lambda: rref.rpc_async().non_exist().wait())
    assert rref.rpc_async().size().wait() == torch.Size([2, 2])
    assert rref.remote().view(1, 4).to_here().shape == (1, 4)
    return True


# ------------------------------------------------------------ item 6: messages keep their lines

ESCAPE_MESSAGE = "\nFirst line of error \n next line of error \n last line of error"


def raise_func_escape():
    raise ValueError(ESCAPE_MESSAGE)


def remote_errors_keep_their_lines():
    # torch's test_py_raise_in_user_func_escaped_str, plus rpc_sync.
    for api in ("rpc_sync", "rpc_async"):
        text = _raises(Exception, _call, api, worker(1), raise_func_escape)
        assert text == text.encode("utf-8").decode("unicode_escape"), text
        assert "First line of error \n next line of error" in text
    assert "First line of error" in _raises(ValueError, _call, "rpc_sync", worker(1),
                                            raise_func_escape)
    return True


# ------------------------------------------------------------ item 7: tensor layouts

def _layout(t):
    return (tuple(t.shape), t.stride(), t.storage_offset(), t.is_contiguous(),
            t.untyped_storage().nbytes())


def _torchs_wire_layout(t):
    """What torch's RPC delivers (rpc/utils.cpp cloneSparseTensors): a clone
    when the storage is >= 8 KiB and >= twice the view, else the storage as is."""
    storage = t.untyped_storage().nbytes()
    if storage >= 8 * 1024 and storage >= 2 * t.numel() * t.element_size():
        return _layout(t.clone())
    return _layout(t)


def _layout_cases():
    small = torch.arange(12.).reshape(3, 4)
    big = torch.arange(100_000.).reshape(1000, 100)      # 400 KB: the shared-memory lane
    medium = torch.arange(4_000.).reshape(40, 100)        # 16 KB: inline, but >= 8 KiB
    return {
        "contiguous": small.clone(), "transposed small": small.t(), "transposed big": big.t(),
        "slice small": small[1:], "step small": small[:, ::2], "step big": big[:, ::2],
        "row of big": big[5], "most of big": big[1:], "half of big": big[:500],
        "most of medium": medium[1:], "step medium": medium[:, ::2],
        "expanded": torch.ones(1, 4).expand(3, 4),
        "channels_last": torch.arange(120.).reshape(2, 3, 4, 5).to(memory_format=torch.channels_last),
        "transposed half of big": big[:500].t(),
    }


def layout_of_argument(name):
    return _layout(_layout_cases()[name])


def received_layout(t):
    return _layout(t), t.double().sum().item()


def make_case(name):
    return _layout_cases()[name]


def tensor_layouts_as_torch_delivers_them():
    for name, t in _layout_cases().items():
        expected = _torchs_wire_layout(t)
        got, total = B.rpc.rpc_sync(worker(1), received_layout, args=(t,))
        assert tuple(got) == expected, (name, "argument", got, expected)
        assert total == t.double().sum().item(), name
        back = B.rpc.rpc_sync(worker(1), make_case, args=(name,))
        assert _layout(back) == expected, (name, "return", _layout(back), expected)
        torch.testing.assert_close(back, t)
    return True


# ------------------------------------------------------------ tensors that share a storage

def _storage_sharing_cases():
    """Tensors sent together in one message, by pairs, and whether torch delivers
    the pair on one storage (only views it does not compact keep theirs)."""
    small = torch.arange(16.)                                # inline
    big = torch.arange(float(1 << 17))                        # 512 KiB: shared memory
    medium = torch.arange(4_096.)                             # 16 KiB: inline, >= 8 KiB
    return {
        "small and a slice": ((small, small[2:14]), True),
        "big and its transpose": ((big, big.view(512, 256).t()), True),
        "big and most of it": ((big, big[1:]), True),
        "medium and most of it": ((medium, medium[:3000]), True),
        "two overlapping views of big": ((big[:100_000], big[30_000:]), True),
        "two halves of medium": ((medium[:2048], medium[2048:]), False),  # both compacted
        "big and a row of it": ((big, big[:100]), False),      # the row is compacted
        "two rows of big": ((big[:100], big[100:200]), False),  # both compacted
    }


def _same_storage(a, b) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _pair_shares(pair):
    a, b = pair
    return _same_storage(a, b)


def _storage_pair_of(name):
    return _storage_sharing_cases()[name][0]


def tensors_sharing_a_storage_arrive_sharing_it():
    """torch's pickler writes a storage once per message: views sent together that
    it does not compact (cloneSparseTensors) arrive on one storage, as they left;
    a write through one shows through the other, on either side of the call."""
    for name, (pair, shared) in _storage_sharing_cases().items():
        assert B.rpc.rpc_sync(worker(1), _pair_shares, args=(pair,)) is shared, (name, "argument")
        back = B.rpc.rpc_sync(worker(1), _storage_pair_of, args=(name,))
        assert _same_storage(*back) is shared, (name, "return")
        for got, sent in zip(back, pair):
            torch.testing.assert_close(got, sent)
    # The same tensor twice is one object on arrival, on both engines.
    t = torch.ones(3)
    a, b = B.rpc.rpc_sync(worker(1), ident, args=((t, t),))
    assert a is b
    # A write through one view shows through the other.
    base, view = B.rpc.rpc_sync(worker(1), _storage_pair_of, args=("big and its transpose",))
    base[0] = -1.0
    assert view[0, 0].item() == -1.0
    # Inside a context, gradients of tensors that share a storage still go back
    # to each: w and a view of it arrive as two outputs of the message's node.
    for size in (16, 1 << 17):
        w = torch.ones(size, requires_grad=True)
        grad, _ = _context_grads(worker(1), _sum_and_twice_the_second, w, w[1:])
        expected = torch.full((size,), 3.0)
        expected[0] = 1.0
        assert torch.equal(grad, expected), size
    return True


def _sum_and_twice_the_second(a, b):
    assert a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    b.mul_(1)  # a received tensor may be changed in place, as on torch
    return a.sum() + 2 * b.sum()


# ------------------------------------------------------------ TorchScript functions

@torch.jit.script
def script_add(t1: torch.Tensor, t2: torch.Tensor) -> torch.Tensor:
    return torch.add(t1, t2) * 2


@torch.jit.script
def script_raise(text: str) -> torch.Tensor:
    raise ValueError(text)


def script_functions_run_by_name():
    """torch sends a TorchScript function by its qualified name and runs the
    callee's compiled copy (torch's test_backward_simple_script_call): every
    way of calling, and a distributed backward through it."""
    # torch's callee looks the name up among the functions it compiled, so this
    # module must be imported there first: a call of one of its Python functions
    # does that. (localrref's callee imports the module itself if it must.)
    for i in (1, 2):
        assert B.rpc.rpc_sync(worker(i), ident, args=(i,)) == i
    a, b = torch.ones(2, 2), torch.full((2, 2), 3.0)
    expected = (a + b) * 2
    torch.testing.assert_close(B.rpc.rpc_sync(worker(1), script_add, args=(a, b)), expected)
    torch.testing.assert_close(B.rpc.rpc_async(worker(2), script_add, args=(a, b)).wait(),
                               expected)
    torch.testing.assert_close(B.rpc.remote(worker(1), script_add, args=(a, b)).to_here(),
                               expected)
    torch.testing.assert_close(
        B.rpc.rpc_sync(worker(1), script_add, kwargs={"t1": a, "t2": b}), expected)
    # A TorchScript function's error reaches the caller as a RuntimeError with
    # the interpreter's text (torch's test_wait_all_exit_early_script_function).
    for call in (lambda: B.rpc.rpc_sync(worker(1), script_raise, args=("scripted boom",)),
                 lambda: B.rpc.rpc_async(worker(2), script_raise, args=("scripted boom",)).wait(),
                 lambda: torch.futures.wait_all(
                     [B.rpc.rpc_async(worker(1), script_raise, args=("scripted boom",))])):
        try:
            call()
        except RuntimeError as exc:
            assert "scripted boom" in str(exc), str(exc)
        else:
            raise AssertionError("a TorchScript function's error did not reach the caller")
    t1, t2 = torch.ones(3, requires_grad=True), torch.ones(3, requires_grad=True)
    for grad in _context_grads(worker(1), script_add, t1, t2):
        assert torch.equal(grad, torch.full((3,), 2.0)), grad
    return True
