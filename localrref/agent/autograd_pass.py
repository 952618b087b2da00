"""One local gradient pass of distributed autograd (torch's FAST mode), on tensors.

The protocol (``core/dist_autograd.py``) decides *when* a pass runs and where
its results go; this module runs it. A pass starts at some tensors (the
roots of ``backward``, or the tensors a send carried) with gradients for
them, and goes through this worker's autograd graph to its leaves:

* a tensor that arrived in an RPC (a *recv* tensor) is an output of that
  message's ``RecvRpcBackward`` node (:func:`attach_recv`), as under torch:
  the gradients that reach the node must travel back to the worker that
  sent the message, and the pass returns those;
* any leaf that requires grad accumulates its gradient in the context
  (never in ``.grad``: that is what ``get_gradients`` returns).

The graph is kept (``retain_graph=True``): in FAST mode a part of it may be
reached again by a later pass of the same backward; it is freed with the
context. A ``backward`` without ``retain_graph`` marks the nodes its passes
went through (:func:`saves_tensors` tells which ones torch would have
freed), so that a second ``backward`` through them fails as torch's does.
"""

from __future__ import annotations

import threading
from typing import Callable, Sequence

import torch

__all__ = ["EarlierLeaves", "find_leaves", "run_pass", "saves_tensors", "engine_backward",
           "send_node", "attach_recv", "is_recv_node", "SECOND_BACKWARD", "GRAD_LOCK"]

# Held by whatever sets parameters' ``.grad`` aside for a moment: a pass (see
# _leaf_gradients) and a DistributedOptimizer step (optim/). Two of them at
# once on one parameter server's weights would read, or add into, each
# other's gradients.
GRAD_LOCK = threading.Lock()

# torch's words, for a backward through a graph whose saved tensors were freed
SECOND_BACKWARD = (
    "Trying to backward through the graph a second time (or directly access saved tensors "
    "after they have already been freed). Saved intermediate values of the graph are freed "
    "when you call .backward() or autograd.grad(). Specify retain_graph=True if you need to "
    "backward through the graph a second time or if you need to access saved tensors after "
    "calling backward.")


# torch's names for the two autograd nodes of an RPC (its C++ classes in
# torch::distributed::autograd), so that a graph prints and compares the same
# on either engine.
SEND_NODE_NAME = "torch::distributed::autograd::SendRpcBackward"
RECV_NODE_NAME = "torch::distributed::autograd::RecvRpcBackward"

# What attach_recv hands the forward of RecvRpc: the received tensors travel
# outside apply's arguments, since autograd makes an argument returned as it
# is into a new view, and the user's object must be the one that gets the
# node (torch sets the history of the received tensor itself).
_RECEIVED = threading.local()


def _recv_forward(ctx, anchor):
    tensors, ctx.src, ctx.message_id = _RECEIVED.args
    ctx.captured = None
    return tensors


def _recv_backward(ctx, *grads):
    # The pass that runs this node reads the gradients off it (run_pass); the
    # anchor gets none. An output no gradient reached gets zeros (autograd
    # materialises them), as torch's RecvRpcBackward sends zeros for it: the
    # sender's leaf then has a gradient in the context, which
    # DistributedOptimizer steps.
    ctx.captured = grads
    return None


# Its backward class is named RECV_NODE_NAME: autograd names a Function's
# node after the Function, plus "Backward".
RecvRpc = type(RECV_NODE_NAME[:-len("Backward")], (torch.autograd.Function,),
               {"forward": staticmethod(_recv_forward),
                "backward": staticmethod(_recv_backward),
                "__doc__": "The node of one received message; see attach_recv."})


def attach_recv(tensors: Sequence[torch.Tensor], src: int, message_id: int):
    """Make ``tensors``, the tensors that arrived requiring grad in message
    ``message_id`` from ``src``, the outputs of one ``RecvRpcBackward`` node,
    in place, and return the node.

    As under torch, a received tensor is then no leaf: the program may
    change it in place, and its ``grad_fn`` is the node, shared by the
    message's tensors. The node hangs off a leaf of its own, an empty
    *anchor*, so that a pass that asks for the gradients of its leaves runs
    the node; :func:`run_pass` takes the gradients that reached it for
    ``src``, zeros for an output none reached. ``tensors`` must be leaves;
    they stop requiring grad until the node is attached.
    """
    tensors = tuple(tensors)
    for tensor in tensors:
        tensor.requires_grad_(False)
    anchor = torch.empty(0, requires_grad=True)
    _RECEIVED.args = (tensors, src, message_id)
    try:
        with torch.enable_grad():
            outputs = RecvRpc.apply(anchor)
    finally:
        _RECEIVED.args = None
    return outputs[0].grad_fn


def is_recv_node(node) -> bool:
    return type(node) is RecvRpc._backward_cls


def _send_forward(ctx, *tensors):
    ctx.count = len(tensors)
    return torch.empty(0)


