"""The elastic worker pool: nesting never starves it; past its hard limit it says so."""

import ctypes
import os
import threading

import pytest
import torch

from localrref.agent.pool import ElasticPool, PoolExhaustedError


def block_threads(pool, count, release):
    """Submit ``count`` jobs that block until ``release``; return once all run."""
    started = threading.Semaphore(0)

    def blocked():
        started.release()
        release.wait(20)

    for _ in range(count):
        pool.submit(blocked)
    for _ in range(count):
        assert started.acquire(timeout=10)
    return blocked


@pytest.mark.timeout(30)
def test_blocked_jobs_get_new_threads_beyond_the_core_size():
    pool = ElasticPool(2, max_threads=8, idle_timeout=5)
    release = threading.Event()
    assert pool.sizes() == (2, 2)  # torch's figures: its fixed size, all idle
    try:
        block_threads(pool, 1, release)
        assert pool.sizes() == (2, 1)
        block_threads(pool, 5, release)  # three times the core size, all blocked at once
        assert pool.thread_count == 6 and pool.sizes() == (6, 0)
    finally:
        release.set()
        assert pool.shutdown() == []


@pytest.mark.timeout(30)
def test_past_the_hard_limit_a_named_error_instead_of_a_hang():
    pool = ElasticPool(1, max_threads=3, idle_timeout=5)
    release = threading.Event()
    try:
        blocked = block_threads(pool, 3, release)
        with pytest.raises(PoolExhaustedError, match="all 3 localrref worker threads are busy"):
            pool.submit(blocked)
    finally:
        release.set()
        assert pool.shutdown() == []


def _openmp_threads_of_this_thread() -> int:
    """OpenMP's thread count for the calling thread, asked of torch's own libgomp
    (asking torch would apply torch's setting first, which is what is tested)."""
    path = next(line.split()[-1] for line in open("/proc/self/maps") if "libgomp" in line)
    return ctypes.CDLL(path).omp_get_max_threads()


@pytest.fixture
def one_torch_thread():
    if (os.cpu_count() or 1) < 2:
        pytest.skip("needs 2 CPUs: with one, OpenMP's default is already one thread")
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_threads_that_run_user_code_take_the_process_torch_thread_setting(one_torch_thread):
    # The program set one thread; BLAS and oneDNN kernels in a job must not
    # open an OpenMP team per core on a pool thread (its idle members spin).
    seen = []
    done = threading.Event()
    pool = ElasticPool(2)
    try:
        pool.submit(lambda: (seen.append(_openmp_threads_of_this_thread()), done.set()))
        assert done.wait(10)
    finally:
        pool.shutdown(5)
    bare = []
    thread = threading.Thread(target=lambda: bare.append(_openmp_threads_of_this_thread()))
    thread.start()
    thread.join(10)
    assert bare[0] > 1, "a bare thread should still have OpenMP's default here"
    assert seen == [1]
