"""Real agents in one process, without threads or processes (see agent_world.py).

Each test runs a seeded world in milliseconds; the same seed gives the same
schedule. Functions sent between agents live in this module.
"""

from __future__ import annotations

import gc

import pytest
import torch

import localrref
from localrref.agent import current
from localrref.agent.futures import expose, wait
from localrref.control_messages import ArrivalRefused, PeerExited
from localrref.core.rref import UserRRef
from localrref.errors import RPCTimeoutError, UnknownWorkerError, WorkerGoneError

from agent_world import AgentWorld, Stuck


# ------------------------------------------------------------ functions the agents run

def add(a, b):
    return a + b


def raise_value_error(text):
    raise ValueError(text)


def nested_add(dst, a, b):
    return localrref.rpc_sync(dst, add, args=(a, b)) * 10


def sum_of_fetched(*rrefs):
    return sum(r.to_here() for r in rrefs)


def keep_forever(x):
    return x


_KEPT = []


def keep_rref(rref):
    _KEPT.append(rref)
    return rref.to_here()


def name_of(worker):
    return localrref.get_worker_info(worker).name


def fire_and_forget_hops(left, origin):
    if left == 0:
        _CHAIN_ENDS.append(origin)
        return
    me = localrref.get_worker_info().id
    localrref.rpc_async((me + 1) % 3, fire_and_forget_hops, args=(left - 1, origin))


_CHAIN_ENDS = []


# ------------------------------------------------------------ helpers

def call(world, src, dst, func, *args, timeout=-1.0):
    """``rpc_async`` from agent ``src``: the internal future."""
    agent = world.agents[src]
    with current.using(agent):
        return agent.calls.rpc_async(dst, func, args, {}, timeout)


def result(world, future):
    world.run_until(future.done, None, "a reply")
    return wait(future)


@pytest.fixture
def world3():
    with AgentWorld(3, seed=7) as world:
        yield world


# ------------------------------------------------------------ calls

def test_calls_return_values_and_remote_errors_keep_their_type(world3):
    assert result(world3, call(world3, 0, 1, add, 2, 3)) == 5
    future = call(world3, 0, 2, raise_value_error, "nope")
    with pytest.raises(ValueError, match="(?s)On WorkerInfo\\(id=2, name=worker2\\).*nope"):
        result(world3, future)
    # So does the future the application gets, from wait() and value(), as
    # torch's RPC futures do; a then() callback that lets it escape fails its
    # own future with torch's RuntimeError naming it.
    exposed = expose(call(world3, 0, 2, raise_value_error, "again"))
    world3.run_until(exposed.done)
    for get in (exposed.wait, exposed.value):
        with pytest.raises(ValueError, match="(?s)On WorkerInfo\\(id=2, name=worker2\\).*again"):
            get()
    with pytest.raises(RuntimeError, match="(?s)ValueError.*again"):
        exposed.then(lambda fut: fut.wait()).wait()


def test_a_job_may_make_a_nested_rpc_sync(world3):
    assert result(world3, call(world3, 0, 1, nested_add, 2, 3, 4)) == 70


def test_tensors_travel_inline_without_a_pool(world3):
    t = torch.arange(12.0).reshape(3, 4).t()
    back = result(world3, call(world3, 0, 1, keep_forever, t))
    assert torch.equal(back, t) and back.stride() == t.stride()


# ------------------------------------------------------------ remote, to_here, forks

def test_remote_then_to_here_and_rrefs_passed_to_a_third_worker(world3):
    a0 = world3.agents[0]
    with current.using(a0):
        a = a0.calls.remote(1, add, (torch.ones(2), 1), {}, -1.0)
        b = a0.calls.remote(1, add, (torch.ones(2), 2), {}, -1.0)
        fetched = a0.calls.fetch(a._record, -1.0)
    torch.testing.assert_close(result(world3, fetched), torch.ones(2) * 2)
    # torch's test_py_rref_args_user_share, at the agent level: two RRefs of
    # worker 1 go to worker 2, whose job fetches both.
    total = result(world3, call(world3, 0, 2, sum_of_fetched, a, b))
    torch.testing.assert_close(total, torch.ones(2) * 5)
    del a, b, fetched
    gc.collect()
    world3.run_until(lambda: all(agent.core.tables_empty() for agent in world3.agents),
                     None, "every table to empty")


