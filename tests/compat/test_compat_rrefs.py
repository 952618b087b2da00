"""RRefs passed between users (issue 10, item 1), on torch and on localrref."""

import pytest

import compat_scenarios as sc
from compat_world import run_world

pytestmark = [pytest.mark.processes, pytest.mark.timeout(240)]


def test_rref_args_with_the_same_owner(world):
    assert world.run(sc.rref_args_same_owner)


def test_rref_args_shared_with_a_third_worker(world):
    assert world.run(sc.rref_args_user_share, 20)


def test_rrefs_nested_in_lists_tuples_and_dicts(world):
    assert world.run(sc.rrefs_nested_in_containers)


def test_a_mesh_of_workers_passing_rrefs_they_own_and_were_given(backend):
    out = run_world(backend, sc.mesh_pass_rrefs, 4)
    for rank, (values, _) in out.items():
        # Three hops each: own value `rank` and given value `10 * rank`, fetched 3 times.
        assert values == [[33.0 * rank] * 2] * 3, (rank, values)
