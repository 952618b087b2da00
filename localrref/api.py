"""The ``torch.distributed.rpc`` functions, over localrref's agent.

Signatures, defaults and error texts follow torch's ``rpc/api.py``;
``tests/test_public_api.py`` pins them against the installed torch.
"""

from __future__ import annotations

import atexit
import logging
import numbers
import os
import threading
import warnings

from torch.distributed.rpc import WorkerInfo
# torch's own: a _wait_all() block collects, in _thread_local_var, the futures
# rpc_async returns in its thread (agent.futures.collected), and waits for them
# when it ends. Sharing them makes a block of either library's collect the
# other's calls too.
from torch.distributed.rpc.api import _thread_local_var, _wait_all  # noqa: F401
# torch programs pass BackendType.TENSORPIPE to init_rpc routinely; it is torch's own
# enum, the one torch.distributed.rpc has (torch's register_backend makes a new one in
# backend_registry: its faulty agent's FAULTY_TENSORPIPE is only there, as on torch).
from torch.distributed.rpc import BackendType

from . import constants, handover
from .agent import current, profiling
from .agent.agent import Agent
from .agent.futures import collected, expose
from .control_messages import ShutdownFailed
from .launch import paused_gc
from .errors import (
    AGENT_NOT_SET_MESSAGE, NOT_INITIALIZED_MESSAGE, RPCNotInitializedError, UnknownWorkerError,
)
from .options import (FaultyRpcBackendOptions, RpcBackendOptions, TensorPipeRpcBackendOptions,
                      from_torch_faulty)
from .rref import RRef, worker_info

__all__ = ["init_rpc", "rpc_sync", "rpc_async", "remote", "shutdown", "get_worker_info",
           "BackendType", "is_available", "get_rpc_timeout", "set_rpc_timeout",
           "get_debug_info", "share_tensor", "WorkerInfo"]

log = logging.getLogger("localrref")
_init_lock = threading.Lock()


@atexit.register
def _close_at_exit():
    """A process that exits without ``shutdown()`` still stops its agent first.

    The agent's threads are daemons; left running into interpreter
    finalization, one that is inside torch (completing a future, say) aborts
    the whole process ("terminate called without an active exception",
    pytorch/pytorch#38228) and turns an orderly exit code into SIGABRT.
    atexit hooks run before finalization begins, so closing here joins them
    in time. It is not a graceful shutdown: peers see this worker go.
    """
    agent = current.get()
    if agent is not None:
        _close(agent, graceful=False)


def is_available() -> bool:
    """True: localrref's RPC is always available (torch's ``rpc.is_available``)."""
    return True