def test_an_rref_kept_by_its_receiver_is_reported_at_shutdown(world3):
    a0 = world3.agents[0]
    with current.using(a0):
        rref = a0.calls.remote(1, add, (torch.ones(2), 1), {}, -1.0)
    result(world3, call(world3, 0, 2, keep_rref, rref))
    del rref
    gc.collect()
    leaks = world3.shutdown()
    held = [r for r in leaks[2] if r["state"] == "confirmed_user"]
    assert len(held) == 1 and held[0]["owner_rank"] == 1 and held[0]["holder_rank"] == 2
    _KEPT.clear()


# ------------------------------------------------------------ timeouts, deaths

def test_a_call_that_gets_no_reply_times_out_with_torchs_text(world3):
    world3.delay(1, 0)  # worker 1's reply would come only once nothing else can happen
    future = call(world3, 0, 1, add, 1, 1, timeout=5.0)
    world3.network.route = lambda src, dst, frame: (src, dst) != (1, 0)  # ... and never does
    started = world3.clock.now
    with pytest.raises(RPCTimeoutError, match="RPC ran for more than set timeout \\(5000 ms\\)"):
        result(world3, future)
    assert world3.clock.now - started == pytest.approx(5.0)


def test_a_dead_peer_fails_pending_calls_at_once_naming_it(world3):
    world3.network.route = lambda src, dst, frame: dst != 1  # worker 1 hangs, then dies
    future = call(world3, 0, 1, add, 1, 1)
    world3.settle()
    assert not future.done()
    started = world3.clock.now
    world3.kill(1)
    with pytest.raises(WorkerGoneError, match="worker rank 1 \\('worker1'\\), pid 10001, was "
                                              "killed by signal SIGKILL") as info:
        result(world3, future)
    assert info.value.rank == 1 and world3.clock.now == started  # no timeout involved
    with pytest.raises(WorkerGoneError):
        result(world3, call(world3, 2, 1, add, 1, 1))
    assert result(world3, call(world3, 2, 0, add, 1, 1)) == 2  # the survivors go on


class _PoolShutDownUnder:
    """An executor that worker 1's shutdown(graceful=False) stops just as a request arrives."""

    def __init__(self, agent) -> None:
        self.agent = agent

    def submit(self, fn, *args) -> None:
        self.agent.closing = True
        raise RuntimeError("the worker pool is shut down")


@pytest.mark.timeout(60)
def test_a_call_that_reaches_a_worker_shutting_down_fails_naming_it(world3):
    # The world runs jobs on the reading thread; here worker 1 hands its job
    # to the pool instead, as a worker's reader does when it keeps reading.
    jobs = world3.agents[1].jobs
    inline, jobs.executor = jobs.executor, _PoolShutDownUnder(world3.agents[1])
    jobs.run = jobs.submit
    try:
        with pytest.raises(RuntimeError, match="worker 'worker1' shut down RPC before it could "
                                               "run this call"):
            result(world3, call(world3, 0, 1, add, 1, 1))
    finally:
        world3.agents[1].closing = False
        jobs.executor = inline
        del jobs.run
    assert result(world3, call(world3, 0, 1, add, 1, 1)) == 2


# ------------------------------------------------------------ the handshake and shutdown

def test_a_name_resolves_once_the_handshake_completes():
    # Worker 2 hears from worker 0 last; worker 1 calls it first, and the
    # function names worker 0 (before the fix: UnknownWorkerError).
    world = AgentWorld(3, seed=3)
    try:
        world.delay(0, 2)
        world.say_hello()
        world.settle()
        assert world.agents[1]._handshake.complete and not world.agents[2]._handshake.complete
        assert result(world, call(world, 1, 2, name_of, "worker0")) == "worker0"
    finally:
        world.close()


def test_graceful_shutdown_lets_fire_and_forget_chains_finish(world3):
    for origin in range(3):
        call(world3, origin, (origin + 1) % 3, fire_and_forget_hops, 12, origin)
    world3.shutdown()
    assert sorted(_CHAIN_ENDS) == [0, 1, 2]
    _CHAIN_ENDS.clear()


def test_unknown_names_are_still_refused(world3):
    with current.using(world3.agents[0]):
        with pytest.raises(UnknownWorkerError, match="unknown worker name 'nobody'"):
            localrref.rpc_async("nobody", add, args=(1, 2))


