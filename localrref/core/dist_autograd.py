"""Distributed autograd's bookkeeping, one worker's half: contexts, send/recv records, passes, cleanup.

torch's design (docs: "Distributed Autograd Design"; C++
``DistAutogradContainer``, ``DistEngine``), reduced to what must agree
between workers. No tensors live here: the driver keeps the tensors of each
send and recv, runs the local gradient passes, and tells this object what a
pass produced. Like :class:`~localrref.core.RRefContext`, it takes messages
and calls in and leaves :mod:`effects <localrref.core.effects>`-style records
behind (``take_effects()``); the simulator (``localrref.testing.autograd_sim``)
runs several against reordered, duplicated and delayed messages.

* **Contexts.** ``new_context()`` makes an id unique in the world: the
  worker id in the high 16 bits, a counter below (torch's layout). A worker
  *knows* the workers it sent to or received from inside the context.
* **Forward.** Each RPC that carries tensors requiring grad inside a context
  is a *send* on the sender (``record_send`` gives its autograd message id)
  and a *recv* on the receiver (``record_recv``); the receiver joins the
  context then. Replies are sends and recvs the other way round.
* **Backward (FAST mode).** ``backward`` starts a local pass from the roots
  (:class:`RunPass`). When a pass reaches recv records, the driver reports
  their gradients (``pass_finished``); each goes to the worker that sent that
  tensor (:class:`PropagateGradients`), which runs a pass from that send and
  answers (:class:`PropagateDone`) only once its own onward gradients are
  answered. So ``backward`` completes (:class:`BackwardDone`) exactly when
  every worker it reached has finished, and the first error anywhere is its
  error.
* **Cleanup.** ``release_context`` (the ``with`` block ended) tells every
  known worker (:class:`CleanupContext`), and each passes it on to the
  workers *it* knows that the message does not list as told already (the
  creator usually knows them all: then nobody passes it on); a worker that learns of a context only after its
  cleanup went by (a call still in flight when the block ended) never
  re-creates it: released ids are remembered, compactly, per creator.
* **Deaths.** ``worker_died(w)`` fails every pass waiting on ``w`` and
  releases the contexts ``w`` created. The cleanup of a context that ``w``
  knew goes to every worker, since ``w`` may have passed it on.

Duplicated messages are harmless: gradients are applied once per
propagation id, cleanups and answers are idempotent.
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import Union

__all__ = [
    "AutogradContexts", "ContextError",
    "PropagateGradients", "PropagateDone", "CleanupContext", "AutogradMessage",
    "SendMessage", "RunPass", "BackwardDone", "ContextReleased", "Effect",
    "FromRoots", "FromSend", "Outgoing", "WORKER_BITS", "make_id", "max_id", "creator_of",
]

WORKER_BITS = 16
_LOCAL_BITS = 64 - WORKER_BITS
_LOCAL_MASK = (1 << _LOCAL_BITS) - 1


def make_id(worker: int, local: int) -> int:
    """torch's layout: the worker id in the high 16 bits of a 64-bit id."""
    return (worker << _LOCAL_BITS) | local


def max_id(worker: int) -> int:
    """The largest id ``worker`` can make."""
    return make_id(worker, _LOCAL_MASK)


def creator_of(any_id: int) -> int:
    return any_id >> _LOCAL_BITS


class ContextError(RuntimeError):
    """A context that does not exist (torch's wording), or a misuse of one."""


# -- messages between workers -------------------------------------------------

@dataclass(frozen=True, slots=True, kw_only=True)
class PropagateGradients:
    """Gradients for the tensors of send ``message_id``, from the worker that received them."""

    context_id: int
    message_id: int
    propagation_id: int
    grads: object
    # the backward's: what its passes do with the graph, and which backward they serve
    retain_graph: bool = False
    backward_id: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class PropagateDone:
    """Propagation ``propagation_id`` and everything it caused downstream have finished."""

    propagation_id: int
    error: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class CleanupContext:
    context_id: int
    informed: tuple[int, ...] = ()  # workers told already, sender included


AutogradMessage = Union[PropagateGradients, PropagateDone, CleanupContext]


# -- effects for the driver ---------------------------------------------------

@dataclass(frozen=True, slots=True, kw_only=True)
class SendMessage:
    dst: int
    message: AutogradMessage


@dataclass(frozen=True, slots=True, kw_only=True)
class FromRoots:
    """Start at the roots given to ``backward`` (the driver holds them under ``token``)."""

    token: object