def _send_backward(ctx, grad):
    return (None,) * ctx.count


SendRpc = type(SEND_NODE_NAME[:-len("Backward")], (torch.autograd.Function,),
               {"forward": staticmethod(_send_forward),
                "backward": staticmethod(_send_backward),
                "__doc__": "Builds the node that send_node shows; never part of a pass."})


def send_node(tensors: Sequence[torch.Tensor]):
    """An autograd node standing for one send, for inspection: its
    ``next_functions`` are the edges of the tensors the send carried (an
    ``AccumulateGrad`` for a leaf, the ``grad_fn`` of any other), in order,
    as those of torch's ``SendRpcBackward``, whose name it has. Passes never
    run it: they start from the tensors.
    """
    with torch.enable_grad():
        return SendRpc.apply(*tensors).grad_fn


def saves_tensors(node) -> bool:
    """Whether autograd ``node`` keeps tensors for backward (what retain_graph=False frees)."""
    try:
        return (any(name.startswith("_raw_saved_") for name in dir(node))
                or bool(getattr(node, "saved_tensors", None)))
    except RuntimeError:  # a custom Function's saved tensors, freed already
        return True


def find_leaves(starts: Sequence[torch.Tensor],
                nodes: list | None = None) -> list[torch.Tensor]:
    """Every leaf requiring grad that ``starts`` depend on (or are), each once, in graph order.

    ``nodes``: collects the graph's nodes on the way.
    """
    leaves: list[torch.Tensor] = []
    seen_leaves: set[int] = set()
    seen_nodes: set[int] = set()
    stack = []
    for tensor in starts:
        if tensor.grad_fn is None:
            if tensor.requires_grad and id(tensor) not in seen_leaves:
                seen_leaves.add(id(tensor))
                leaves.append(tensor)
        else:
            stack.append(tensor.grad_fn)
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen_nodes:
            continue
        seen_nodes.add(id(node))
        if nodes is not None:
            nodes.append(node)
        variable = getattr(node, "variable", None)  # AccumulateGrad: the leaf
        if variable is not None:
            if id(variable) not in seen_leaves:
                seen_leaves.add(id(variable))
                leaves.append(variable)
            continue
        stack.extend(next_node for next_node, _ in node.next_functions)
    return leaves


def run_pass(starts: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None],
             accumulate: Callable[[torch.Tensor, torch.Tensor], None],
             visit: Callable[[list], None] | None = None,
             earlier: "EarlierLeaves | None" = None,
             replace: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
             ) -> dict[tuple[int, int], dict[int, torch.Tensor]]:
    """Run one pass; returns the gradients that reached received tensors, by the
    (src, message id) of their message and their index in it.

    A start with no gradient (None) is skipped; gradients are summed where
    a leaf is reached from several starts, as autograd sums them. ``visit``
    gets the graph's nodes before anything runs (it may raise to stop the pass).

    ``earlier``: the leaves that the earlier passes of this backward on this
    worker took gradients of (see :class:`EarlierLeaves`); one whose ``.grad``
    this pass rewrote gets that as its gradient through ``replace``.
    """
    pairs = [(t, g) for t, g in zip(starts, grads, strict=True)
             if g is not None and t.requires_grad]
    if not pairs:
        return {}
    outputs = [t for t, _ in pairs]
    nodes: list = []
    leaves = find_leaves(outputs, nodes)
    if visit is not None:
        visit(nodes)
    if not leaves:
        return {}
    recv_nodes = [node for node in nodes if is_recv_node(node)]
    found, rewritten, captured = _leaf_gradients(outputs, [g for _, g in pairs], leaves,
                                                 earlier, recv_nodes)
    if replace is not None:
        for leaf, grad in rewritten:
            replace(leaf, grad)
    for leaf, grad in zip(leaves, found):
        if grad is not None:  # an anchor gets none (_recv_backward)
            accumulate(leaf, grad)
    outgoing: dict[tuple[int, int], dict[int, torch.Tensor]] = {}
    for node, node_grads in zip(recv_nodes, captured):
        by_index = {i: g for i, g in enumerate(node_grads or ()) if g is not None}
        if by_index:
            outgoing.setdefault((node.src, node.message_id), {}).update(by_index)
    return outgoing


class EarlierLeaves:
    """The leaves that earlier passes of one backward on this worker took gradients of.

    DistributedDataParallel's reducer writes the averaged gradients of every
    parameter in its buckets once the last bucket is ready, at the end of
    that pass: when the parameters were reached by several passes (a model
    whose forward goes through an RPC and back, wrapped whole in DDP), that
    writes the ``.grad`` of leaves an earlier pass already took. Under
    torch, whose engine runs one graph task per worker and backward, the
    reducer writes into the context instead; here a pass finds the ``.grad``
    of an earlier leaf rewritten *during* it, hands that to the context in
    place of what the earlier pass took, and puts ``.grad`` back.
    """

    __slots__ = ("_leaves",)

    def __init__(self) -> None:
        self._leaves: dict[int, torch.Tensor] = {}

    def note(self, leaves: list[torch.Tensor]) -> None:
        for leaf in leaves:
            self._leaves[id(leaf)] = leaf

    def others(self, leaves: list[torch.Tensor]) -> list[torch.Tensor]:
        skip = {id(leaf) for leaf in leaves}
        return [leaf for key, leaf in self._leaves.items() if key not in skip]


