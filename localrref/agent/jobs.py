"""Jobs: the user functions peers ask this worker to run, and their replies.

An ``Execute`` effect of the core is a job: a call (``rpc_sync``/
``rpc_async`` from a peer), a ``remote()`` whose result becomes an
OwnerRRef's value, or a fetch of such a value (``to_here()`` from a peer).
:meth:`Jobs.run` unpickles the function and its arguments (RRefs among them
arrive as records the core prepared), runs it, pickles the result (forking
its RRefs) and reports to the core, which answers the caller. A function
decorated with ``@rpc.functions.async_execution`` returns a future; the job
finishes when that future does, on whichever thread completes it.

Which thread touches what: the inbox's reader runs the jobs it reads itself
(see ``reader.py`` for why); jobs that arrive while a caller reads its own
reply, and effects handed off that way, run on the pool
(:class:`~localrref.agent.pool.ElasticPool`, or inline in a test world
without threads). A job touches the core only under the agent's lock, and
never holds the lock while user code or pickling runs.
"""

from __future__ import annotations

import logging
import sys
import threading

import torch

from ..codec.pickler import dumps_exception, wrap_exception
from ..core import effects as fx
from ..errors import AsyncExecutionError
from .pool import ElasticPool

__all__ = ["Jobs", "InlineExecutor"]

log = logging.getLogger("localrref")


class InlineExecutor:
    """Runs each job at once on the submitting thread: the executor of a test
    world without threads (``Agent(driver=...)``)."""

    thread_count = 0

    def sizes(self) -> tuple[int, int]:
        return 0, 0

    def submit(self, fn, *args) -> None:
        fn(*args)

    def shutdown(self, timeout: float = 0.0) -> list[str]:
        return []