def init_rpc(name, backend=None, rank=-1, world_size=None, rpc_backend_options=None):
    """Start this worker's RPC agent and meet every other worker of the world.

    Args:
        name: this worker's name, unique in the world ("ps", "trainer3", ...).
        backend: None (or torch's ``BackendType.TENSORPIPE``): localrref
            chooses; ``"torch"``: run this world on ``torch.distributed.rpc``
            (TensorPipe); ``"localrref"``: never hand over. A world that
            spans machines (torchrun with several nodes, a rendezvous on
            another host) runs on torch: see :mod:`localrref.handover`.
        rank: this worker's rank; -1 takes it from the world a localrref
            launcher (``localrref.spawn``, ``python -m localrref.launch``)
            started, else from the ``RANK`` environment variable.
        world_size: number of workers; None takes it from the world / ``WORLD_SIZE``.
        rpc_backend_options: :class:`localrref.RpcBackendOptions` (torch's
            ``TensorPipeRpcBackendOptions`` fields are accepted too). In a
            process no localrref launcher started, its ``init_method`` is
            where the world meets, as in torch: ``env://`` (the default:
            ``MASTER_ADDR``/``MASTER_PORT``), ``tcp://host:port`` or
            ``file:///path``; the first process to arrive starts the
            world's supervisor (``localrref.launch.join``).

    Raises:
        RuntimeError: already initialized, a rank or world size that
            disagrees with the world, two processes claiming one rank, a
            duplicate name, or peers that never called ``init_rpc`` (named).
        ValueError: ``MASTER_ADDR``, ``MASTER_PORT``, ``RANK`` or
            ``WORLD_SIZE`` needed and not set.
    """
    from .world import current as current_world
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    with _init_lock:
        if current.get() is not None or handover.active() is not None:
            raise RuntimeError("RPC is already initialized: call localrref.shutdown() before "
                               "calling init_rpc again")
        paused_gc.freeze_at_first_init()
        spec = current_world()
        choice = handover.choose(backend, os.environ, launcher_world=spec is not None,
                                 remote_host=lambda: _remote_host(rpc_backend_options))
        if choice.engine is handover.Engine.TORCH:
            rank = _resolve_int("rank", rank, os.environ.get("RANK"), -1, unset=-1)
            world_size = _resolve_int("world_size", world_size, os.environ.get("WORLD_SIZE"),
                                      None, unset=None)
            handover.start(name, rank, world_size, rpc_backend_options, choice.reason,
                           backend=backend)
            return
        options = _options(rpc_backend_options, backend)
        membership = None
        if spec is None:
            membership = _join(name, rank, world_size, options)
            spec = membership.spec
        else:
            rank = _resolve_int("rank", rank, os.environ.get("RANK"), spec.rank, unset=-1)
            world_size = _resolve_int("world_size", world_size, os.environ.get("WORLD_SIZE"),
                                      spec.world_size, unset=None)
            if rank != spec.rank:
                raise RuntimeError(f"rank {rank} does not match this worker's rank {spec.rank} "
                                   f"in its world; pass rank=-1 (the default) to use the world's")
            if world_size != spec.world_size:
                raise RuntimeError(f"world size mismatch: init_rpc(world_size={world_size}) but "
                                   f"the world has {spec.world_size} workers")
        try:
            agent = Agent.for_world(spec, name, options, rref_type=RRef)
        except BaseException:
            if membership is not None:
                membership.leave(graceful=False)
            raise
        global _membership
        _membership = membership
        if membership is not None:
            membership.watch_supervisor(
                lambda reason: agent.on_control(spec.world_size, ShutdownFailed(reason=reason)))
        profiling.mark_node(spec.rank)
        current.set(agent)
        try:
            agent.start(options.init_timeout)
        except BaseException:
            _close(agent, graceful=False, formed=False)
            raise


# The rendezvous world this process joined (launch/join.py); None under a
# localrref launcher, whose supervisor started this process with its world.
_membership = None


def _join(name, rank, world_size, options):
    """Join a world through ``options.init_method``, as torch's init_rpc does."""
    from .launch.join import join
    from .launch.rendezvous import parse_init_method
    from .launch.supervisor import RunOptions
    rendezvous = parse_init_method(options.init_method, os.environ)
    for what, value in (("RANK", rank), ("WORLD_SIZE", world_size)):
        unset = -1 if what == "RANK" else None
        if (value is unset or value is None) and not os.environ.get(what, "").strip():
            # torch's TensorPipe makes a world without WORLD_SIZE a dynamic one,
            # which ranks join and leave; a localrref world has a fixed size.
            dynamic = (" (without a world size torch.distributed.rpc starts a dynamic "
                       "world, which workers join and leave at any time: localrref's worlds "
                       "have a fixed size)" if what == "WORLD_SIZE" else "")
            raise ValueError(f"Error initializing torch.distributed using {rendezvous.init_method} "
                             f"rendezvous: environment variable {what} expected, but not set "
                             f"(pass {what.lower()}= to init_rpc, or set {what}){dynamic}")
    rank = _resolve_int("rank", rank, os.environ.get("RANK"), None, unset=-1)
    world_size = _resolve_int("world_size", world_size, os.environ.get("WORLD_SIZE"), None,
                              unset=None)
    run = RunOptions.resolve()
    return join(rendezvous, rank=rank, world_size=world_size, name=name,
                shutdown_timeout=run.shutdown_timeout, timeout=options.init_timeout,
                strict_leaks=run.strict_leaks,
                record_creation_sites=run.record_creation_sites)


