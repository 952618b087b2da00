"""Scenarios that run on rank 0 of a test world (see world.py); each returns or raises.

Workers are named worker0..worker{n-1}. Functions the scenarios send to
other workers are defined here too, so every worker can import them.
Nothing here sleeps to synchronise: blocking callees wait on events that a
later call releases, with generous bounds that only matter if a test fails.
"""

from __future__ import annotations

import gc
import os
import threading
import time

import torch

import localrref as rpc
from localrref.errors import RPCTimeoutError, RRefCreationError

_EVENTS: dict[str, threading.Event] = {}
_EVENTS_LOCK = threading.Lock()
_STORE: dict[str, object] = {}


def _event(name: str) -> threading.Event:
    with _EVENTS_LOCK:
        return _EVENTS.setdefault(name, threading.Event())


# ------------------------------------------------------------ remote-side functions

def add(a, b):
    return a + b


def whoami():
    return rpc.get_worker_info().name


def raise_value_error(text):
    raise ValueError(text)


def block_until(name, bound=30.0):
    """Wait until release(name) is called (the bound only matters if a test fails)."""
    if not _event(name).wait(bound):
        raise RuntimeError(f"event {name} never released")
    return name


def release(name):
    _event(name).set()


def reset(name):
    with _EVENTS_LOCK:
        _EVENTS.pop(name, None)


def fail_after_event(name):
    block_until(name)
    raise KeyError("creation failed on purpose")


def nested_ping(depth, dst_a, dst_b):
    if depth == 0:
        return rpc.get_worker_info().name
    return rpc.rpc_sync(dst_b, nested_ping, args=(depth - 1, dst_b, dst_a))


def rref_sum(rref):
    return rref.to_here().sum().item()


def rref_confirmed_and_value(rref):
    return rref.confirmed_by_owner(), rref.to_here()


def keep(key, value):
    _STORE[key] = value
    return True


def drop(key):
    _STORE.pop(key, None)
    gc.collect()
    return True


def pass_on(rref, dst):
    return rpc.rpc_sync(dst, rref_sum, args=(rref,))


