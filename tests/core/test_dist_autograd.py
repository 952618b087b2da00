"""Distributed autograd's bookkeeping, one worker at a time (localrref.core.dist_autograd)."""

from __future__ import annotations

import pytest

from localrref.core import dist_autograd as da


def two():
    return da.AutogradContexts(0, 3), da.AutogradContexts(1, 3)


def sends(effects):
    return [(e.dst, e.message) for e in effects if isinstance(e, da.SendMessage)]


def test_context_ids_carry_the_worker_in_the_high_16_bits():
    worker = da.AutogradContexts(5, 8)
    first, second = worker.new_context(), worker.new_context()
    assert first >> 48 == 5 and second >> 48 == 5 and first != second
    assert da.creator_of(first) == 5
    with pytest.raises(ValueError, match="does not fit"):
        da.AutogradContexts(8, 8)


def test_an_unknown_context_is_named_in_torchs_words():
    worker = da.AutogradContexts(0, 2)
    with pytest.raises(da.ContextError, match="Could not find autograd context with id: 7"):
        worker.backward(7, token="t")
    with pytest.raises(da.ContextError, match="Could not find autograd context with id: 7"):
        worker.record_send(7, 1)


def test_a_receiver_joins_and_both_sides_know_each_other():
    a, b = two()
    ctx = a.new_context()
    message_id = a.record_send(ctx, 1)
    assert b.record_recv(ctx, 0, message_id)
    assert a.known_workers(ctx) == {1} and b.known_workers(ctx) == {0}
    assert a.debug_info()["num_send_functions"] == 1 and b.debug_info()["num_recv_functions"] == 1


def test_backward_completes_after_the_downstream_pass_answers():
    a, b = two()
    ctx = a.new_context()
    # forward: b sent a a tensor (say, a reply), which a used
    message_id = b.record_send(ctx, 0) if b.join(ctx, 0) else None
    a.record_recv(ctx, 1, message_id)
    pass_id = a.backward(ctx, token="bw")
    backward_id = da.make_id(0, pass_id)
    assert a.take_effects() == [da.RunPass(context_id=ctx, pass_id=pass_id,
                                           start=da.FromRoots(token="bw"),
                                           backward_id=backward_id)]
    a.pass_finished(pass_id, (da.Outgoing(src=1, message_id=message_id, grads="g"),))
    [(dst, propagate)] = sends(a.take_effects())
    assert dst == 1 and propagate.grads == "g" and propagate.message_id == message_id
    b.on_message(0, propagate)
    [run] = b.take_effects()
    assert run.start == da.FromSend(message_id=message_id, grads="g")
    # every pass of one backward knows it, wherever it runs (what retain_graph=False marks)
    assert run.backward_id == backward_id and not run.retain_graph
    b.on_message(0, propagate)  # a duplicate while it runs: nothing new
    assert b.take_effects() == []
    b.pass_finished(run.pass_id)
    [(dst, answer)] = sends(b.take_effects())
    assert dst == 0 and answer == da.PropagateDone(propagation_id=propagate.propagation_id)
    b.on_message(0, propagate)  # a duplicate after: the same answer, no second pass
    assert sends(b.take_effects()) == [(0, answer)]
    a.on_message(1, answer)
    assert a.take_effects() == [da.BackwardDone(token="bw")]
    a.on_message(1, answer)  # duplicate answer: ignored
    assert a.take_effects() == []


def test_an_error_downstream_fails_backward():
    a, b = two()
    ctx = a.new_context()
    b.join(ctx, 0)
    message_id = b.record_send(ctx, 0)
    a.record_recv(ctx, 1, message_id)
    pass_id = a.backward(ctx, token="bw")
    a.take_effects()
    a.pass_finished(pass_id, (da.Outgoing(src=1, message_id=message_id, grads=None),))
    [(_, propagate)] = sends(a.take_effects())
    b.on_message(0, propagate)
    [run] = b.take_effects()
    b.pass_finished(run.pass_id, error="RuntimeError: boom on worker 1")
    [(_, answer)] = sends(b.take_effects())
    a.on_message(1, answer)
    assert a.take_effects() == [da.BackwardDone(token="bw", error="RuntimeError: boom on worker 1")]


def test_cleanup_goes_to_known_workers_and_is_passed_on():
    a, b, c = (da.AutogradContexts(w, 3) for w in range(3))
    ctx = a.new_context()
    b.record_recv(ctx, 0, a.record_send(ctx, 1))
    c.record_recv(ctx, 1, b.record_send(ctx, 2))  # b passed it on; a never heard of c
    a.release_context(ctx)
    effects = a.take_effects()
    assert da.ContextReleased(context_id=ctx) in effects
    assert sends(effects) == [(1, da.CleanupContext(context_id=ctx, informed=(0, 1)))]
    b.on_message(0, da.CleanupContext(context_id=ctx, informed=(0, 1)))
    assert sends(b.take_effects()) == [(2, da.CleanupContext(context_id=ctx, informed=(0, 1, 2)))]
    c.on_message(1, da.CleanupContext(context_id=ctx, informed=(0, 1, 2)))
    assert sends(c.take_effects()) == []  # not back to b, who told it
    assert not any(w.has_context(ctx) for w in (a, b, c))


