"""What graceful shutdown finishes first (item 4), on torch and on localrref."""

import pytest

import compat_scenarios as sc
from compat_world import run_world

pytestmark = [pytest.mark.processes, pytest.mark.timeout(240)]


def test_shutdown_lets_fire_and_forget_chains_finish(backend):
    out = run_world(backend, sc.fire_and_forget_chains, 4)
    ends = sorted(origin for _, after in out.values() for origin in after)
    assert ends == [0, 1, 2, 3], out