def test_a_schedule_is_a_pure_function_of_its_seed():
    def run(seed):
        with AgentWorld(3, seed=seed) as world:
            futures = [call(world, s, d, add, s, d) for s in range(3) for d in range(3)]
            world.run_until(lambda: all(f.done() for f in futures))
            return world.trace

    assert run(11) == run(11)
    assert run(11) != run(12)


def test_a_wait_that_nothing_can_end_is_named():
    world = AgentWorld(2, seed=0)
    try:
        world.network.route = lambda src, dst, frame: False  # every frame is lost
        world.say_hello()
        with pytest.raises(Stuck, match="every peer to call init_rpc"):
            world.agents[0].block_until(lambda: world.agents[0]._handshake.complete, None,
                                        "every peer to call init_rpc")
    finally:
        world.close()


def test_user_rrefs_are_user_records(world3):
    a0 = world3.agents[0]
    with current.using(a0):
        rref = a0.calls.remote(1, add, (1, 2), {}, -1.0)
    assert isinstance(rref._record, UserRRef)
    assert result(world3, a0.calls.fetch(rref._record, -1.0)) == 3


def test_a_peer_that_dies_after_the_handshake_does_not_fail_init():
    # Under load the thread in init_rpc may wake only after a peer that had
    # answered its hello already died: init succeeded all the same.
    world = AgentWorld(3)
    try:
        world.say_hello()
        world.settle()
        assert all(agent._handshake.complete for agent in world.agents)
        world.kill(1)
        with current.using(world.agents[2]):
            world.agents[2].await_peers(60.0)
        assert result(world, call(world, 2, 0, add, 1, 1)) == 2
        with pytest.raises(WorkerGoneError):
            result(world, call(world, 2, 1, add, 1, 1))
    finally:
        world.close()


def test_a_peer_that_left_after_its_init_returned_does_not_fail_a_slower_init():
    # torch's test_local_shutdown: every rank calls init_rpc, then
    # shutdown(graceful=False) at once. Rank 0 met everyone and left while
    # rank 1 still waited for rank 2's answer: the world had formed, so
    # rank 1's init_rpc succeeds, and only calls to rank 0 fail.
    world = AgentWorld(3)
    try:
        world.delay(2, 1)
        world.say_hello()
        world.settle()
        assert world.agents[0]._handshake.complete
        assert not world.agents[1]._handshake.complete
        world.leave_formed(0)
        with current.using(world.agents[1]):
            world.agents[1].await_peers(60.0)
        assert result(world, call(world, 1, 2, add, 1, 1)) == 2
        with pytest.raises(WorkerGoneError, match="left the world without a graceful shutdown"):
            result(world, call(world, 1, 0, add, 1, 1))
    finally:
        world.close()


def test_a_peer_that_dies_before_answering_fails_init_naming_it():
    world = AgentWorld(3)
    try:
        world.delay(0, 2)
        world.say_hello()
        world.settle()
        assert not world.agents[2]._handshake.complete
        world.kill(0)
        with current.using(world.agents[2]), pytest.raises(WorkerGoneError, match="rank 0"):
            world.agents[2].await_peers(60.0)
    finally:
        world.close()


def test_a_refusal_and_a_death_heard_before_saying_hello_fail_init_with_the_refusal():
    # torch's test_duplicate_name_2 on a rendezvous: rank 2 was refused (its
    # name was taken), so rank 0 left at once; rank 1's reader heard both
    # before rank 1's thread said hello. Saying hello to the dead rank 0 is
    # no error of its own: init_rpc fails with the refusal, which says why.
    world = AgentWorld(3)
    try:
        world.agents[0].say_hello()
        world._from_supervisor(1, ArrivalRefused(rank=2, pid=10_002, reason="name taken"))
        world._depart(0, PeerExited(rank=0, pid=10_000, exitcode=None, left=True, formed=False),
                      None)
        late = world.agents[1]
        while world.network.pending(1):
            late.reader.step()
        assert 0 in late.dead
        with current.using(late):
            late.say_hello()
            with pytest.raises(RuntimeError, match="cannot form.*rank 2 was refused: name taken"):
                late.await_peers(60.0)
    finally:
        world.close()