def _leaf_gradients(outputs: list[torch.Tensor], grad_outputs: list[torch.Tensor],
                    leaves: list[torch.Tensor], earlier: EarlierLeaves | None = None,
                    recv_nodes: Sequence = (),
                    ) -> tuple[list[torch.Tensor | None], list[tuple[torch.Tensor, torch.Tensor]],
                               list[tuple | None]]:
    """The gradients of ``leaves``, computed by running their AccumulateGrad nodes,
    the leaves of earlier passes whose ``.grad`` the pass rewrote (see
    :class:`EarlierLeaves`), with their new gradients, and the gradients
    that reached each of ``recv_nodes`` (None for one the pass did not run),
    taken off the node before another pass can run it.

    ``torch.autograd.grad`` would capture them without running those nodes,
    and so without the hooks registered on them: DistributedDataParallel's
    reducer is one (its all-reduce starts from a hook on each parameter's
    accumulator), and torch's distributed engine runs them. So the pass
    accumulates into ``.grad`` of each leaf, set to None for it, takes the
    result, and puts back what ``.grad`` held: the hooks run, and after the
    pass ``.grad`` is what it was (DDP's averaged gradient is what the pass
    takes, as under torch, where the reducer writes into the context).

    A gradient that is a view is copied: DDP with ``gradient_as_bucket_view``
    leaves a view of its bucket in ``.grad``, which its next iteration
    overwrites, and the context must keep this one's.
    """
    with GRAD_LOCK:
        kept = [leaf.grad for leaf in leaves]
        others = [] if earlier is None else earlier.others(leaves)
        before = [(leaf.grad, -1 if leaf.grad is None else leaf.grad._version)
                  for leaf in others]
        rewritten: list[tuple[torch.Tensor, torch.Tensor]] = []
        try:
            for leaf in leaves:
                leaf.grad = None
            for node in recv_nodes:
                node.captured = None
            engine_backward(outputs, grad_outputs, inputs=leaves)
            found = [None if leaf.grad is None else _own(leaf.grad) for leaf in leaves]
            captured = [node.captured for node in recv_nodes]
            for leaf, (grad, version) in zip(others, before):
                now = leaf.grad
                if now is None or (now is grad and now._version == version):
                    continue
                # Rewritten in place, it is the user's .grad tensor: a copy.
                rewritten.append((leaf, now.clone() if now is grad else _own(now)))
            return found, rewritten, captured
        finally:
            for node in recv_nodes:
                node.captured = None
            for leaf, grad in zip(leaves, kept):
                leaf.grad = grad
            for leaf, (grad, _) in zip(others, before):
                leaf.grad = grad  # a tensor rewritten in place keeps its new values
            if earlier is not None:
                earlier.note(leaves)


def engine_backward(outputs: Sequence[torch.Tensor],
                    grad_outputs: Sequence[torch.Tensor | None] | None = None, *,
                    retain_graph: bool = True, inputs: Sequence[torch.Tensor] = ()) -> None:
    """``torch.autograd.backward(outputs, grad_outputs, retain_graph, inputs=inputs)``,
    without the Python object that call stashes in the thread's state for the run.

    A collective that a hook starts during the pass (DDP's all-reduce)
    captures that state, and gloo's worker thread frees it after the work,
    which takes the GIL. A thread that holds the GIL meanwhile and destroys
    the process group (a DDP trainer's frame ending, whose Reducer held the
    last reference to it) joins that worker thread: both wait for ever.
    torch's distributed backward runs its engine from C++, with no Python
    object in that state; this runs it the same way.
    """
    outputs = tuple(outputs)
    if grad_outputs is None:
        grad_outputs = (None,) * len(outputs)
    engine = getattr(torch.autograd.Variable, "_execution_engine", None)
    make_grads = getattr(torch.autograd, "_make_grads", None)
    if engine is None or make_grads is None:  # another torch: its public call
        torch.autograd.backward(outputs, tuple(grad_outputs), retain_graph=retain_graph,
                                inputs=tuple(inputs) or None)
        return
    grads = make_grads(outputs, tuple(grad_outputs), is_grads_batched=False)
    engine.run_backward(outputs, grads, retain_graph, False, tuple(inputs),
                        allow_unreachable=True, accumulate_grad=True)


def _own(grad: torch.Tensor) -> torch.Tensor:
    # A view (DDP's gradient_as_bucket_view) is overwritten by the next
    # iteration: the context keeps a copy.
    return grad.clone() if grad._base is not None else grad
