"""The elastic worker pool: nesting never starves it; past its hard limit it says so."""

import threading

import pytest

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
    try:
        block_threads(pool, 6, release)  # three times the core size, all blocked at once
        assert pool.thread_count == 6
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