class Jobs:
    """Runs peers' requests on this worker (see the module docstring)."""

    def __init__(self, agent, *, threads: bool) -> None:
        self.agent = agent
        self.executor = (ElasticPool(agent.options.num_worker_threads) if threads
                         else InlineExecutor())
        # job id -> the autograd context its request ran in (its reply is sent in it)
        self.contexts: dict[int, int] = {}
        # async_execution jobs whose future has not completed yet
        self._async_lock = threading.Lock()
        self.async_waiting = 0

    def submit(self, job: fx.Execute) -> None:
        """Run ``job`` on the pool (a job that cannot start fails its caller)."""
        try:
            self.executor.submit(self.run, job)
        except Exception as exc:
            if self.agent.closing:
                exc = RuntimeError(
                    f"worker {self.agent.name!r} shut down RPC before it could run this call "
                    f"(its shutdown(graceful=False) fails the calls it has not started; a "
                    f"graceful shutdown() waits for them)")
            self._fail(job, exc)

    def run(self, job: fx.Execute) -> None:
        if job.kind is fx.JobKind.FETCH:
            self._serve_fetch(job)
            return
        agent = self.agent
        wrappers = [agent.rref_type._adopt(agent, record) for record in job.rrefs]
        load_error = None
        context_id = None
        try:
            (func, args, kwargs), context_id = agent.decode_from(job.src, job.payload, wrappers)
        except BaseException as exc:
            load_error = exc
        del wrappers
        if load_error is not None:
            # The caller hears of it too; this side's log names who sent it,
            # since a request nobody can unpickle may not come from localrref.
            log.warning("localrref: could not unpickle a call from rank %d: %s: %s", job.src,
                        type(load_error).__name__, load_error)
            if isinstance(load_error, AttributeError):
                # A function (or class) the caller has and this worker's
                # modules lack: torch's words, which name the fix.
                cause, load_error = load_error, RuntimeError(
                    f"{load_error} Default RPC pickler does not serialize function code. "
                    f"Ensure that UDFs are defined on both caller and callee modules.")
                load_error.__cause__ = cause
            self._fail(job, load_error, announce=True)
            return
        is_async = getattr(func, "_wrapped_async_rpc_function", None) is not None
        name = getattr(func, "__qualname__", repr(func))
        error = None
        try:
            if context_id is None:
                result = func(*args, **(kwargs or {}))
            else:
                self.contexts[job.job_id] = context_id
                with agent.autograd_tape().running_in(context_id):
                    result = func(*args, **(kwargs or {}))
        except BaseException as exc:
            error, result = exc, None
        # The RRefs among the arguments are dropped before the reply leaves:
        # once the caller has its answer, nothing of this call may still hold
        # them (a shutdown that follows would report them as leaked).
        del func, args, kwargs
        if error is not None:
            self._fail(job, error, announce=True)
            return
        if is_async:
            if not isinstance(result, torch._C.Future):
                self._fail(job, AsyncExecutionError(
                    f"Functions decorated with @rpc.async_function must return a "
                    f"torch.futures.Future object, but got {type(result).__module__}."
                    f"{type(result).__qualname__} ({name} is decorated with "
                    f"@rpc.functions.async_execution)"))
                return
            with self._async_lock:
                self.async_waiting += 1
            result.add_done_callback(lambda f: self._finish_async(job, f))
            return
        self._finish(job, result)

    def _finish_async(self, job, future) -> None:
        with self._async_lock:
            self.async_waiting -= 1
        try:
            value = future.value()
        except BaseException as exc:
            self._fail(job, exc)
            return
        self._finish(job, value)

    def _finish(self, job, result) -> None:
        agent = self.agent
        if job.kind is fx.JobKind.REMOTE:
            # The value stays here; a to_here() in a context records its own send.
            self.contexts.pop(job.job_id, None)
            with agent.lock:
                effects = agent.core.finish_remote(job.job_id, result)
            # Fetches that waited for this value are served right here: the
            # value is hot, and a hand-off would add a wake-up to to_here().
            agent.run(effects, inline_jobs=True)
            agent.calls.owner_ready(job.owner)
            agent.signal_progress()
            return
        self._reply_with(job, result)

    def _reply_with(self, job, value) -> None:
        """Pickle ``value`` (forking its RRefs) and send it as the job's reply."""
        agent = self.agent
        context_id = self.contexts.pop(job.job_id, None)
        try:
            if context_id is None:
                encoded = agent.encode(value)
                data, forks = encoded.data, encoded.forks
            else:
                data, forks = agent.autograd_tape().encode(job.src, value, context_id)
        except BaseException as exc:
            self._fail(job, exc)
            return
        with agent.lock:
            effects = agent.core.finish_call(job.job_id, data, forks)
        agent.run(effects)
        agent.signal_progress()

    def _fail(self, job, exc: BaseException, *, announce: bool = False) -> None:
        """Fail ``job``'s caller with ``exc``; ``announce``: the user function raised
        it (or could not be unpickled), which torch also prints to this worker's
        stderr, as its caller may never look."""
        agent = self.agent
        self.contexts.pop(job.job_id, None)
        remote = wrap_exception(exc, agent.worker_info_text())
        if announce:
            print(remote.msg, file=sys.stderr)
        payload = dumps_exception(remote)
        # The formatted traceback travels; the frames (and the arguments they
        # hold) are let go before the reply is sent.
        exc.__traceback__ = None
        with agent.lock:
            effects = agent.core.fail_job(job.job_id, payload)
        agent.run(effects, inline_jobs=True)
        if job.kind is fx.JobKind.REMOTE:
            agent.calls.owner_ready(job.owner)
        agent.signal_progress()

    def _serve_fetch(self, job) -> None:
        owner = job.owner
        agent = self.agent
        if owner.error is not None:
            with agent.lock:
                effects = agent.core.fail_job(job.job_id, owner.error)
            agent.run(effects)
            agent.signal_progress()
            return
        if job.payload is not None:  # to_here() inside a distributed autograd context
            context_id = agent.autograd_tape().joined(job.src, job.payload)
            if context_id is not None:
                self.contexts[job.job_id] = context_id
        self._reply_with(job, owner.value)

    def close(self, timeout: float) -> None:
        self.executor.shutdown(timeout)