def _remote_host(options) -> str | None:
    """The host of the rendezvous ``options`` names, if it is not this machine."""
    from .launch.join import remote_host
    from .launch.rendezvous import parse_init_method
    init_method = getattr(options, "init_method", None)
    try:
        rendezvous = parse_init_method(init_method, os.environ)
    except ValueError:
        return None  # the local path reports it, in torch's words
    return remote_host(rendezvous)


def _close(agent: Agent, *, graceful: bool, formed: bool = True) -> None:
    """Stop this process's agent and, in a rendezvous world, leave it.

    ``formed``: init_rpc had returned (False when it failed).
    """
    global _membership
    current.set(None)
    membership, _membership = _membership, None
    try:
        agent.close()
    finally:
        if membership is not None:
            membership.leave(graceful, formed)


def _resolve_int(what, given, env, world_value, *, unset):
    if given is not unset and given is not None:
        if isinstance(given, bool) or not isinstance(given, numbers.Integral):
            raise ValueError(f"{what} must be an int, got {given!r}")
        return int(given)
    if env is not None and env.strip():
        return int(env)
    return world_value


def _options(options, backend) -> RpcBackendOptions:
    if options is None:
        return RpcBackendOptions()
    if type(options) in (RpcBackendOptions, TensorPipeRpcBackendOptions, FaultyRpcBackendOptions):
        return options
    if isinstance(options, RpcBackendOptions):
        # A class of the program's own: torch infers the backend from the
        # options' class, and refuses one it does not know, or one that is
        # not TensorPipe's for the TensorPipe backend.
        if backend is None:
            raise TypeError(f"Could not infer backend for options {options!r}: pass backend= "
                            f"to init_rpc, or use localrref.RpcBackendOptions")
        if type(backend).__name__ == "BackendType" and backend.name == "TENSORPIPE":
            raise TypeError(f"`rpc_backend_options` must be a `TensorPipeRpcBackendOptions`. "
                            f"{options!r}: use localrref.RpcBackendOptions (or torch's "
                            f"TensorPipeRpcBackendOptions) for the TENSORPIPE backend")
        return options
    faulty = from_torch_faulty(options)
    if faulty is not None:
        ours, dropped = faulty
        if dropped:
            warnings.warn(
                f"localrref injects no faults into {', '.join(dropped)}: distributed "
                f"autograd's messages go as they are; the other types in the options do "
                f"meet their faults", stacklevel=3)
        return ours
    # torch's TensorPipeRpcBackendOptions: take the fields both understand.
    try:
        return RpcBackendOptions(rpc_timeout=options.rpc_timeout,
                                 num_worker_threads=options.num_worker_threads,
                                 init_method=getattr(options, "init_method", "env://"))
    except AttributeError:
        raise TypeError(f"Argument rpc_backend_options must be an instance of "
                        f"RpcBackendOptions (localrref.RpcBackendOptions, or torch's "
                        f"TensorPipeRpcBackendOptions), got {type(options).__name__}") from None


def _to_rank(agent: Agent, to) -> int:
    if isinstance(to, WorkerInfo):
        rank = to.id
        if rank not in range(agent.world_size) or agent.peer(rank).name != to.name:
            raise UnknownWorkerError(f"unknown worker {to}: this world's workers are "
                                     f"{_names(agent)}")
        return rank
    if isinstance(to, str):
        rank = agent.rank_of(to)
        if rank is None:
            # torch's words first: programs match "could not find destination".
            raise UnknownWorkerError(
                f"name:{agent.name},rank:{agent.rank} could not find destination name {to}: "
                f"unknown worker name {to!r}; this world's workers are {_names(agent)}")
        return rank
    if isinstance(to, numbers.Integral) and not isinstance(to, bool):
        if not 0 <= to < agent.world_size:
            raise UnknownWorkerError(f"unknown worker rank {to}: ranks run from 0 to "
                                     f"{agent.world_size - 1} ({_names(agent)})")
        return int(to)
    raise ValueError(f"Cannot get WorkerInfo from name {to}")


