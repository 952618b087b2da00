"""Worker bodies for tests/runtime/test_failures.py (importable by spawned workers)."""

from __future__ import annotations

import os
import signal
import threading

import torch

import localrref as rpc
from localrref import world
from localrref.control_messages import Hello
from localrref.errors import WorkerGoneError
from localrref.transport import wire
from localrref.transport.mpqueue import Endpoint

_FOREVER = threading.Event()


def block(bound=60.0):
    _FOREVER.wait(bound)
    return "released"


def getpid():
    return os.getpid()


def big_tensor(n_bytes):
    return torch.ones(n_bytes // 4)


def kill_peer_during_call(rank, results):
    rpc.init_rpc(f"worker{rank}", rpc_backend_options=rpc.RpcBackendOptions(rpc_timeout=0))
    if rank == 0:
        # The supervisor stops the survivors as soon as rank 1 dies (torch's
        # spawn does too); this rank must live long enough to report.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        results.put(("world", world.current().world_id))
        pid = rpc.rpc_sync("worker1", getpid)
        kept = [rpc.rpc_sync("worker1", big_tensor, args=(1 << 20,)) for _ in range(3)]
        pending = rpc.rpc_async("worker1", block)        # no timeout: only death can end it
        rref = rpc.remote("worker1", big_tensor, args=(16,))
        rref.to_here()
        os.kill(pid, signal.SIGKILL)
        try:
            pending.wait()
            results.put(("no error", None))
        except RuntimeError as exc:
            # An rpc_async future fails in C++ (so torch.futures.wait_all sees
            # it), which keeps the error's text, not its class.
            results.put(("future gone", str(exc)))
        try:
            rpc.rpc_sync("worker1", getpid)
        except WorkerGoneError as exc:
            results.put(("gone", str(exc), exc.rank, exc.pid == pid, exc.exitcode))
        try:
            rref.to_here()
        except WorkerGoneError as exc:
            results.put(("to_here gone", str(exc)))
        try:
            rpc.rpc_sync("worker1", getpid)
        except WorkerGoneError as exc:
            results.put(("later call gone", str(exc)))
        del kept
        try:
            rpc.shutdown()
            results.put(("shutdown ok", None))
        except RuntimeError as exc:
            results.put(("shutdown failed", str(exc)))
        return
    rpc.shutdown()


class _DieInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        os.kill(os.getpid(), signal.SIGKILL)
        return grad


def _dies_in_backward(x):
    return _DieInBackward.apply(x)


def kill_peer_during_backward(rank, results):
    import localrref.autograd as dist_autograd

    rpc.init_rpc(f"worker{rank}", rpc_backend_options=rpc.RpcBackendOptions(rpc_timeout=0))
    if rank == 0:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # live long enough to report
        w = torch.ones(3, requires_grad=True)
        with dist_autograd.context() as context_id:
            loss = rpc.rpc_sync("worker1", _dies_in_backward, args=(w * 3,)).sum()
            try:
                dist_autograd.backward(context_id, [loss])  # no timeout: only the death ends it
                results.put(("no error", None))
            except RuntimeError as exc:
                results.put(("backward failed", str(exc)))
            results.put(("contexts", rpc.get_debug_info()["num_autograd_contexts"]))
        results.put(("contexts after", rpc.get_debug_info()["num_autograd_contexts"]))
        try:
            rpc.shutdown()
        except RuntimeError as exc:
            results.put(("shutdown failed", str(exc)))
        return
    rpc.shutdown()


def reinit_after_shutdown(rank, results):
    rpc.init_rpc(f"worker{rank}")
    first = rpc.rpc_sync(f"worker{1 - rank}", torch.add, args=(torch.ones(1), 1))
    rref = rpc.remote(f"worker{1 - rank}", torch.ones, args=(2,))
    rref.to_here()
    rpc.shutdown()
    outcomes = [float(first)]
    try:
        rref.to_here()
    except RuntimeError as exc:
        outcomes.append(f"to_here after shutdown: {exc}")
    try:
        rpc.rpc_sync(f"worker{1 - rank}", torch.add, args=(torch.ones(1), 1))
    except RuntimeError as exc:
        outcomes.append(f"rpc after shutdown: {exc}")
    del rref
    rpc.init_rpc(f"again{rank}")
    outcomes.append(float(rpc.rpc_sync(f"again{1 - rank}", torch.add, args=(torch.ones(1), 2))))
    rpc.shutdown()
    results.put((rank, outcomes))


def restart_while_the_peer_still_reads(rank, results, hello_sent, first_done):
    """Rank 1 restarts RPC while rank 0's first agent still reads its inbox.

    Rank 1's new hello reaches rank 0's old agent (the inbox is FIFO, and rank
    0 makes a call to itself behind it), so rank 0's new agent can learn of
    rank 1's new one only from the answer to its own hello.
    """
    options = rpc.RpcBackendOptions(init_timeout=20)
    rpc.init_rpc(f"first{rank}", rpc_backend_options=options)
    first = float(rpc.rpc_sync(f"first{1 - rank}", torch.add, args=(torch.ones(1), 1)))
    if rank == 1:
        # Not before rank 0 has its answer: a non-graceful shutdown fails
        # the calls it has not served.
        assert first_done.wait(30), "rank 0's first call never returned"
        rpc.shutdown(graceful=False)
        send = Endpoint.send

        def send_and_tell(self, dst, frame):
            send(self, dst, frame)
            if frame[:1] == wire.CONTROL_TAG and isinstance(wire.decode_control(frame), Hello):
                hello_sent.set()

        Endpoint.send = send_and_tell
        rpc.init_rpc("again1", rpc_backend_options=options)
        Endpoint.send = send
    else:
        first_done.set()
        assert hello_sent.wait(30), "rank 1 never said hello again"
        rpc.rpc_sync("first0", torch.add, args=(torch.ones(1), 0))  # read past the hello
        rpc.shutdown(graceful=False)
        rpc.init_rpc("again0", rpc_backend_options=options)
    peers = sorted(rpc.get_worker_info(f"again{r}").name for r in (0, 1))
    again = float(rpc.rpc_sync(f"again{1 - rank}", torch.add, args=(torch.ones(1), 2)))
    rpc.shutdown()
    results.put((rank, (first, peers, again)))


def duplicate_names(rank, results):
    try:
        rpc.init_rpc("same")
    except RuntimeError as exc:
        results.put((rank, str(exc)))
        return
    results.put((rank, "initialized"))
    rpc.shutdown()


def wrong_world_size(rank, results):
    try:
        rpc.init_rpc(f"worker{rank}", world_size=3)
    except RuntimeError as exc:
        results.put((rank, str(exc)))


def never_reaches_shutdown(rank, results):
    rpc.init_rpc(f"worker{rank}")
    if rank == 1:
        block(120)  # stopped by the supervisor once rank 0 fails
        return
    try:
        rpc.shutdown()
        results.put("shutdown returned")
    except RuntimeError as exc:
        results.put(str(exc))
        raise


def peer_leaves_without_graceful_shutdown(rank, results):
    """Rank 1 shuts down alone (not gracefully) and exits with 0; rank 0's calls to it
    must then fail naming it, not hang (no call has a timeout here)."""
    rpc.init_rpc(f"worker{rank}", rpc_backend_options=rpc.RpcBackendOptions(rpc_timeout=0))
    if rank == 1:
        rpc.shutdown(graceful=False)
        return
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # report before the supervisor stops us
    try:
        while True:
            rpc.rpc_sync("worker1", getpid)
    except WorkerGoneError as exc:
        results.put(("gone", str(exc)))
    try:
        rpc.shutdown()
    except RuntimeError as exc:
        results.put(("shutdown failed", str(exc)))
