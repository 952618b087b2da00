"""async_execution through RRef proxies (item 2) and futures that fail (item 3)."""

import pytest

import compat_scenarios as sc
from compat_world import run_world

pytestmark = [pytest.mark.processes, pytest.mark.timeout(240)]


def test_async_execution_methods_through_rref_proxies(world):
    assert world.run(sc.async_execution_through_proxies)


def test_a_batched_rl_program_through_proxies_runs_to_completion(backend):
    out = run_world(backend, sc.batched_rl, 3)
    lengths, counts = out[0][0]
    assert lengths == [25, 25] and counts == {1: 25, 2: 25}


def test_failed_futures_raise_the_remote_type(world):
    assert world.run(sc.failed_futures_raise_the_remote_type)


def test_type_of_a_failed_remote(world):
    assert world.run(sc.type_of_a_failed_remote)


def test_wait_all_with_a_partial_exception(world):
    assert world.run(sc.wait_all_with_partial_exception)


def test_a_wait_all_block_waits_for_this_threads_rpc_async_futures(world):
    assert world.run(sc.wait_all_block)