def _names(agent: Agent) -> str:
    return ", ".join(f"{d.rank}={d.name!r}" for d in agent.peers())


def _handed_over(message: str = AGENT_NOT_SET_MESSAGE):
    """``torch.distributed.rpc`` if this world was handed over to it, else not initialized.

    Called only when there is no agent, so localrref's calls never pay for
    the hand-over. ``message``: the error's text, torch's for the API called.
    """
    torch_rpc = handover.active()
    if torch_rpc is None:
        current.require(message)  # raises RPCNotInitializedError (or finds an agent set meanwhile)
    return torch_rpc


def get_worker_info(worker_name=None):
    """The ``WorkerInfo`` of ``worker_name`` (a name or rank), or of this worker."""
    agent = current.get()
    if agent is None:
        return _handed_over(NOT_INITIALIZED_MESSAGE).get_worker_info(worker_name)
    if worker_name is None:
        return worker_info(agent, agent.rank)
    return worker_info(agent, _to_rank(agent, worker_name))


def rpc_async(to, func, args=None, kwargs=None, timeout=constants.UNSET_RPC_TIMEOUT):
    """Run ``func(*args, **kwargs)`` on ``to``; return a ``torch.futures.Future`` of the result.

    Args:
        to: a worker name, rank or ``WorkerInfo``.
        timeout: seconds; -1 uses the default (``get_rpc_timeout()``), 0 means no limit.

    Raises:
        ValueError: unknown worker.
        TypeError: an argument cannot be pickled (the message names it).
    """
    agent = current.get()
    if agent is None:  # torch's rpc_async collects it for _wait_all itself
        return _handed_over(NOT_INITIALIZED_MESSAGE).rpc_async(to, func, args, kwargs, timeout)
    rank, args, kwargs = _call_args(agent, to, func, args, kwargs)
    return collected(expose(agent.calls.rpc_async(rank, func, args, kwargs, timeout)))


def rpc_sync(to, func, args=None, kwargs=None, timeout: float = constants.UNSET_RPC_TIMEOUT):
    """As :func:`rpc_async`, waiting for the result (remote exceptions re-raised)."""
    agent = current.get()
    if agent is None:
        return _handed_over(NOT_INITIALIZED_MESSAGE).rpc_sync(to, func, args, kwargs, timeout)
    rank, args, kwargs = _call_args(agent, to, func, args, kwargs)
    return agent.reader.wait_reply(agent.calls.rpc_async(rank, func, args, kwargs, timeout,
                                                         will_wait=True))


def remote(to, func, args=None, kwargs=None, timeout=constants.UNSET_RPC_TIMEOUT):
    """Run ``func`` on ``to`` and keep the result there; return an ``RRef`` to it at once."""
    agent = current.get()
    if agent is None:
        return _handed_over(NOT_INITIALIZED_MESSAGE).remote(to, func, args, kwargs, timeout)
    rank, args, kwargs = _call_args(agent, to, func, args, kwargs)
    return agent.calls.remote(rank, func, args, kwargs, timeout)


def _call_args(agent: Agent, to, func, args, kwargs) -> tuple[int, tuple, dict]:
    """The destination rank and the normalised arguments of a call."""
    if not callable(func):
        raise TypeError(f"func must be callable, got {type(func).__name__}")
    return _to_rank(agent, to), tuple(args or ()), dict(kwargs or {})


