"""Distributed autograd in a running agent: the shell around ``core/dist_autograd.py``.

The core decides; this part holds the tensors and acts:

* per context, the tensors of every send (by autograd message id), the
  ``RecvRpcBackward`` node of every recv (by message id; the received
  tensors are its outputs, see ``autograd_pass.attach_recv``), and the
  gradients accumulated on this worker (what ``get_gradients`` returns);
* the *forward* hooks: a call made, or a reply sent, by a thread inside a
  context is pickled with the tensors that require grad collected
  (``codec.pickler.dumps(grads=...)``); if the context is set, the bytes get
  a header (context id, message id), so calls outside a context cost
  nothing and no frame format changes; the receiver strips it, records the
  recv and runs the function inside the context;
* the protocol's messages travel in frames of their own
  (``Agent.send_autograd``), read and handled by the inbox's reader
  itself, local passes included: no job, no reply;
* ``RunPass`` runs the local pass (``autograd_pass.run_pass``) in the thread
  that got the effect; ``BackwardDone`` wakes the thread in ``backward``.

Which thread touches what: the tables and the core are guarded by
``self.lock``; effects are carried out with no lock held. The current
context is thread-local; a job runs with its request's context current.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import struct
import threading

import torch

from ..core import dist_autograd as da
from .autograd_pass import (SECOND_BACKWARD, EarlierLeaves, attach_recv, run_pass,
                            saves_tensors, send_node)

__all__ = ["Tape", "HEADER", "split_header", "is_builtin", "AUTOGRAD_DEBUG_KEYS"]

log = logging.getLogger("localrref")

try:
    # torch's own test for "a builtin operator" (rpc/api.py _invoke_rpc)
    from torch.jit._builtins import _find_builtin
except ImportError:  # another torch: every call takes the context along
    def _find_builtin(func):
        return None


# torch's dist_autograd._get_debug_info() has these two keys, and no more
AUTOGRAD_DEBUG_KEYS = ("num_current_backward_passes", "num_autograd_contexts")


def builtin_name(func) -> str | None:
    """The schema name (``aten::add``) under which torch sends a call of ``func`` as a
    builtin operator; None for a Python function."""
    try:
        return _find_builtin(func)
    except TypeError:  # unhashable: not an operator
        return None


def is_builtin(func) -> bool:
    """Whether torch sends a call of ``func`` as a builtin operator (not a Python function)."""
    return builtin_name(func) is not None


HEADER = b"\x02"  # the codec's own prefixes are \x00, \x01 and a pickle's \x80
_IDS = struct.Struct("<qq")


def split_header(data: bytes) -> tuple[bytes, int, int] | None:
    """``(payload, context id, message id)`` if ``data`` carries a context, else None."""
    if data[:1] != HEADER:
        return None
    context_id, message_id = _IDS.unpack_from(data, 1)
    return data[1 + _IDS.size:], context_id, message_id


class _Tables:
    __slots__ = ("sends", "send_nodes", "recv_nodes", "recv_tensors", "grads", "freed",
                 "earlier")

    def __init__(self) -> None:
        self.sends: dict[int, list[torch.Tensor]] = {}
        self.send_nodes: dict[int, object] = {}  # message id -> its node, once asked for
        self.recv_nodes: dict[int, object] = {}  # message id -> its RecvRpcBackward node
        self.recv_tensors = 0  # how many tensors those nodes gave
        self.grads: dict[torch.Tensor, torch.Tensor] = {}
        # nodes a backward without retain_graph went through, by id (the
        # node is kept, so its id stays its own)
        self.freed: dict[int, tuple] = {}  # id(node) -> (node, backward id)
        self.earlier: dict[int, EarlierLeaves] = {}  # backward id -> its passes' leaves


class Tape:
    """One agent's distributed autograd (see the module docstring)."""

    def __init__(self, agent) -> None:
        self.agent = agent
        self.lock = threading.Lock()
        self.core = da.AutogradContexts(agent.rank, agent.world_size)
        self._tables: dict[int, _Tables] = {}
        self._local = threading.local()
        # backward token -> the future of its outcome (None, or the error's text)
        self._waiters: dict[object, torch.futures.Future] = {}
        self._roots: dict[object, list] = {}    # backward token -> its roots

    # -- the current context ---------------------------------------------------

    def current(self) -> int | None:
        return getattr(self._local, "context_id", None)

    @contextlib.contextmanager
    def running_in(self, context_id: int | None):
        previous = self.current()
        self._local.context_id = context_id
        try:
            yield
        finally:
            self._local.context_id = previous

    def new_context(self) -> int:
        if self.current() is not None:
            raise RuntimeError("Already have an autograd context id for this thread.")
        with self.lock:
            context_id = self.core.new_context()
            self._tables[context_id] = _Tables()
        self._local.context_id = context_id
        return context_id

    def release(self, context_id: int) -> None:
        """The ``with`` block ended: release the context here and everywhere it went."""
        if self.current() == context_id:
            self._local.context_id = None
        with self.lock:
            if not self.core.has_context(context_id):
                return  # released already (its creator died, say)
            self.core.release_context(context_id)
            effects = self.core.take_effects()
        self._run(effects)

    def debug_info(self) -> dict[str, int]:
        with self.lock:
            return self.core.debug_info()

    def known_workers(self, context_id: int) -> frozenset[int]:
        """The workers ``context_id`` went to or came from; torch's error if it is gone."""
        with self.lock:
            self._check_context_locked(context_id)
            return self.core.known_workers(context_id)

    def send_functions(self, context_id: int) -> dict:
        """torch's ``_send_functions()``: message id -> a node standing for that send
        (:func:`~localrref.agent.autograd_pass.send_node`), the same node each time."""
        with self.lock:
            self._check_context_locked(context_id)
            tables = self._tables.get(context_id)
            if tables is None:
                return {}
            for message_id, tensors in tables.sends.items():
                if message_id not in tables.send_nodes:
                    tables.send_nodes[message_id] = send_node(tensors)
            return dict(tables.send_nodes)

    def recv_functions(self, context_id: int) -> dict:
        """torch's ``_recv_functions()``: message id -> the ``RecvRpcBackward`` node whose
        outputs are the tensors that message brought."""
        with self.lock:
            self._check_context_locked(context_id)
            tables = self._tables.get(context_id)
            return {} if tables is None else dict(tables.recv_nodes)

    def leak_records(self) -> list[dict]:
        """The contexts this worker made that are still alive (their ``with`` never ended)."""
        with self.lock:
            records = []
            for context_id in self.core.contexts():
                if da.creator_of(context_id) != self.agent.rank:
                    continue  # its creator reports it
                tables = self._tables.get(context_id)
                records.append({
                    "state": "autograd_context", "context_id": context_id,
                    "rref_id": None, "fork_id": None,
                    "holder_rank": self.agent.rank,
                    "known_workers": sorted(self.core.known_workers(context_id)),
                    "send_functions": len(tables.sends) if tables is not None else 0,
                    "recv_tensors": tables.recv_tensors if tables is not None else 0})
            return records

    def forget_all(self) -> None:
        """Graceful shutdown: drop every context here (each worker drops its own)."""
        with self.lock:
            self.core.forget_all()
            effects = self.core.take_effects()
        self._run(effects)

    # -- forward ---------------------------------------------------------------

    def encode(self, dst: int, obj, context_id: int, always: bool = True):
        """Pickle ``obj`` for ``dst`` inside ``context_id``: ``(data, forks)`` with the header.

        ``always`` False: only if ``obj`` holds tensors that require grad;
        otherwise plain, outside the context (torch's builtin operators).
        """
        grads: list[torch.Tensor] = []
        encoded = self.agent.encode(obj, grads=grads)
        if not grads and not always:
            return encoded.data, encoded.forks
        message_id = 0
        with self.lock:
            if self.core.has_context(context_id):
                if grads:
                    message_id = self.core.record_send(context_id, dst)
                    self._tables[context_id].sends[message_id] = grads
                else:
                    self.core.join(context_id, dst)
        return HEADER + _IDS.pack(context_id, message_id) + encoded.data, encoded.forks

    def header(self, dst: int, context_id: int) -> bytes:
        """A request for ``dst`` that carries no tensors but runs in ``context_id``
        (``to_here()``): the header alone, with ``dst`` now known to the context."""
        with self.lock:
            if self.core.has_context(context_id):
                self.core.join(context_id, dst)
        return HEADER + _IDS.pack(context_id, 0)

    def joined(self, src: int, header: bytes) -> int | None:
        """Join the context of a :meth:`header` from ``src``: its id, or None if released."""
        split = split_header(header)
        if split is None:
            return None
        _, context_id, _ = split
        with self.lock:
            if not self.core.join(context_id, src):
                return None
            self._tables.setdefault(context_id, _Tables())
        return context_id

    def decode(self, src: int, data: bytes, loads) -> tuple[object, int | None]:
        """Unpickle ``data`` from ``src`` (``loads(payload, grads)``); its context id, if any."""
        split = split_header(data)
        if split is None:
            return loads(data, None), None
        payload, context_id, message_id = split
        grads: list[torch.Tensor] = []
        value = loads(payload, grads)
        with self.lock:
            if message_id and grads:
                joined = self.core.record_recv(context_id, src, message_id)
            else:
                joined = self.core.join(context_id, src)
            if not joined:
                return value, None  # released before this landed: plain tensors
            tables = self._tables.setdefault(context_id, _Tables())
            if message_id and grads:
                tables.recv_nodes[message_id] = attach_recv(grads, src, message_id)
                tables.recv_tensors += len(grads)
        return value, context_id

    # -- backward ----------------------------------------------------------------

    def backward(self, context_id: int, roots, retain_graph: bool = False) -> None:
        if (not isinstance(context_id, int) or isinstance(context_id, bool)
                or not isinstance(roots, (list, tuple))
                or not all(isinstance(root, torch.Tensor) for root in roots)):
            # torch's binding refuses these before anything runs, in pybind's words.
            raise TypeError(
                "backward(): incompatible function arguments. The following argument types are "
                "supported:\n    1. (context_id: int, roots: list[torch.Tensor], "
                f"retain_graph: bool = False) -> None\n\nInvoked with: {context_id!r}, "
                f"{roots!r}")
        roots = list(roots)
        # torch's checks (DistEngine::execute: the context, then
        # validateRootsAndRetrieveEdges), in its order and words.
        self.check_context(context_id)
        if not roots:
            raise RuntimeError("No tensors provided for gradient computation.")
        for root in roots:
            if not root.requires_grad:
                raise RuntimeError("requires_grad not set on root")
            if root.numel() != 1:
                raise RuntimeError(" is not a scalar, all roots need to be scalar")
            if root.grad_fn is None:
                raise RuntimeError(" does not have a valid gradient function.")
        with _profiled(BACKWARD_EVENT):
            self._backward(context_id, roots, retain_graph)

    def _backward(self, context_id: int, roots: list, retain_graph: bool) -> None:
        token = object()
        waiter = torch.futures.Future()
        with self.lock:
            self._waiters[token] = waiter
            try:
                self.core.backward(context_id, token, retain_graph)
            except BaseException:
                del self._waiters[token]
                raise
            self._roots[token] = roots
            effects = self.core.take_effects()
        try:
            self._run(effects)
            # Read the inbox meanwhile, as rpc_sync does: the answers that end
            # the backward arrive there.
            error = self.agent.reader.wait_reply(waiter)
        finally:
            with self.lock:
                self._roots.pop(token, None)
        if error is not None:
            raise RuntimeError(error)

    def check_context(self, context_id: int) -> None:
        """torch's error if ``context_id`` is not a context this worker knows."""
        with self.lock:
            self._check_context_locked(context_id)

    def _check_context_locked(self, context_id: int) -> None:
        if not self.core.has_context(context_id):
            raise RuntimeError(f"Could not find autograd context with id: {context_id}")

    def get_gradients(self, context_id: int) -> dict:
        with self.lock:
            self._check_context_locked(context_id)
            return dict(self._tables[context_id].grads)

    # -- messages and effects ----------------------------------------------------

    def on_message(self, src: int, message) -> None:
        with self.lock:
            self.core.on_message(src, message)
            effects = self.core.take_effects()
        self._run(effects)

    def worker_died(self, rank: int) -> None:
        with self.lock:
            self.core.worker_died(rank)
            effects = self.core.take_effects()
        self._run(effects)

    def _run(self, effects) -> None:
        for effect in effects:
            match effect:
                case da.SendMessage(dst=dst, message=message):
                    self._send(dst, message)
                case da.RunPass():
                    self._run_pass(effect)
                case da.BackwardDone(token=token, error=error):
                    waiter = self._waiters.pop(token, None)
                    if waiter is not None:
                        waiter.set_result(error)
                case da.ContextReleased(context_id=context_id):
                    with self.lock:
                        self._tables.pop(context_id, None)

    def _send(self, dst: int, message) -> None:
        try:
            self.agent.send_autograd(dst, message)
        except Exception as exc:  # closing, or dst is gone: the core hears of deaths
            log.debug("localrref: autograd message to rank %d not sent: %s", dst, exc)

    def _run_pass(self, run: da.RunPass) -> None:
        with self.lock:
            tables = self._tables.get(run.context_id)
        error, outgoing = None, ()
        if tables is not None:
            try:
                match run.start:
                    case da.FromRoots(token=token):
                        with self.lock:
                            starts = self._roots[token]
                        grads = [torch.ones_like(r) for r in starts]
                        event = None
                    case da.FromSend(message_id=message_id, grads=by_index):
                        starts = tables.sends.get(message_id, [])
                        grads = [by_index.get(i) for i in range(len(starts))]
                        event = SEND_EVENT
                visit = functools.partial(_free, tables.freed, run.backward_id, run.retain_graph)
                with self.lock:
                    earlier = tables.earlier.setdefault(run.backward_id, EarlierLeaves())
                with _profiled(event):
                    found = run_pass(starts, grads,
                                     lambda leaf, grad: _accumulate(self.lock, tables.grads,
                                                                    leaf, grad), visit, earlier,
                                     lambda leaf, grad: _replace(self.lock, tables.grads, leaf,
                                                                 grad))
                outgoing = tuple(da.Outgoing(src=src, message_id=message_id, grads=by_index)
                                 for (src, message_id), by_index in found.items())
            except Exception as exc:  # noqa: BLE001 - the error travels to backward's caller
                # torch's words: the caller of backward sees which worker failed.
                error = f"Error on Node {self.agent.rank}: {exc}"
        with self.lock:
            self.core.pass_finished(run.pass_id, outgoing, error)
            effects = self.core.take_effects()
        self._run(effects)


