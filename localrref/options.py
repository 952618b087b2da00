"""Backend options, accepted where torch takes ``TensorPipeRpcBackendOptions``."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from . import constants

__all__ = ["RpcBackendOptions", "TensorPipeRpcBackendOptions", "FaultyRpcBackendOptions",
           "TORCH_ONLY_FAULTS", "from_torch_faulty"]


@dataclass(kw_only=True)
class RpcBackendOptions:
    """Options for localrref's agent; the fields torch's options have keep their names.

    Attributes:
        rpc_timeout: default timeout of every call, in seconds (0: no limit).
        init_method: where processes that no localrref launcher started
            meet (``env://``, ``tcp://host:port``, ``file:///path``), as in
            torch; workers of ``localrref.spawn`` and ``python -m
            localrref.launch`` ignore it (their world is handed to them).
        num_worker_threads: threads kept alive to run user functions; more are
            started while all are busy (nested calls never starve the pool).
        shm_threshold: tensors of at least this many bytes travel through
            shared memory; smaller ones ride inline in the message.
        init_timeout: how long ``init_rpc`` waits for every peer.
        spin_us: after a frame arrives, how long the inbox's reader keeps
            polling without sleeping (microseconds; only while frames keep
            arriving that fast, so an idle world sleeps). Waking a sleeping
            process costs more than a whole call on a virtual machine; 0
            never spins. The ``LOCALRREF_SPIN_US`` environment variable sets
            the default.
    """

    rpc_timeout: float = constants.DEFAULT_RPC_TIMEOUT_SEC
    init_method: str = constants.DEFAULT_INIT_METHOD
    num_worker_threads: int = constants.DEFAULT_NUM_WORKER_THREADS
    shm_threshold: int = constants.DEFAULT_SHM_THRESHOLD
    init_timeout: float = constants.DEFAULT_INIT_TIMEOUT_SEC
    spin_us: float = field(default_factory=lambda: _spin_us_from_env())
    device_maps: dict = field(default_factory=dict)
    devices: list = field(default_factory=list)

    def __post_init__(self) -> None:
        for name in ("rpc_timeout", "num_worker_threads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                # torch's words (pybind11's), then the fix
                raise TypeError(
                    f"TensorPipeRpcBackendOptions(): incompatible constructor arguments: "
                    f"{name} must be a number, got {type(value).__name__} {value!r}"
                    + (" (pass timedelta.total_seconds())"
                       if type(value).__name__ == "timedelta" else ""))
        if self.rpc_timeout < 0:
            raise ValueError(f"rpc_timeout must be >= 0 seconds (0: no limit), got "
                             f"{self.rpc_timeout}")
        if self.spin_us < 0:
            raise ValueError(f"spin_us must be >= 0 microseconds (0: never spin), got "
                             f"{self.spin_us}")
        if self.num_worker_threads < 1:
            raise ValueError(f"num_worker_threads must be >= 1, got {self.num_worker_threads}")
        if self.device_maps or any(str(d) != "cpu" for d in self.devices):
            raise ValueError("localrref moves CPU tensors only: device_maps and non-CPU devices "
                             "are not supported")


@dataclass(kw_only=True)
class FaultyRpcBackendOptions(RpcBackendOptions):
    """Options that also inject faults into the protocol messages each worker sends.

    torch's ``FaultyTensorPipeRpcBackendOptions`` has the first three; see
    ``localrref/agent/faults.py`` for what each does. Message types are
    named as torch names them (``"RREF_FORK_REQUEST"``, ``"PYTHON_CALL"``, ...).
    The ``LOCALRREF_FAULTS`` environment variable gives the same to workers
    started with plain options (the launcher's workers inherit it).

    Attributes:
        num_fail_sends: how many sends of each type in ``messages_to_fail`` fail.
        messages_to_fail: types whose first sends fail (control messages are
            then retried and delivered; a call whose send fails fails).
        messages_to_delay: type -> seconds each such message is held back.
        messages_to_duplicate: types sent twice.
        messages_to_reorder: types sent after the next frame to the same peer.
        fault_probability: the chance that a delay, duplicate or reorder
            applies to a given message.
        fault_seed: seeds those draws (with the worker's rank).
        kill_on: where this worker SIGKILLs itself: ``"send:TYPE"`` (right
            after sending a frame of TYPE), ``"recv:TYPE"`` (on receiving one,
            before handling it) or ``"copy"`` (halfway through copying a
            tensor into shared memory); TYPE is a message type or a control
            record's class name (``"ShutdownArrived"``, ...). Empty: never.
        kill_after: the how-many-th such frame (or copy) kills.
    """

    num_fail_sends: int = 0
    messages_to_fail: list = field(default_factory=lambda: list(_RETRYABLE))
    messages_to_delay: dict = field(default_factory=dict)
    messages_to_duplicate: list = field(default_factory=list)
    messages_to_reorder: list = field(default_factory=list)
    fault_probability: float = 1.0
    fault_seed: int = 0
    kill_on: str = ""
    kill_after: int = 1


# torch's faulty agent fails these by default: the RRef protocol retries them.
_RETRYABLE = ("RREF_FORK_REQUEST", "RREF_CHILD_ACCEPT", "RREF_USER_DELETE")

# Message types torch's faulty agent knows that localrref injects nothing
# into: it leaves distributed autograd's messages alone.
TORCH_ONLY_FAULTS = ("CLEANUP_AUTOGRAD_CONTEXT_REQ",)


def from_torch_faulty(options) -> tuple[FaultyRpcBackendOptions, tuple[str, ...]] | None:
    """localrref's options for torch's ``FaultyTensorPipeRpcBackendOptions``
    (``torch.distributed.rpc._testing``), and the types it names that inject
    nothing here (:data:`TORCH_ONLY_FAULTS`); None for options of another kind.

    The faults torch's agent injects into the calls, the ``remote()`` calls,
    fetches and RRef control messages are injected the same way (its
    ``SCRIPT_*`` types name those of builtin operators and TorchScript
    functions, as on torch): the first ``num_fail_sends`` sends of each type
    in ``messages_to_fail`` fail (and the control messages are retried), and
    each type in ``messages_to_delay`` waits that many seconds.
    """
    if not all(hasattr(options, name) for name in
               ("num_fail_sends", "messages_to_fail", "messages_to_delay", "rpc_timeout")):
        return None
    fail = list(options.messages_to_fail)
    delay = dict(options.messages_to_delay)
    dropped = tuple(sorted({name for name in [*fail, *delay] if name in TORCH_ONLY_FAULTS}))
    return FaultyRpcBackendOptions(
        rpc_timeout=options.rpc_timeout, num_worker_threads=options.num_worker_threads,
        init_method=getattr(options, "init_method", constants.DEFAULT_INIT_METHOD),
        num_fail_sends=options.num_fail_sends,
        messages_to_fail=[name for name in fail if name not in TORCH_ONLY_FAULTS],
        messages_to_delay={name: seconds for name, seconds in delay.items()
                           if name not in TORCH_ONLY_FAULTS}), dropped


def _spin_us_from_env() -> float:
    text = os.environ.get("LOCALRREF_SPIN_US", "").strip()
    if not text:
        return constants.DEFAULT_SPIN_US
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"LOCALRREF_SPIN_US must be a number of microseconds, got "
                         f"{text!r}") from None


class TensorPipeRpcBackendOptions(RpcBackendOptions):
    """torch's name and constructor for localrref's options (the transports and
    channels are ignored), a class as torch's is: ``isinstance`` works."""

    def __init__(self, *, num_worker_threads=constants.DEFAULT_NUM_WORKER_THREADS,
                 rpc_timeout=constants.DEFAULT_RPC_TIMEOUT_SEC,
                 init_method=constants.DEFAULT_INIT_METHOD, device_maps=None, devices=None,
                 _transports=None, _channels=None):
        super().__init__(num_worker_threads=num_worker_threads, rpc_timeout=rpc_timeout,
                         init_method=init_method, device_maps=device_maps or {},
                         devices=devices or [])