@dataclass(frozen=True, slots=True, kw_only=True)
class FromSend:
    """Start at the tensors of send ``message_id``, with ``grads`` for them."""

    message_id: int
    grads: object


@dataclass(frozen=True, slots=True, kw_only=True)
class RunPass:
    """Run a local gradient pass in ``context_id``; report it with ``pass_finished(pass_id, ...)``.

    Gradients reaching leaves accumulate in the context; gradients reaching
    recv records are the pass's :class:`Outgoing`.
    """

    context_id: int
    pass_id: int
    start: FromRoots | FromSend
    retain_graph: bool = False  # what the user gave backward()
    backward_id: int = 0        # unique across the world: which backward this pass serves


@dataclass(frozen=True, slots=True, kw_only=True)
class BackwardDone:
    """``backward`` under ``token`` finished everywhere (``error`` None) or failed."""

    token: object
    error: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ContextReleased:
    """Drop everything kept for ``context_id`` (tensors, graphs, gradients)."""

    context_id: int


Effect = Union[SendMessage, RunPass, BackwardDone, ContextReleased]


@dataclass(frozen=True, slots=True, kw_only=True)
class Outgoing:
    """A pass's gradients for recv ``message_id``, which came from worker ``src``."""

    src: int
    message_id: int
    grads: object


# -- state ----------------------------------------------------------------------

@dataclass(slots=True)
class _Context:
    context_id: int
    known: set[int] = field(default_factory=set)
    sends: dict[int, int] = field(default_factory=dict)   # message id -> destination
    recvs: dict[int, int] = field(default_factory=dict)   # message id -> source
    passes: set[int] = field(default_factory=set)         # pass ids running in it
    # Incoming propagations: running (-> pass id), or answered (duplicates get
    # the same answer again). Dropped with the context.
    running: dict[int, int] = field(default_factory=dict)
    answered: dict[int, "PropagateDone"] = field(default_factory=dict)


class _Waiting(enum.Enum):
    LOCAL = "the local pass"
    ANSWERS = "answers from downstream"


@dataclass(slots=True)
class _Pass:
    """One local pass and the propagations it started.

    ``reply`` is where its completion goes: a ``backward`` token (``FromRoots``)
    or the (worker, propagation id) that asked for it (``FromSend``).
    """

    pass_id: int
    context_id: int
    reply: tuple[str, object]
    retain_graph: bool = False
    backward_id: int = 0
    waiting: _Waiting = _Waiting.LOCAL
    outstanding: dict[int, int] = field(default_factory=dict)  # propagation id -> worker
    error: str | None = None


@dataclass(slots=True)
class _Released:
    """Released context ids of one creator: all ids below ``below``, plus ``above``."""

    below: int = 1  # local ids start at 1
    above: set[int] = field(default_factory=set)

    def add(self, local: int) -> None:
        self.above.add(local)
        while self.below in self.above:  # creators release mostly in order: stays small
            self.above.remove(self.below)
            self.below += 1

    def __contains__(self, local: int) -> bool:
        return local < self.below or local in self.above


