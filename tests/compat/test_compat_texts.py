"""torch's error texts and private helpers (item 8), on both backends."""

import pytest

import compat_texts as sc
from compat_world import run_world

pytestmark = [pytest.mark.processes, pytest.mark.timeout(240)]


def test_errors_say_what_torchs_say(world):
    assert world.run(sc.error_texts)


def test_the_current_agent_lists_the_workers(world):
    assert world.run(sc.agent_view)


def test_all_gather_barrier_and_rrefs_after_shutdown(backend):
    out = run_world(backend, sc.gather_and_barrier, 4)
    assert sorted(out) == [0, 1, 2, 3]
    for rank, (result, after) in out.items():
        assert result is True
        assert "Cannot call to_here() on it after deletion" in after["to_here"], (rank, after)
        # torch's API guard, anchored, as its test_shutdown_followed_by_rpc matches it.
        assert after["rpc_sync"].startswith("RPC has not been initialized"), (rank, after)


def test_debug_info_parts_add_up(world):
    assert world.run(sc.debug_info_parts)
