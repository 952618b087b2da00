"""The worker pool that runs user functions: elastic, so nesting never deadlocks.

torch runs user functions on a fixed pool of ``num_worker_threads`` threads; a
function that makes a nested ``rpc_sync`` blocks its thread, and enough of
them at once starve the pool of the threads that would answer (a classic
distributed deadlock). Here a job submitted while every thread is busy gets a
new thread, up to ``max_threads``; threads beyond ``num_worker_threads`` exit
after ``idle_timeout`` seconds without work. Past ``max_threads`` the job
fails with :class:`PoolExhaustedError`, which names the limit, instead of
waiting forever.

Threads: the submitting thread (any), and the pool's own threads, which take
jobs from one ``SimpleQueue``. ``_lock`` guards the counters and the thread set,
and orders every accepted job before shutdown's stop sentinels.
"""

from __future__ import annotations

import queue
import threading

from ..errors import LocalRRefError
from .current import mark_serving, runs_user_code

__all__ = ["ElasticPool", "PoolExhaustedError"]


class PoolExhaustedError(LocalRRefError):
    """Every one of the pool's threads is busy and the hard limit is reached."""


class ElasticPool:
    def __init__(self, num_worker_threads: int, *, max_threads: int = 512,
                 idle_timeout: float = 30.0, name: str = "localrref-worker") -> None:
        if num_worker_threads < 1:
            raise ValueError(f"num_worker_threads must be >= 1, got {num_worker_threads}")
        self.core_threads = num_worker_threads
        self.max_threads = max(max_threads, num_worker_threads)
        self.idle_timeout = idle_timeout
        self.name = name
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0
        self._idle = 0
        self._closed = False
        self._all: set[threading.Thread] = set()
        self._local = threading.local()

    @property
    def thread_count(self) -> int:
        return self._threads

    def sizes(self) -> tuple[int, int]:
        """``(size, idle)`` as torch's fixed pool reports them: the configured
        size (or more, while the pool has grown), and how many of those are
        not running a job now."""
        with self._lock:
            size = max(self.core_threads, self._threads)
            return size, size - (self._threads - self._idle)

    def in_pool_thread(self) -> bool:
        return getattr(self._local, "pool", None) is self

    def submit(self, fn, *args) -> None:
        """Run ``fn(*args)`` on a pool thread; raises PoolExhaustedError at the limit."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the worker pool is shut down")
            start = self._idle == 0
            if start:
                if self._threads >= self.max_threads:
                    raise PoolExhaustedError(
                        f"all {self.max_threads} localrref worker threads are busy (nested RPCs "
                        f"waiting on each other?); raise max_threads or make fewer nested "
                        f"blocking calls")
                self._threads += 1
            else:
                self._idle -= 1
            # All under the lock that shutdown takes: a job accepted here is
            # queued ahead of shutdown's stop sentinels, and a thread started
            # here is one shutdown joins. (Started outside it, a thread could
            # slip past shutdown and still be running torch code when the
            # interpreter finalizes, which aborts the process.)
            self._jobs.put((fn, args))
            if start:
                # Dead threads leave the set here, never from their own
                # finally: a thread that has returned from _work still frees
                # its frame, and shutdown must join it (see
                # Agent._start_io_thread_locked for what else could happen).
                self._all = {t for t in self._all if t.is_alive()}
                thread = threading.Thread(target=self._work,
                                          name=f"{self.name}-{self._threads}", daemon=True)
                self._all.add(thread)
                thread.start()

    def _work(self) -> None:
        mark_serving()
        runs_user_code()
        self._local.pool = self
        while True:
            try:
                item = self._jobs.get(timeout=self.idle_timeout)
            except queue.Empty:
                with self._lock:
                    # Past the core size an idle thread retires; a job
                    # that raced in is picked up by the get below.
                    if self._threads > self.core_threads and self._idle > 0:
                        self._idle -= 1
                        self._threads -= 1
                        return
                continue
            if item is None:
                return
            fn, args = item
            try:
                fn(*args)
            except BaseException:  # jobs report their own errors
                pass
            finally:
                del fn, args, item
            with self._lock:
                if self._closed:
                    return
                self._idle += 1

    def shutdown(self, timeout: float = 5.0) -> list[str]:
        """Stop every thread; return the names of those that did not stop in time."""
        with self._lock:
            self._closed = True
            threads = list(self._all)
        for _ in threads:
            self._jobs.put(None)
        stuck = []
        for thread in threads:
            if thread is threading.current_thread():
                continue
            thread.join(timeout)
            if thread.is_alive():
                stuck.append(thread.name)
        return stuck