def test_a_worker_the_creator_told_is_not_told_again():
    a, b, c = (da.AutogradContexts(w, 3) for w in range(3))
    ctx = a.new_context()
    b.record_recv(ctx, 0, a.record_send(ctx, 1))
    c.record_recv(ctx, 0, a.record_send(ctx, 2))
    c.record_recv(ctx, 1, b.record_send(ctx, 2))  # b knows c too
    a.release_context(ctx)
    told = sends(a.take_effects())
    assert told == [(1, da.CleanupContext(context_id=ctx, informed=(0, 1, 2))),
                    (2, da.CleanupContext(context_id=ctx, informed=(0, 1, 2)))]
    b.on_message(0, told[0][1])
    c.on_message(0, told[1][1])
    assert sends(b.take_effects()) == [] and sends(c.take_effects()) == []
    assert not any(w.has_context(ctx) for w in (a, b, c))


def test_a_call_that_lands_after_the_cleanup_does_not_bring_the_context_back():
    a, b = two()
    ctx = a.new_context()
    late = a.record_send(ctx, 1)
    a.release_context(ctx)
    b.on_message(0, da.CleanupContext(context_id=ctx))  # overtook the call
    assert not b.record_recv(ctx, 0, late) and not b.has_context(ctx)
    assert not b.join(ctx, 0)


def test_released_ids_are_kept_compactly():
    a, b = two()
    ids = [a.new_context() for _ in range(1000)]
    for ctx in ids:
        b.on_message(0, da.CleanupContext(context_id=ctx))
    released = b._released[0]
    assert released.above == set() and all(not b.join(ctx, 0) for ctx in ids[::97])


def test_a_death_fails_what_waits_on_it_and_releases_what_it_created():
    a, b, c = (da.AutogradContexts(w, 3) for w in range(3))
    ctx = a.new_context()
    b.join(ctx, 0)
    message_id = b.record_send(ctx, 0)
    a.record_recv(ctx, 1, message_id)
    pass_id = a.backward(ctx, token="bw")
    a.take_effects()
    a.pass_finished(pass_id, (da.Outgoing(src=1, message_id=message_id, grads=None),))
    a.take_effects()
    theirs = b.new_context()
    a.join(theirs, 1)
    a.worker_died(1)
    effects = a.take_effects()
    [done] = [e for e in effects if isinstance(e, da.BackwardDone)]
    assert done.token == "bw" and "worker 1 died" in done.error
    assert not a.has_context(theirs)
    # Our own context outlives b; its cleanup now goes to everyone, since b
    # may have passed it on to workers we never heard of.
    a.release_context(ctx)
    assert sends(a.take_effects()) == [(2, da.CleanupContext(context_id=ctx, informed=(0, 2)))]


def test_releasing_a_context_fails_the_passes_running_in_it():
    a, _ = two()
    ctx = a.new_context()
    pass_id = a.backward(ctx, token="bw")
    a.take_effects()
    a.release_context(ctx)
    [done] = [e for e in a.take_effects() if isinstance(e, da.BackwardDone)]
    assert "was released" in done.error
    a.pass_finished(pass_id)  # the driver's late report is ignored
    assert a.take_effects() == []


def test_retain_graph_and_the_backward_id_travel_with_the_gradients():
    a, b = two()
    ctx = a.new_context()
    b.join(ctx, 0)
    message_id = b.record_send(ctx, 0)
    a.record_recv(ctx, 1, message_id)
    runs = []
    for _ in range(2):
        pass_id = a.backward(ctx, token=object(), retain_graph=True)
        [root] = a.take_effects()
        a.pass_finished(pass_id, (da.Outgoing(src=1, message_id=message_id, grads=None),))
        [(_, propagate)] = sends(a.take_effects())
        b.on_message(0, propagate)
        [run] = b.take_effects()
        assert root.retain_graph and propagate.retain_graph and run.retain_graph
        assert run.backward_id == root.backward_id == propagate.backward_id
        runs.append(run)
    assert runs[0].backward_id != runs[1].backward_id


def test_shutdown_forgets_every_context_quietly_and_fails_a_running_backward():
    a, b = two()
    ctx = a.new_context()
    b.join(ctx, 0)
    other = b.new_context()
    pass_id = a.backward(ctx, token="bw")
    a.take_effects()
    assert a.forget_all() == (ctx,) and b.forget_all() == (ctx, other)
    effects = a.take_effects()
    assert da.BackwardDone(token="bw", error=f"autograd context {ctx} was released while a "
                           f"backward pass was running in it") in effects
    assert da.ContextReleased(context_id=ctx) in effects and not sends(effects)
    assert not sends(b.take_effects())  # every worker forgets its own: no messages
    assert a.debug_info()["num_autograd_contexts"] == b.debug_info()["num_autograd_contexts"] == 0
    a.pass_finished(pass_id)  # the pass reports late: nothing more happens
    assert a.take_effects() == []
