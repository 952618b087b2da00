"""Fixtures of the compatibility suite: one world per backend and test module.

The torch half is opt-in (``-m torch_compat``): it proves the tests encode
torch's behaviour. CI runs the localrref half.
"""

import pytest

import leak_audit
from compat_world import World

BACKEND_PARAMS = [pytest.param("localrref", id="localrref"),
                  pytest.param("torch", id="torch", marks=pytest.mark.torch_compat)]


@pytest.fixture(scope="module", params=BACKEND_PARAMS)
def world(request):
    """A 4-worker world of the backend; scenarios run on rank 0. The audit checks
    that it leaves nothing behind."""
    with leak_audit.Audit(shm_prefixes=("lrr_",)) as audit:
        w = World(request.param, 4)
        try:
            yield w
        finally:
            w.close()
    audit.report().raise_if_leaking()


@pytest.fixture(params=BACKEND_PARAMS)
def backend(request):
    """The backend's name, for tests that start worlds of their own."""
    return request.param
