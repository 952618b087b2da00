"""Distributed autograd over real worker processes: cleanup across workers, torch's errors."""

import pytest

import autograd_scenarios as scenarios
from world import running

pytestmark = [pytest.mark.processes, pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def world(leak_free):
    with running(3) as w:
        yield w


def test_contexts_are_released_on_every_worker_they_reached(world):
    assert world.run(scenarios.contexts_are_released_everywhere)


def test_errors_in_torchs_words(world):
    assert world.run(scenarios.errors_in_torchs_words)


def test_through_rref_proxies_and_async_execution_replies(world):
    assert world.run(scenarios.through_proxies_and_async_execution)


def test_a_received_tensor_changed_in_place_sends_the_right_gradient(world):
    assert world.run(scenarios.a_received_tensor_changed_in_place_sends_the_right_gradient)