def make_tensor(n_bytes, fill):
    return torch.full((n_bytes // 4,), float(fill), dtype=torch.float32)


def mutate_and_sum(t):
    total = t.sum().item()
    t.add_(1000)
    return total


def ones_like_plus(t):
    return t + 1


class NeedsTwoArgs(Exception):
    def __init__(self, a, b):
        super().__init__(f"{a} {b}")


def raise_needs_two():
    raise NeedsTwoArgs(1, 2)


class Unpicklable:
    def __reduce__(self):
        raise TypeError("Unpicklable refuses to be pickled")

    def __repr__(self):
        return "<Unpicklable object>"


def return_unpicklable():
    return {"fine": 1, "bad": Unpicklable()}


def debug_counter(key):
    return int(rpc.get_debug_info()[key])


def counters_everywhere(keys):
    """The sum over every worker of these protocol counters."""
    n = rpc.api.current.require().world_size
    return sum(rpc.rpc_sync(f"worker{r}", debug_counter, args=(key,))
               for r in range(n) for key in keys)


def wait_tables_empty(timeout=20.0):
    """Event-driven wait until this worker's protocol tables are empty (else its counters)."""
    if rpc.api._wait_until_tables_empty(timeout):
        return True
    return {k: v for k, v in rpc.get_debug_info().items() if v != "0"}


@rpc.functions.async_execution
def async_add_chain(dst, a, b):
    return rpc.rpc_async(dst, add, args=(a, b)).then(lambda fut: fut.wait() * 10)


class Counter:
    def __init__(self, start):
        self.value = start

    def increment(self, by=1):
        self.value += by
        return self.value

    def get(self):
        return self.value


# ------------------------------------------------------------ scenarios (on rank 0)

def basic_calls():
    assert rpc.rpc_sync("worker1", add, args=(2, 3)) == 5
    assert rpc.rpc_sync(1, add, args=(2,), kwargs={"b": 4}) == 6
    info = rpc.get_worker_info("worker2")
    assert (info.name, info.id) == ("worker2", 2)
    assert rpc.rpc_sync(info, whoami) == "worker2"
    assert rpc.rpc_sync("worker0", add, args=(1, 1)) == 2, "calls to self"
    futures = [rpc.rpc_async(f"worker{i % 3}", add, args=(i, i)) for i in range(30)]
    assert torch.futures.wait_all(futures) == [2 * i for i in range(30)]
    chained = rpc.rpc_async("worker1", add, args=(1, 2)).then(lambda f: f.wait() + 1)
    assert chained.wait() == 4
    collected = torch.futures.collect_all([rpc.rpc_async(1, add, args=(1, 1))]).wait()
    assert collected[0].wait() == 2
    assert rpc.get_worker_info().name == "worker0"
    return True


def remote_and_rref_api():
    rref = rpc.remote("worker1", add, args=(torch.ones(2), 1))
    assert not rref.is_owner() and rref.owner_name() == "worker1"
    assert rref.owner().id == 1
    assert torch.equal(rref.to_here(), torch.full((2,), 2.0))
    assert rref._get_future().wait() is True
    assert rref.confirmed_by_owner()
    with __import__("pytest").raises(RuntimeError, match=r"can't call localValue\(\) on user"):
        rref.local_value()
    mine = rpc.remote("worker0", add, args=(3, 4))
    assert mine.is_owner() and mine.local_value() == 7 and mine.to_here() == 7
    local = rpc.RRef({"a": 1})
    assert local.is_owner() and local.owner_name() == "worker0"
    assert rpc.rpc_sync("worker2", rref_confirmed_and_value, args=(local,)) == (True, {"a": 1})
    counter = rpc.remote("worker2", Counter, args=(10,))
    assert counter.rpc_sync().increment(5) == 15
    assert counter.rpc_async().increment().wait() == 16
    doubled = counter.remote().get()
    assert doubled.to_here() == 16
    return repr(rref)


def remote_exception_keeps_type_and_traceback():
    import pytest
    with pytest.raises(ValueError) as info:
        rpc.rpc_sync("worker1", raise_value_error, args=("kaboom",))
    text = str(info.value)
    assert "On WorkerInfo(id=1, name=worker1)" in text and "kaboom" in text
    assert "raise_value_error" in text and "Traceback" in text
    with pytest.raises(RuntimeError, match="Failed to create original exception type "
                                           "NeedsTwoArgs"):
        rpc.rpc_sync("worker2", raise_needs_two)
    return True


def timeouts():
    import pytest
    reset("t1")
    started = time.monotonic()
    with pytest.raises(RPCTimeoutError, match="RPC ran for more than set timeout"):
        rpc.rpc_sync("worker1", block_until, args=("t1",), timeout=0.3)
    assert time.monotonic() - started < 10
    rpc.rpc_sync("worker2", release, args=("t1",))  # worker2's event: harmless
    rpc.rpc_sync("worker1", release, args=("t1",))
    assert rpc.get_rpc_timeout() == 60.0
    rpc.set_rpc_timeout(0.3)
    try:
        reset("t2")
        with pytest.raises(RPCTimeoutError):
            rpc.rpc_sync("worker1", block_until, args=("t2",))
        # 0 means no limit for this call
        reset("t3")
        future = rpc.rpc_async("worker1", block_until, args=("t3",), timeout=0)
        rpc.rpc_sync("worker1", release, args=("t3",), timeout=10)
        assert future.wait() == "t3"
    finally:
        rpc.set_rpc_timeout(60.0)
        rpc.rpc_sync("worker1", release, args=("t2",))
    return True


def failed_remote_poisons_every_use():
    import pytest
    reset("f1")
    rref = rpc.remote("worker1", fail_after_event, args=("f1",))
    waiter = rpc.rpc_async("worker0", rref_sum, args=(rref,)) if False else None
    assert waiter is None
    rpc.rpc_sync("worker1", release, args=("f1",))
    with pytest.raises(KeyError, match="creation failed on purpose"):
        rref.to_here()
    # The creation future the application gets raises the remote type too.
    with pytest.raises(KeyError, match="creation failed on purpose"):
        rref._get_future().wait()
    with pytest.raises(RRefCreationError, match="cannot be shared"):
        rpc.rpc_sync("worker2", rref_sum, args=(rref,))
    # A proxy asks the value's type first: that fails as to_here() does (torch's too).
    with pytest.raises(KeyError, match="creation failed on purpose"):
        rref.rpc_sync().get()
    return True


def timed_out_remote_wakes_blocked_to_here():
    import pytest
    reset("r1")
    rref = rpc.remote("worker1", block_until, args=("r1",), timeout=0.5)
    started = time.monotonic()
    with pytest.raises(RRefCreationError, match="RRef creation via rpc.remote\\(\\) timed out"):
        rref.to_here(timeout=0)  # no limit of its own: woken by the creation timeout
    assert time.monotonic() - started < 10
    with pytest.raises(RRefCreationError, match="timed out"):
        rpc.rpc_sync("worker2", rref_sum, args=(rref,))
    rpc.rpc_sync("worker1", release, args=("r1",))
    return True


def rrefs_as_arguments_and_results():
    rref = rpc.remote("worker1", torch.ones, args=(4,))
    assert rpc.rpc_sync("worker2", rref_sum, args=(rref,)) == 4.0       # user -> user
    # A user function runs only once the RRefs among its arguments are
    # confirmed by their owner (torch's pending-RRef recording).
    confirmed, value = rpc.rpc_sync("worker2", rref_confirmed_and_value, args=(rref,))
    assert confirmed is True and torch.equal(value, torch.ones(4))
    assert rpc.rpc_sync("worker1", rref_sum, args=(rref,)) == 4.0       # user -> owner
    assert rpc.rpc_sync("worker2", pass_on, args=(rref, "worker1")) == 4.0
    local = rpc.RRef(torch.arange(3.0))
    assert rpc.rpc_sync("worker1", rref_sum, args=(local,)) == 3.0      # owner -> user
    assert rpc.rpc_sync("worker0", rref_sum, args=(local,)) == 3.0      # owner -> self
    nested = rpc.rpc_sync("worker2", add, args=([rref], [local]))       # inside containers
    assert [type(r).__name__ for r in nested] == ["RRef", "RRef"]
    assert nested[1].is_owner() and nested[0].owner_name() == "worker1"
    assert rpc.rpc_sync("worker2", keep, args=("k", {"x": [rref, local]}))
    assert rpc.rpc_sync("worker2", drop, args=("k",))
    del rref, local, nested
    gc.collect()
    for worker in ("worker0", "worker1", "worker2"):
        state = rpc.rpc_sync(worker, wait_tables_empty)
        assert state is True, (worker, state)
    return True


def fork_churn_returns_to_zero(n=50):
    for _ in range(n):
        rref = rpc.remote("worker1", torch.zeros, args=(2,))
        rpc.rpc_sync("worker2", rref_sum, args=(rref,))
        del rref
    gc.collect()
    for worker in ("worker0", "worker1", "worker2"):
        state = rpc.rpc_sync(worker, wait_tables_empty)
        assert state is True, (worker, state)
    return rpc.rpc_sync("worker1", debug_counter, args=("num_owner_rrefs",))


def nested_calls_do_not_deadlock():
    futures = [rpc.rpc_async("worker1", nested_ping, args=(5 + i % 2, "worker1", "worker2"))
               for i in range(24)]
    return sorted(set(torch.futures.wait_all(futures)))


def wait_on_torch_future_of_call(dst):
    # torch's own Future.wait (C++): nothing of localrref sees this thread block.
    return rpc.rpc_async(dst, whoami).wait()


def blocked_functions_do_not_stall_the_inbox(blocked=6):
    """Served functions that block where localrref cannot see (an Event, a torch
    Future's C++ wait, a then-callback) must not stop the callee from reading:
    each is released or answered by a message that arrives after it blocked."""
    names = [f"stall{i}" for i in range(blocked)]
    for name in names:
        rpc.rpc_sync("worker1", reset, args=(name,))
    waiting = [rpc.rpc_async("worker1", block_until, args=(name,)) for name in names]
    # Each release travels after its blocked call, to the same inbox.
    for name in names:
        rpc.rpc_sync("worker1", release, args=(name,))
    assert torch.futures.wait_all(waiting) == names
    assert rpc.rpc_sync("worker1", wait_on_torch_future_of_call, args=("worker2",)) == "worker2"
    # A then-callback that blocks, attached before the reply comes (a future
    # already done runs it at once, in this thread, as torch does).
    for name in ("cb", "cb_go"):
        reset(name)
        rpc.rpc_sync("worker1", reset, args=(name,))
    chained = rpc.rpc_async("worker1", block_until, args=("cb_go",)).then(
        lambda f: block_until("cb"))
    rpc.rpc_sync("worker1", release, args=("cb_go",))
    assert rpc.rpc_sync("worker2", add, args=(1, 2)) == 3
    release("cb")
    assert chained.wait() == "cb"
    return True


def call_back_when_released(dst, go, name):
    block_until(go)
    return rpc.rpc_sync(dst, release, args=(name,))


def a_caller_that_blocks_elsewhere_still_serves():
    """rank 0's thread keeps the inbox between its rpc_syncs (wait_reply parks it);
    when it then blocks outside localrref, calls into rank 0 must still be served."""
    for name in ("go", "served"):
        reset(name)
        rpc.rpc_sync("worker1", reset, args=(name,))
    callback = rpc.rpc_async("worker1", call_back_when_released, args=("worker0", "go", "served"))
    for _ in range(3):
        rpc.rpc_sync("worker1", add, args=(1, 1))   # the last one leaves the inbox parked here
    rpc.rpc_sync("worker1", release, args=("go",))  # worker1 now calls release("served") here
    assert _event("served").wait(30), "a call into a parked worker was never served"
    callback.wait()
    return True


def _calls_out_with_pauses(dst, n, pause_s):
    """n rpc_syncs to ``dst``, each after ``pause_s`` of work that releases the
    GIL (longer than a reader's spin); returns how many replies reached this
    thread through another one."""
    before = int(rpc.get_debug_info()["agent.fallback_waits"])
    for _ in range(n):
        time.sleep(pause_s)  # the caller's own step, not a synchronisation
        rpc.rpc_sync(dst, add, args=(1, 1))
    return int(rpc.get_debug_info()["agent.fallback_waits"]) - before


def a_function_that_calls_out_reads_its_own_replies(n=30):
    """A job on worker1 calls worker0 every few ms (a trainer's loop). The watch
    gives its parked inbox to an IO thread, which then sleeps in poll; the job's
    next call must take the inbox back rather than have every reply handed over."""
    handed = rpc.rpc_sync("worker1", _calls_out_with_pauses, args=("worker0", n, 0.003))
    assert handed <= n // 3, f"{handed} of {n} replies were handed over by another thread"
    return True


class _PickledWhere:
    """A value that notes the thread that pickles it (the one serving a to_here)."""

    threads: list = []

    def __reduce__(self):
        _PickledWhere.threads.append(threading.current_thread().name)
        return (int, (5,))


def _fetch(rref):
    return rref.to_here()


def a_fetch_that_reaches_a_waiting_caller_is_served_by_it(n=20):
    """worker1 fetches a value owned by worker0 while worker0's main thread waits
    in rpc_sync for worker1's answer, reading its own inbox: it serves the fetch
    itself (no user code runs there), rather than handing it to the pool."""
    _PickledWhere.threads = []
    for _ in range(n):
        assert rpc.rpc_sync("worker1", _fetch, args=(rpc.RRef(_PickledWhere()),)) == 5
    served = _PickledWhere.threads
    assert len(served) == n
    pooled = [name for name in served if name.startswith("localrref-worker")]
    assert not pooled, f"{len(pooled)} of {n} fetches were served by the pool: {served}"
    assert served.count("MainThread") >= n // 2, served
    return True


def _slow_after(name, calls):
    """Wait for release(name), then make ``calls`` round trips before returning."""
    block_until(name)
    for _ in range(calls):
        rpc.rpc_sync("worker2", add, args=(1, 1))
    return name


def _release_on(dst, name):
    return rpc.rpc_sync(dst, release, args=(name,))


def replies_to_several_waits_are_completed_by_the_waiting_thread(rounds=10):
    """The DistributedOptimizer pattern: a thread sends several calls and then reads
    their replies itself (Reader.wait_replies). A reply that overtakes the one
    listed first is completed on that thread too, not handed to the pool."""
    from localrref.agent import current
    from localrref.agent.futures import wait

    agent = current.get()
    completed_on = []
    for i in range(rounds):
        name = f"several_{i}"
        rpc.rpc_sync("worker1", reset, args=(name,))  # this thread now holds the inbox
        slow = agent.calls.rpc_async(1, _slow_after, (name, 20), {}, -1, will_wait=True)
        fast = agent.calls.rpc_async(2, _release_on, ("worker1", name), {}, -1, will_wait=True)
        for future in (slow, fast):
            future.add_done_callback(
                lambda _f: completed_on.append(threading.current_thread().name))
        agent.reader.wait_replies([slow, fast])
        assert (wait(slow), wait(fast)) == (name, None)
    assert completed_on == ["MainThread"] * (2 * rounds), completed_on
    return True


def many_threads_at_once(threads=8, calls=50):
    results = []
    errors = []

    def caller(i):
        try:
            for j in range(calls):
                results.append(rpc.rpc_sync(f"worker{1 + (i + j) % 2}", add, args=(i, j)))
        except BaseException as exc:
            errors.append(exc)

    pool = [threading.Thread(target=caller, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(60)
    assert not errors, errors
    return len(results)


def async_execution_chains():
    return rpc.rpc_sync("worker1", async_add_chain, args=("worker2", 2, 3))


def tensors_keep_value_semantics(sizes=(16, 4096, 1 << 20, 16 << 20)):
    for size in sizes:
        mine = torch.full((size // 4,), 1.0)
        assert rpc.rpc_sync("worker1", mutate_and_sum, args=(mine,)) == size // 4
        assert torch.all(mine == 1.0), "the callee's write reached the caller"
        theirs = rpc.rpc_sync("worker1", make_tensor, args=(size, 3))
        assert theirs.numel() == size // 4 and torch.all(theirs == 3.0)
        theirs.add_(1)
        again = rpc.rpc_sync("worker1", make_tensor, args=(size, 3))
        assert torch.all(again == 3.0)
    param = torch.nn.Parameter(torch.ones(3))
    back = rpc.rpc_sync("worker2", add, args=(param, 0))
    assert back.requires_grad
    echoed = rpc.rpc_sync("worker2", keep, args=("p", param))
    assert echoed
    rpc.rpc_sync("worker2", drop, args=("p",))
    view = torch.arange(100.0).reshape(10, 10).t()[2:5]
    assert torch.equal(rpc.rpc_sync("worker1", ones_like_plus, args=(view,)), view + 1)
    return True


def bad_input_gets_clear_errors():
    import pytest
    with pytest.raises(ValueError, match="unknown worker name 'nobody'"):
        rpc.rpc_sync("nobody", add, args=(1, 2))
    with pytest.raises(ValueError, match="unknown worker rank 7"):
        rpc.rpc_sync(7, add, args=(1, 2))
    with pytest.raises(ValueError, match="Cannot get WorkerInfo from name 1.5"):
        rpc.rpc_sync(1.5, add, args=(1, 2))
    with pytest.raises(TypeError, match="Unpicklable"):
        rpc.rpc_sync("worker1", add, args=(Unpicklable(), 1))
    assert rpc.rpc_sync("worker1", add, args=(1, 1)) == 2, "the callee stays healthy"
    with pytest.raises(TypeError, match="Unpicklable"):
        rpc.rpc_sync("worker1", return_unpicklable)
    assert rpc.rpc_sync("worker1", add, args=(2, 2)) == 4
    with pytest.raises(TypeError, match="not picklable"):
        rpc.rpc_sync("worker1", lambda: 1)
    with pytest.raises(RuntimeError, match="already initialized"):
        rpc.init_rpc("worker0")
    with pytest.raises(RuntimeError, match="can only be pickled when using RPC"):
        __import__("pickle").dumps(rpc.RRef(1))
    missing = _function_only_rank0_has()
    with pytest.raises(Exception, match="lrr_only_on_rank0"):
        rpc.rpc_sync("worker1", missing)
    return True


def _load_only_in(pid):
    """Unpickles only in process ``pid``: elsewhere it raises (see LoadsOnlyHere)."""
    import os
    if os.getpid() != pid:
        raise ValueError(f"LoadsOnlyHere refuses to be unpickled outside pid {pid}")
    return "loaded"


class LoadsOnlyHere:
    """Pickles anywhere; unpickles only in the process that made it."""

    def __init__(self):
        import os
        self.pid = os.getpid()

    def __reduce__(self):
        return (_load_only_in, (self.pid,))


def make_loads_only_here():
    return LoadsOnlyHere()


def raise_in_the_function():
    raise ValueError("the function itself failed")


def exceptions_at_every_stage_of_a_call():
    """The crash matrix's exception row: an exception while pickling the arguments,
    unpickling them at the callee, running the function, pickling the result, or
    unpickling it at the caller; for rpc_sync, rpc_async and remote() + to_here.
    Each fails that call only, naming the exception; the tables end empty."""
    import pytest
    stages = [
        ("pickling the arguments", add, (Unpicklable(), 1), TypeError, "Unpicklable"),
        ("unpickling the arguments at the callee", add, (LoadsOnlyHere(), 1), Exception,
         "LoadsOnlyHere refuses to be unpickled"),
        ("running the function", raise_in_the_function, (), ValueError, "the function itself"),
        ("pickling the result", return_unpicklable, (), TypeError, "Unpicklable"),
        ("unpickling the result at the caller", make_loads_only_here, (), Exception,
         "LoadsOnlyHere refuses to be unpickled"),
    ]
    for stage, fn, args, kind, text in stages:
        with pytest.raises(kind, match=text):
            rpc.rpc_sync("worker1", fn, args=args)
        with pytest.raises(Exception, match=text):
            rpc.rpc_async("worker1", fn, args=args).wait()
        if stage != "pickling the arguments":
            with pytest.raises(Exception, match=text):
                rpc.remote("worker1", fn, args=args).to_here()
        else:
            with pytest.raises(kind, match=text):
                rpc.remote("worker1", fn, args=args)
        assert rpc.rpc_sync("worker1", add, args=(1, 1)) == 2, f"after {stage}"
        assert rpc.rpc_sync("worker2", add, args=(1, 2)) == 3, f"after {stage}"
    gc.collect()
    for worker in ("worker0", "worker1"):
        left = (wait_tables_empty() if worker == "worker0"
                else rpc.rpc_sync(worker, wait_tables_empty))
        assert left is True, (worker, left)
    return True


def _function_only_rank0_has():
    import importlib
    import sys
    import tempfile
    # Once imported, the module lives in sys.modules: its file can go.
    with tempfile.TemporaryDirectory(prefix="lrr_mod_") as directory:
        with open(os.path.join(directory, "lrr_only_on_rank0.py"), "w") as f:
            f.write("def hello():\n    return 'hi'\n")
        sys.path.insert(0, directory)
        try:
            return importlib.import_module("lrr_only_on_rank0").hello
        finally:
            sys.path.remove(directory)


def threads_and_debug_info():
    info = rpc.get_debug_info()
    for key in ("num_owner_rrefs", "num_pending_futures", "num_pending_users", "num_forks"):
        assert key in info and isinstance(info[key], str)
    return int(info["agent.threads"])


def _dump_core():
    from localrref.agent import current
    core = current.get().core
    gc.collect()
    out = []
    for fork_id, rec in list(core.confirmed_users.items()):
        refs = [type(r).__name__ for r in gc.get_referrers(rec)]
        out.append((str(rec.rref_id), str(fork_id), rec.holds, rec.timed_out,
                    repr(rec.creation_error)[:80], refs))
    return out


def open_fds():
    return len(os.listdir("/proc/self/fd"))


def thousands_of_tensors_in_flight(count=1000, n_bytes=128 * 1024):
    before = (open_fds(), rpc.rpc_sync("worker1", open_fds))
    tensors = [torch.full((n_bytes // 4,), float(i)) for i in range(count)]
    futures = [rpc.rpc_async("worker1", mutate_and_sum, args=(t,)) for t in tensors]
    sums = torch.futures.wait_all(futures)
    assert sums == [float(i) * (n_bytes // 4) for i in range(count)]
    back = [rpc.rpc_async("worker1", make_tensor, args=(n_bytes, i)) for i in range(count)]
    received = torch.futures.wait_all(back)
    assert all(float(t[0]) == i for i, t in enumerate(received))
    after = (open_fds(), rpc.rpc_sync("worker1", open_fds))
    del received, tensors
    return before, after


class _Cycle:
    def __init__(self, rref):
        self.rref = rref
        self.me = self


def rrefs_dropped_anywhere_are_deleted():
    # Dropped in a then-callback (the agent's reader thread), in other threads,
    # and as cyclic garbage found by the collector (which may run in any thread).
    done = []
    for _ in range(20):
        rref = rpc.remote("worker1", torch.ones, args=(2,))
        fut = rpc.rpc_async("worker2", rref_sum, args=(rref,))
        fut.then(lambda f, r=[rref]: done.append(r.pop()) or done.pop()).wait()
        del rref
    threads = []
    for _ in range(8):
        def hold_and_drop():
            r = rpc.remote("worker2", torch.zeros, args=(3,))
            r.to_here()
        threads.append(threading.Thread(target=hold_and_drop))
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for _ in range(20):
        _Cycle(rpc.remote("worker1", torch.ones, args=(1,)))
    gc.collect()
    for worker in ("worker0", "worker1", "worker2"):
        state = rpc.rpc_sync(worker, wait_tables_empty)
        assert state is True, (worker, state)
    return True


def zero_copy_opt_in_is_copy_on_write_for_receivers():
    shared = rpc.share_tensor(torch.full((1 << 18,), 2.0))
    assert rpc.rpc_sync("worker1", mutate_and_sum, args=(shared,)) == 2.0 * (1 << 18)
    assert torch.all(shared == 2.0), "a receiver's write must never reach the sender"
    return True


def _owner_counters():
    info = rpc.get_debug_info()
    return {"worker1.live_rrefs": float(info["num_owner_rrefs"]),
            "worker1.fds": float(len(os.listdir("/proc/self/fd")))}


def growth_of_live_rrefs_per_step(leak):
    """The auditor's growth mode inside a world: one RRef kept per step is caught."""
    import leak_audit
    kept = []

    def step():
        rref = rpc.remote("worker1", torch.zeros, args=(4,))
        rref.to_here()
        if leak:
            kept.append(rref)
            return
        del rref
        state = rpc.rpc_sync("worker1", wait_tables_empty, args=(10.0,))
        assert state is True, state

    report = leak_audit.measure_growth(
        step, warmup=5, times=8, batches=4, include_self=False,
        probes=lambda: rpc.rpc_sync("worker1", _owner_counters))
    kept.clear()
    gc.collect()
    return {name: verdict.status.value if hasattr(verdict.status, "value") else str(verdict.status)
            for name, verdict in _verdicts(report).items()}


def _verdicts(report):
    out = {}
    for verdict in report.verdicts:
        out[str(verdict.kind.value if hasattr(verdict.kind, "value") else verdict.kind)] = verdict
    return out