class AutogradContexts:
    """One worker's distributed autograd bookkeeping (see the module docstring)."""

    def __init__(self, worker_id: int, world_size: int) -> None:
        if not 0 <= worker_id < min(world_size, 1 << WORKER_BITS):
            raise ValueError(f"worker id {worker_id} does not fit a world of {world_size} "
                             f"workers and {WORKER_BITS} bits")
        self.worker_id = worker_id
        self.world_size = world_size
        self._contexts: dict[int, _Context] = {}
        self._passes: dict[int, _Pass] = {}
        self._released: dict[int, _Released] = {}
        self._dead: set[int] = set()
        self._next_context = itertools.count(1)
        self._next_message = itertools.count(1)
        self._next_pass = itertools.count(1)
        self._next_propagation = itertools.count(1)
        self._effects: list[Effect] = []

    # ------------------------------------------------------------ queries

    def take_effects(self) -> list[Effect]:
        effects, self._effects = self._effects, []
        return effects

    def has_context(self, context_id: int) -> bool:
        return context_id in self._contexts

    def contexts(self) -> tuple[int, ...]:
        return tuple(self._contexts)

    def known_workers(self, context_id: int) -> frozenset[int]:
        return frozenset(self._context(context_id).known)

    def debug_info(self) -> dict[str, int]:
        """Counters for ``get_debug_info`` (torch names its first one the same)."""
        return {
            "num_current_backward_passes": sum(
                1 for p in self._passes.values() if p.reply[0] == "backward"),
            "num_autograd_contexts": len(self._contexts),
            "num_send_functions": sum(len(c.sends) for c in self._contexts.values()),
            "num_recv_functions": sum(len(c.recvs) for c in self._contexts.values()),
        }

    def _context(self, context_id: int) -> _Context:
        try:
            return self._contexts[context_id]
        except KeyError:
            raise ContextError(f"Could not find autograd context with id: {context_id}") from None

    def _is_released(self, context_id: int) -> bool:
        released = self._released.get(creator_of(context_id))
        return released is not None and (context_id & _LOCAL_MASK) in released

    # ------------------------------------------------------------ forward

    def new_context(self) -> int:
        context_id = make_id(self.worker_id, next(self._next_context))
        self._contexts[context_id] = _Context(context_id)
        return context_id

    def record_send(self, context_id: int, dst: int) -> int:
        """A message to ``dst`` carries tensors requiring grad: its autograd message id."""
        context = self._context(context_id)
        message_id = make_id(self.worker_id, next(self._next_message))
        context.sends[message_id] = dst
        context.known.add(dst)
        return message_id

    def record_recv(self, context_id: int, src: int, message_id: int) -> bool:
        """A message from ``src`` carried tensors requiring grad; join the context if new.

        Returns False if the context was released already (its cleanup
        overtook this message): the driver then treats the tensors as
        plain tensors, and nothing is re-created.
        """
        if not self.join(context_id, src):
            return False
        self._contexts[context_id].recvs[message_id] = src
        return True

    def join(self, context_id: int, src: int) -> bool:
        """A message from ``src`` ran inside ``context_id`` without tensors: know it, join if new."""
        context = self._contexts.get(context_id)
        if context is None:
            if self._is_released(context_id) or creator_of(context_id) in self._dead:
                return False
            context = self._contexts[context_id] = _Context(context_id)
        context.known.add(src)
        return True

    # ------------------------------------------------------------ backward

    def backward(self, context_id: int, token: object, retain_graph: bool = False) -> int:
        """Start ``backward`` in ``context_id`` on this worker; returns the pass id."""
        context = self._context(context_id)
        return self._start_pass(context, ("backward", token), FromRoots(token=token),
                                retain_graph, None)

    def _start_pass(self, context: _Context, reply: tuple[str, object],
                    start: FromRoots | FromSend, retain_graph: bool,
                    backward_id: int | None) -> int:
        pass_id = next(self._next_pass)
        if backward_id is None:  # a backward starts here
            backward_id = make_id(self.worker_id, pass_id)
        self._passes[pass_id] = _Pass(pass_id=pass_id, context_id=context.context_id, reply=reply,
                                      retain_graph=retain_graph, backward_id=backward_id)
        context.passes.add(pass_id)
        self._effects.append(RunPass(context_id=context.context_id, pass_id=pass_id, start=start,
                                     retain_graph=retain_graph, backward_id=backward_id))
        return pass_id

    def pass_finished(self, pass_id: int, outgoing: tuple[Outgoing, ...] = (),
                      error: str | None = None) -> None:
        """The driver ran the local pass ``pass_id``: its gradients for recvs, or its error."""
        current = self._passes.get(pass_id)
        if current is None or current.waiting is not _Waiting.LOCAL:
            return  # failed already (a death, a release): its answer went out
        current.waiting = _Waiting.ANSWERS
        if error is not None:
            self._finish(current, error)
            return
        for out in outgoing:
            if out.src in self._dead:
                self._finish(current, _died(out.src))
                return
        context = self._contexts.get(current.context_id)
        for out in outgoing:
            propagation_id = make_id(self.worker_id, next(self._next_propagation))
            current.outstanding[propagation_id] = out.src
            if context is not None:
                context.known.add(out.src)
            self._effects.append(SendMessage(dst=out.src, message=PropagateGradients(
                context_id=current.context_id, message_id=out.message_id,
                propagation_id=propagation_id, grads=out.grads,
                retain_graph=current.retain_graph, backward_id=current.backward_id)))
        if not current.outstanding:
            self._finish(current, None)

    def _finish(self, current: _Pass, error: str | None) -> None:
        del self._passes[current.pass_id]
        context = self._contexts.get(current.context_id)
        if context is not None:
            context.passes.discard(current.pass_id)
        kind, target = current.reply
        if kind == "backward":
            self._effects.append(BackwardDone(token=target, error=error))
            return
        src, propagation_id = target
        answer = PropagateDone(propagation_id=propagation_id, error=error)
        if context is not None:
            context.running.pop(propagation_id, None)
            context.answered[propagation_id] = answer
        if src not in self._dead:
            self._effects.append(SendMessage(dst=src, message=answer))

    # ------------------------------------------------------------ messages

    def on_message(self, src: int, message: AutogradMessage) -> None:
        match message:
            case PropagateGradients():
                self._on_propagate(src, message)
            case PropagateDone():
                self._on_done(message)
            case CleanupContext(context_id=context_id, informed=informed):
                self._release(context_id, told_by=src, informed=informed)
            case _:
                raise TypeError(f"not a distributed autograd message: {message!r}")

    def _on_propagate(self, src: int, message: PropagateGradients) -> None:
        propagation_id = message.propagation_id
        context = self._contexts.get(message.context_id)
        if context is not None:
            answered = context.answered.get(propagation_id)
            if answered is not None:  # a duplicate of one we finished: the same answer again
                self._effects.append(SendMessage(dst=src, message=answered))
                return
            if propagation_id in context.running:
                return  # a duplicate of one still running: it will be answered once
        if context is None or message.message_id not in context.sends:
            what = (f"Could not find autograd context with id: {message.context_id}"
                    if context is None else
                    f"autograd context {message.context_id} on worker {self.worker_id} has no "
                    f"send function with message id {message.message_id}")
            self._effects.append(SendMessage(dst=src, message=PropagateDone(
                propagation_id=propagation_id, error=what)))
            return
        pass_id = self._start_pass(context, ("propagation", (src, propagation_id)),
                                   FromSend(message_id=message.message_id, grads=message.grads),
                                   message.retain_graph, message.backward_id)
        context.running[propagation_id] = pass_id

    def _on_done(self, message: PropagateDone) -> None:
        for current in self._passes.values():
            if message.propagation_id in current.outstanding:
                del current.outstanding[message.propagation_id]
                if message.error is not None and current.error is None:
                    current.error = message.error
                if not current.outstanding and current.waiting is _Waiting.ANSWERS:
                    self._finish(current, current.error)
                return
        # Not outstanding: a duplicate, or the pass already failed (a death).

    # ------------------------------------------------------------ cleanup, deaths

    def release_context(self, context_id: int) -> None:
        """The ``with`` block of ``context_id`` ended here: release it everywhere it went."""
        self._context(context_id)
        self._release(context_id, told_by=None)

    def _release(self, context_id: int, told_by: int | None, quietly: bool = False,
                 informed: tuple[int, ...] = ()) -> None:
        context = self._contexts.pop(context_id, None)
        self._released.setdefault(creator_of(context_id), _Released()).add(
            context_id & _LOCAL_MASK)
        if context is None:
            return  # never joined, or released already: nothing to pass on
        for pass_id in sorted(context.passes):
            current = self._passes.get(pass_id)
            if current is not None:
                self._finish(current, f"autograd context {context_id} was released while "
                                      f"a backward pass was running in it")
        self._effects.append(ContextReleased(context_id=context_id))
        if quietly:
            return
        # A known worker that died may have passed the context on to workers
        # we never heard of, and cannot pass the cleanup on: tell everyone.
        targets = set(range(self.world_size)) if context.known & self._dead else context.known
        targets = sorted(targets - {told_by, self.worker_id} - self._dead - set(informed))
        told = tuple(sorted({self.worker_id, *informed, *targets}
                            | ({told_by} if told_by is not None else set())))
        for worker in targets:
            self._effects.append(SendMessage(dst=worker, message=CleanupContext(
                context_id=context_id, informed=told)))

    def forget_all(self) -> tuple[int, ...]:
        """Shutdown: drop every context here, telling no one (every worker does the same).

        Returns the ids dropped. A backward still running fails.
        """
        dropped = tuple(self._contexts)
        for context_id in dropped:
            self._release(context_id, told_by=None, quietly=True)
        return dropped

    def worker_died(self, worker: int) -> None:
        """Fail what waits on ``worker``; release the contexts it created."""
        if worker in self._dead:
            return
        self._dead.add(worker)
        for current in list(self._passes.values()):
            if worker in current.outstanding.values():
                current.outstanding = {p: w for p, w in current.outstanding.items() if w != worker}
                current.error = current.error or _died(worker)
                if current.waiting is _Waiting.ANSWERS:
                    self._finish(current, current.error)
        for context_id in [c for c in self._contexts if creator_of(c) == worker]:
            self._release(context_id, told_by=None)


def _died(worker: int) -> str:
    return f"Error on Node {worker}: worker {worker} died during the distributed backward pass"
