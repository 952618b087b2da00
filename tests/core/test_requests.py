"""The request table: every (kind, state, event) either has its transition or is refused."""

import itertools

import pytest

from localrref.core.requests import (
    RETRYABLE_KINDS, Event, Outcome, RequestKind, RequestTable, State, TRANSITIONS, _FAMILY,
)
from localrref.errors import ProtocolError


def table(max_retries=2):
    return RequestTable(max_retries=max_retries, delay=lambda n: 1.0 * 1.5 ** n)


def request_in(t, kind, state, *, timeout=10.0):
    """A request of ``kind`` driven into ``state`` through the table's own transitions."""
    request = t.new(kind, 1, lambda rid: ("message", rid), now=0.0, timeout=timeout)
    if state is State.WAITING_RETRY:
        t.step(request, Event.SEND_FAILED, now=0.0)
    elif state is State.ABANDONED:
        t.step(request, Event.CANCELLED, now=0.0)
    assert request.state is state
    return request


REACHABLE = [(kind, state) for kind in RequestKind for state in State
             if state is State.SENT
             or (state is State.WAITING_RETRY and kind in RETRYABLE_KINDS)
             or (state is State.ABANDONED and kind is RequestKind.FETCH)]


@pytest.mark.parametrize("kind,state,event", [
    (kind, state, event) for (kind, state), event in itertools.product(REACHABLE, Event)])
def test_every_pair_has_its_transition_or_a_named_refusal(kind, state, event):
    t = table()
    request = request_in(t, kind, state)
    expected = TRANSITIONS.get((_FAMILY[kind], state, event))
    if expected is None:
        with pytest.raises(ProtocolError, match=f"can't handle {event.value} for {kind.value} "
                                                f"request {request.request_id} in state "
                                                f"{state.value}"):
            t.step(request, event, now=1.0)
        assert request.state is state and request.request_id in t  # nothing changed
        return
    target, outcome = expected
    assert t.step(request, event, now=1.0) is outcome
    if target is None:
        assert request.request_id not in t and t.next_deadline() is None
    else:
        assert request.state is target and request.request_id in t


def test_control_messages_retry_with_backoff_then_give_up():
    t = table(max_retries=2)
    request = t.new(RequestKind.USER_DELETE, 1, lambda rid: rid, now=0.0, timeout=60.0)
    assert t.next_deadline() == 60.0  # the ack timeout
    assert t.step(request, Event.SEND_FAILED, now=0.0) is Outcome.RETRY_LATER
    assert t.next_deadline() == 1.0  # 1.0 * 1.5 ** 0
    (due,) = list(t.due(1.0))
    assert t.step(due, Event.TIMER, now=1.0) is Outcome.RESEND
    assert t.next_deadline() == 61.0  # a new ack timeout
    assert t.step(request, Event.TIMER, now=61.0) is Outcome.RETRY_LATER  # no ack in time
    assert t.next_deadline() == 62.5  # 1.0 * 1.5 ** 1
    t.step(request, Event.TIMER, now=62.5)
    assert t.step(request, Event.SEND_FAILED, now=62.5) is Outcome.GIVE_UP  # 2 retries spent
    assert len(t) == 0 and t.next_deadline() is None


def test_an_abandoned_fetch_has_no_timer_and_a_voided_timer_never_fires():
    t = table()
    fetch = t.new(RequestKind.FETCH, 1, lambda rid: rid, now=0.0, timeout=5.0)
    call = t.new(RequestKind.CALL, 1, lambda rid: rid, now=0.0, timeout=5.0)
    assert t.step(fetch, Event.TIMER, now=5.0) is Outcome.TIMED_OUT
    assert fetch.state is State.ABANDONED and fetch.request_id in t
    assert [r.request_id for r in t.due(10.0)] == [call.request_id]  # the fetch's is void
    assert t.step(fetch, Event.ANSWERED, now=10.0) is Outcome.DROPPED
    assert fetch.request_id not in t


def test_reserved_ids_are_never_reused():
    t = table()
    first = t.new(RequestKind.CALL, 1, lambda rid: rid, now=0.0)
    reserved = t.reserve_id()
    second = t.new(RequestKind.CALL, 1, lambda rid: rid, now=0.0)
    assert len({first.request_id, reserved, second.request_id}) == 3
