import pytest

import leak_audit


@pytest.fixture(scope="module")
def leak_free():
    """Every process test module ends clean: the leak auditor checks children, threads,
    file descriptors and /dev/shm (localrref's segments are named lrr_<world>_...)."""
    with leak_audit.Audit(shm_prefixes=("lrr_",)) as audit:
        yield
    audit.report().raise_if_leaking()