def shutdown(graceful=True, timeout=constants.DEFAULT_SHUTDOWN_TIMEOUT):
    """Stop this worker's agent; graceful waits for every worker and deletes every RRef.

    A graceful shutdown is driven by the supervisor: every worker reaches
    ``shutdown()``, each runs ``delAllUsersAndUnforkedOwners``, a barrier, the
    leak check (a warning; ``--strict-leaks`` / ``LOCALRREF_STRICT_LEAKS=1``
    make it an error), then stop. ``timeout`` bounds each phase (0: the
    world's shutdown timeout). A dead peer makes it fail at once, naming it.
    """
    agent = current.get()
    if agent is None:
        torch_rpc = handover.active()
        if torch_rpc is None:
            raise RPCNotInitializedError(NOT_INITIALIZED_MESSAGE)
        try:
            torch_rpc.shutdown(graceful=graceful, timeout=timeout)
        finally:
            handover.stop()
        return
    completed = False
    try:
        if graceful:
            limit = timeout if timeout and timeout > 0 else agent.shutdown_timeout
            agent.graceful_shutdown(limit)
            completed = True
    finally:
        _close(agent, graceful=completed)


def get_rpc_timeout() -> float:
    """The default timeout of calls made from now on, in seconds (0: no limit)."""
    agent = current.get()
    return _handed_over().get_rpc_timeout() if agent is None else agent.default_timeout


def set_rpc_timeout(seconds: float) -> None:
    """Change the default timeout of later calls (0: no limit); calls in flight keep theirs."""
    if seconds < 0:
        raise ValueError(f"timeout must be >= 0 seconds (0: no limit), got {seconds}")
    agent = current.get()
    if agent is None:
        _handed_over()._set_rpc_timeout(float(seconds))
    else:
        agent.default_timeout = float(seconds)


def share_tensor(tensor):
    """A copy of ``tensor`` in shared memory: sending it later copies nothing (opt-in zero copy).

    Normally a tensor costs one copy each way (the sender's value is copied
    into a pooled shared-memory block, so the receiver never aliases memory
    the sender can still change). A tensor made here is sent as-is instead:
    receivers map it copy-on-write, so their writes never reach you, but
    **your later writes reach them**: do not mutate it after sending it.
    On a world handed over to torch, the tensor itself (TensorPipe copies).
    """
    agent = current.get()
    if agent is None:
        _handed_over()
        return tensor
    return agent.shm_pool.share(tensor)


def _wait_until_tables_empty(timeout: float = 30.0) -> bool:
    """Tests and benchmarks: wait until this worker's RRef tables are empty."""
    return current.require().wait_until_quiet(timeout)


def _rref_context_get_debug_info() -> dict[str, str]:
    """The RRef context's part of :func:`get_debug_info` (torch's name for it)."""
    agent = current.get()
    if agent is None:
        return _handed_over()._rref_context_get_debug_info()
    return agent.rref_debug_info()


def get_debug_info() -> dict[str, str]:
    """torch's four RRef counters, localrref's own protocol counters and the agent's figures.

    On a world handed over to torch: torch's ``_get_debug_info()``.
    """
    agent = current.get()
    return _handed_over()._get_debug_info() if agent is None else agent.debug_info()




# ------------------------------------------------- torch's private helpers programs use
#
# torch.distributed.rpc's own tests, and some programs, reach past the
# public API for these: an all-gather and a barrier over RPC, and the
# current agent's list of workers. They follow torch's api.py: the worker
# with the smallest name gathers everyone's object, then sends the whole
# map to each of the others; a sequence id per set of names keeps
# consecutive gathers apart.

class _GatherState:
    __slots__ = ("gathered", "proceed")

    def __init__(self) -> None:
        self.gathered: dict = {}
        self.proceed = threading.Event()


_gather_lock = threading.RLock()
_gather_sequence: dict[str, int] = {}
_gather_states: dict[str, _GatherState] = {}


def _gather_to_leader(sequence_id: str, worker_name: str, obj, worker_names) -> None:
    with _gather_lock:
        state = _gather_states.setdefault(sequence_id, _GatherState())
        if worker_name in state.gathered:
            raise AssertionError(f"{worker_name} reported intent sequence id {sequence_id} twice.")
        state.gathered[worker_name] = obj
        if set(worker_names) == set(state.gathered):
            state.proceed.set()


