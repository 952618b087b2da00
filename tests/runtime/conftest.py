import os

import psutil
import pytest


def _lrr_shm():
    return sorted(n for n in os.listdir("/dev/shm") if n.startswith("lrr_"))


@pytest.fixture(scope="module")
def leak_free():
    """Every process test module ends with no child process and no /dev/shm segment of ours."""
    before_shm = set(_lrr_shm())
    yield
    me = psutil.Process()
    # multiprocessing's resource tracker lives as long as the test process.
    children = [c for c in me.children(recursive=True) if "resource_tracker" not in
                " ".join(_cmdline(c))]
    gone, alive = psutil.wait_procs(children, timeout=10)
    for proc in alive:
        proc.kill()
    assert not alive, f"processes left behind: {[p.pid for p in alive]}"
    left = sorted(set(_lrr_shm()) - before_shm)
    assert not left, f"/dev/shm segments left behind: {left}"


def _cmdline(proc):
    try:
        return proc.cmdline()
    except psutil.Error:
        return []