# torch's profiler events of a distributed backward, under torch's names, so
# that a profile reads the same on either engine: the whole backward on its
# caller, and a pass from the gradients that came back for a send (torch runs
# its SendRpcBackward node there). The third, RecvRpcBackward, is autograd's
# own event for the node of a received message (autograd_pass.attach_recv).
BACKWARD_EVENT = "torch::distributed::autograd::backward"
SEND_EVENT = "torch::distributed::autograd::SendRpcBackward"


def _profiled(name: str | None):
    """``record_function(name)`` while torch's profiler runs (it costs about 4 us even
    when none does, so it is skipped then)."""
    if name is not None and torch.autograd._profiler_enabled():
        return torch.autograd.profiler.record_function(name)
    return contextlib.nullcontext()


def _free(freed: dict, backward_id: int, retain_graph: bool, nodes: list) -> None:
    """A pass of ``backward_id`` goes through ``nodes``: fail (torch's error) where an
    earlier backward without retain_graph went, and mark them if this one has none.

    Passes of one backward may share nodes (FAST mode runs one pass per
    arriving gradient; torch runs them once): a backward never trips on itself.
    """
    for node in nodes:
        mark = freed.get(id(node))
        if mark is not None and mark[1] != backward_id and saves_tensors(node):
            raise RuntimeError(SECOND_BACKWARD)
    if not retain_graph:
        for node in nodes:
            freed.setdefault(id(node), (node, backward_id))


def _replace(lock, grads: dict, leaf, grad) -> None:
    with lock:
        grads[leaf] = grad


def _accumulate(lock, grads: dict, leaf, grad) -> None:
    with lock:
        previous = grads.get(leaf)
        grads[leaf] = grad if previous is None else previous + grad