def _broadcast_to_followers(sequence_id: str, objects_map: dict) -> None:
    with _gather_lock:
        state = _gather_states.setdefault(sequence_id, _GatherState())
    if state.proceed.is_set():
        raise AssertionError(f"Termination signal sequence id {sequence_id} got set twice.")
    state.gathered = objects_map
    state.proceed.set()


def _all_gather(obj, worker_names=None, timeout: float = constants.UNSET_RPC_TIMEOUT) -> dict:
    """``{worker name: obj}`` from every worker of ``worker_names`` (default: all); torch's
    ``api._all_gather``. Every worker named must call it."""
    agent = current.require(NOT_INITIALIZED_MESSAGE)
    names = set(worker_names) if worker_names else {peer.name for peer in agent.peers()}
    leader = min(names)
    me = agent.name
    with _gather_lock:
        joined = "".join(sorted(names))
        number = _gather_sequence.get(joined, 0)
        _gather_sequence[joined] = number + 1
        sequence_id = joined + str(number)
    if timeout == constants.UNSET_RPC_TIMEOUT:
        rpc_timeout, signal_timeout = get_rpc_timeout(), None
    elif timeout == constants.DEFAULT_SHUTDOWN_TIMEOUT:
        rpc_timeout, signal_timeout = timeout, None
    else:
        rpc_timeout = signal_timeout = timeout
    if me == leader:
        _gather_to_leader(sequence_id, me, obj, names)
    else:
        rpc_sync(leader, _gather_to_leader, args=(sequence_id, me, obj, names),
                 timeout=rpc_timeout)
    with _gather_lock:
        state = _gather_states.setdefault(sequence_id, _GatherState())
    state.proceed.wait(timeout=signal_timeout)
    if me == leader:
        futures = {name: rpc_async(name, _broadcast_to_followers,
                                   args=(sequence_id, state.gathered), timeout=rpc_timeout)
                   for name in names - {leader}}
        errors = []
        for name, future in futures.items():
            try:
                future.wait()
            except RuntimeError as exc:
                errors.append((name, exc))
        if errors:
            raise RuntimeError(
                f"Followers {[name for name, _ in errors]} timed out in _all_gather after "
                f"{rpc_timeout:.2f} seconds. The first exception is {errors[0][1]}")
    with _gather_lock:
        state = _gather_states.pop(sequence_id, state)
    return state.gathered


def _barrier(worker_names) -> None:
    """Return once every worker of ``worker_names`` called it (torch's ``api._barrier``)."""
    try:
        _all_gather(None, set(worker_names))
    except RuntimeError:
        log.exception("Failed to complete barrier")


def _wait_all_workers(timeout: float = constants.DEFAULT_SHUTDOWN_TIMEOUT) -> None:
    """Return once every worker called it (torch's ``api._wait_all_workers``, with which
    torch's graceful shutdown starts; 0: no limit)."""
    try:
        _all_gather(None, timeout=timeout)
    except RuntimeError:
        log.exception("Failed to respond to 'Shutdown Proceed' in time")
        raise


class _AgentView:
    """What torch's ``_get_current_rpc_agent()`` offers programs: the workers and debug info."""

    def __init__(self, agent: Agent) -> None:
        self._agent = agent

    def get_worker_info(self, worker_name=None):
        return get_worker_info(worker_name)

    def get_worker_infos(self) -> list:
        return [worker_info(self._agent, peer.rank) for peer in self._agent.peers()]

    def get_debug_info(self) -> dict[str, str]:
        return self._agent.agent_debug_info()

    def _get_device_map(self, worker_info) -> dict:
        """The device map toward ``worker_info``: always empty (localrref moves CPU tensors
        only); torch's ``RemoteModule`` asks it before placing a module."""
        get_worker_info(worker_info.name)  # torch's error for a worker not in the world
        return {}


def _get_current_rpc_agent() -> _AgentView:
    """This worker's agent as torch's ``_get_current_rpc_agent()`` shows it (its workers,
    its debug info); torch's error when RPC is not initialized."""
    return _AgentView(current.require())


def _is_current_rpc_agent_set() -> bool:
    return current.get() is not None
