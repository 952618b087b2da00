"""Outgoing requests: their states, timers and retries. Pure: time enters as ``now``.

Every message a worker sends that expects an answer is a :class:`Request`,
kept in a :class:`RequestTable` until it is answered, fails or is given up:
the application's calls, ``remote()`` and ``to_here()`` (each with its
timeout), and the RRef protocol's control messages, which torch sends with
``sendWithRetries`` (a failed send or a missing acknowledgement is retried
with backoff, under the same request id, since their handlers are
idempotent).

This module only decides. :meth:`RequestTable.step` takes an event for a
request, finds the transition in :data:`TRANSITIONS`, moves the request to
its next state (or out of the table), arms or cancels its timer, and returns
the :class:`Outcome`; ``rref_context.py`` turns the outcome into protocol
effects (a resend, a failed future, a confirmed user). An event with no
transition raises :class:`ProtocolError` naming the event, the kind and the
state.

The transitions, by family (``-`` means the request leaves the table)::

    control (RREF_FORK_REQUEST, RREF_CHILD_ACCEPT, RREF_USER_DELETE)
      SENT           ANSWERED     -  DONE
      SENT           SEND_FAILED  WAITING_RETRY  RETRY_LATER   (- GIVE_UP once retries run out)
      SENT           TIMER        WAITING_RETRY  RETRY_LATER   (no ack in time: a failed send)
      WAITING_RETRY  TIMER        SENT  RESEND
      WAITING_RETRY  ANSWERED     -  DONE                      (the ack of an earlier send)
      any            PEER_GONE    -  DROPPED                   (its tables died with it)
    call (rpc_sync, rpc_async)
      SENT  ANSWERED -  DONE | TIMER -  TIMED_OUT | SEND_FAILED, PEER_GONE -  FAILED
      SENT  CANCELLED  -  DROPPED
    creation (remote(), to another worker or to self)
      SENT  ANSWERED -  DONE | TIMER -  TIMED_OUT | SEND_FAILED, PEER_GONE -  FAILED
      SENT  CANCELLED  SENT  IGNORED                          (the RRef exists either way)
    fetch (to_here on a user)
      SENT       ANSWERED          -  DONE
      SENT       TIMER             ABANDONED  TIMED_OUT
      SENT       CREATION_FAILED   ABANDONED  FAILED
      SENT       CANCELLED         ABANDONED  ABANDON
      SENT       SEND_FAILED, PEER_GONE  -  FAILED
      ABANDONED  ANSWERED, PEER_GONE     -  DROPPED
      ABANDONED  CANCELLED, CREATION_FAILED  ABANDONED  IGNORED

Why an abandoned fetch stays: NB(localrref) in ``rref_context.py``. It holds
its user until the owner answers, or the user's ``RREF_USER_DELETE`` could
overtake the fetch and free the value first; the late answer is accounted
for (its RRefs released) and only then is the request gone.
"""

from __future__ import annotations

import enum
import heapq
from dataclasses import dataclass

from ..errors import ProtocolError

__all__ = ["RequestKind", "State", "Event", "Outcome", "Request", "RequestTable",
           "RETRYABLE_KINDS", "TRANSITIONS"]


# The enums here mix in str: every step looks a (family, state, event) key up
# in TRANSITIONS, and str's hash is C where Enum's __hash__ is Python.
class RequestKind(str, enum.Enum):
    CALL = "CALL"                  # rpc_sync / rpc_async
    REMOTE = "REMOTE"              # remote() from a user: confirmPendingUser on reply
    REMOTE_SELF = "REMOTE_SELF"    # remote() to self: finishCreatingOwnerRRef on reply
    FETCH = "FETCH"                # to_here() on a user
    FORK_REQUEST = "FORK_REQUEST"  # sendWithRetries(RREF_FORK_REQUEST)
    CHILD_ACCEPT = "CHILD_ACCEPT"  # sendWithRetries(RREF_CHILD_ACCEPT)
    USER_DELETE = "USER_DELETE"    # sendWithRetries(RREF_USER_DELETE)


RETRYABLE_KINDS = frozenset({RequestKind.FORK_REQUEST, RequestKind.CHILD_ACCEPT,
                             RequestKind.USER_DELETE})


class State(str, enum.Enum):
    SENT = "SENT"                    # waiting for its answer
    WAITING_RETRY = "WAITING_RETRY"  # a control message between a failure and its resend
    ABANDONED = "ABANDONED"          # a fetch nobody waits for, kept until the owner answers


class Event(str, enum.Enum):
    ANSWERED = "ANSWERED"                # its reply (or ack) arrived
    SEND_FAILED = "SEND_FAILED"          # the transport could not deliver it
    TIMER = "TIMER"                      # its timer fired
    CANCELLED = "CANCELLED"              # the application stopped waiting
    CREATION_FAILED = "CREATION_FAILED"  # the remote() creating a fetched RRef failed
    PEER_GONE = "PEER_GONE"              # its destination died


class Outcome(str, enum.Enum):
    DONE = "DONE"                # answered: hand the answer over
    RESEND = "RESEND"            # send the message again (its ack timer is armed)
    RETRY_LATER = "RETRY_LATER"  # wait for the backoff timer
    GIVE_UP = "GIVE_UP"          # retries ran out (seed: handleExceptionSilent)
    TIMED_OUT = "TIMED_OUT"      # tell the caller it timed out
    FAILED = "FAILED"            # tell the caller it failed
    ABANDON = "ABANDON"          # nobody waits any more; nothing to tell
    DROPPED = "DROPPED"          # gone without a word (its RRefs accounted by the caller)
    IGNORED = "IGNORED"          # nothing changes


class _Family(str, enum.Enum):
    CONTROL = "control"
    CALL = "call"
    CREATION = "creation"
    FETCH = "fetch"


_FAMILY = {RequestKind.CALL: _Family.CALL, RequestKind.REMOTE: _Family.CREATION,
           RequestKind.REMOTE_SELF: _Family.CREATION, RequestKind.FETCH: _Family.FETCH,
           **{kind: _Family.CONTROL for kind in RETRYABLE_KINDS}}

_S, _W, _A = State.SENT, State.WAITING_RETRY, State.ABANDONED
_GONE = None  # the request leaves the table
_E, _O = Event, Outcome

# (family, state, event) -> (next state or _GONE, outcome). See the module docstring.
TRANSITIONS: dict[tuple[_Family, State, Event], tuple[State | None, Outcome]] = {
    (_Family.CONTROL, _S, _E.ANSWERED): (_GONE, _O.DONE),
    (_Family.CONTROL, _S, _E.SEND_FAILED): (_W, _O.RETRY_LATER),
    (_Family.CONTROL, _S, _E.TIMER): (_W, _O.RETRY_LATER),
    (_Family.CONTROL, _W, _E.TIMER): (_S, _O.RESEND),
    (_Family.CONTROL, _W, _E.ANSWERED): (_GONE, _O.DONE),
    (_Family.CONTROL, _S, _E.PEER_GONE): (_GONE, _O.DROPPED),
    (_Family.CONTROL, _W, _E.PEER_GONE): (_GONE, _O.DROPPED),
    **{(family, _S, event): target
       for family in (_Family.CALL, _Family.CREATION)
       for event, target in ((_E.ANSWERED, (_GONE, _O.DONE)),
                             (_E.TIMER, (_GONE, _O.TIMED_OUT)),
                             (_E.SEND_FAILED, (_GONE, _O.FAILED)),
                             (_E.PEER_GONE, (_GONE, _O.FAILED)))},
    (_Family.CALL, _S, _E.CANCELLED): (_GONE, _O.DROPPED),
    (_Family.CREATION, _S, _E.CANCELLED): (_S, _O.IGNORED),
    (_Family.FETCH, _S, _E.ANSWERED): (_GONE, _O.DONE),
    (_Family.FETCH, _S, _E.TIMER): (_A, _O.TIMED_OUT),
    (_Family.FETCH, _S, _E.CREATION_FAILED): (_A, _O.FAILED),
    (_Family.FETCH, _S, _E.CANCELLED): (_A, _O.ABANDON),
    (_Family.FETCH, _S, _E.SEND_FAILED): (_GONE, _O.FAILED),
    (_Family.FETCH, _S, _E.PEER_GONE): (_GONE, _O.FAILED),
    (_Family.FETCH, _A, _E.ANSWERED): (_GONE, _O.DROPPED),
    (_Family.FETCH, _A, _E.PEER_GONE): (_GONE, _O.DROPPED),
    (_Family.FETCH, _A, _E.CANCELLED): (_A, _O.IGNORED),
    (_Family.FETCH, _A, _E.CREATION_FAILED): (_A, _O.IGNORED),
}


@dataclass(slots=True, kw_only=True)
class Request:
    """One request in flight."""

    request_id: int
    kind: RequestKind
    dst: int
    message: object
    rref: object = None           # the UserRRef / OwnerRRef a REMOTE*, FETCH is about
    fork_id: object = None        # REMOTE, FORK_REQUEST: the fork it is about
    parent: int | None = None     # FORK_REQUEST: who gets RREF_CHILD_ACCEPT afterwards (None:
                                  # nobody, the reply to the request that brought the fork does)
    timeout: float = 0.0          # seconds (0: none); for control messages, the ack timeout
    state: State = State.SENT
    retries: int = 0
    timer_generation: int = 0

    @property
    def is_control(self) -> bool:
        return self.kind in RETRYABLE_KINDS


class RequestTable:
    """The requests of one worker and their timers.

    ``max_retries`` and ``delay(retry_count)`` are the retry policy of the
    control messages (``rref_context.RetryPolicy``).
    """

    def __init__(self, *, max_retries: int, delay) -> None:
        self._max_retries = max_retries
        self._delay = delay
        self._requests: dict[int, Request] = {}
        self._timers: list[tuple[float, int, int, int]] = []
        self._timer_seq = 0
        self._next_id = 0

    # -- the table -------------------------------------------------------------

    def new(self, kind: RequestKind, dst: int, make_message, *, now: float,
            timeout: float = 0.0, **fields) -> Request:
        """Enter a request SENT at ``now``; ``make_message(request_id)`` builds its message."""
        request_id = self._next_id
        self._next_id += 1
        request = Request(request_id=request_id, kind=kind, dst=dst,
                          message=make_message(request_id), timeout=timeout, **fields)
        self._requests[request_id] = request
        if timeout and timeout > 0:
            self._arm(request, now + timeout)
        return request

    def reserve_id(self) -> int:
        """A request id for an answer given at once, with nothing sent or kept."""
        request_id = self._next_id
        self._next_id += 1
        return request_id

    def get(self, request_id: int) -> Request | None:
        return self._requests.get(request_id)

    def values(self):
        return self._requests.values()

    def __len__(self) -> int:
        return len(self._requests)

    def __bool__(self) -> bool:
        return bool(self._requests)

    def __contains__(self, request_id: int) -> bool:
        return request_id in self._requests

    # -- transitions -----------------------------------------------------------

    def step(self, request: Request, event: Event, *, now: float) -> Outcome:
        """Apply ``event`` to ``request`` (see the module docstring); return the outcome.

        Raises:
            ProtocolError: no transition for this event in this state.
        """
        try:
            target, outcome = TRANSITIONS[(_FAMILY[request.kind], request.state, event)]
        except KeyError:
            raise ProtocolError(
                f"can't handle {event.value} for {request.kind.value} request "
                f"{request.request_id} in state {request.state.value}") from None
        if outcome is Outcome.RETRY_LATER and request.retries >= self._max_retries:
            target, outcome = _GONE, Outcome.GIVE_UP
        if target is _GONE:
            del self._requests[request.request_id]
            request.timer_generation += 1  # its timer, if any, is void
            return outcome
        if outcome is Outcome.IGNORED:
            return outcome
        request.state = target
        if outcome is Outcome.RETRY_LATER:
            delay = self._delay(request.retries)
            request.retries += 1
            self._arm(request, now + delay)
        elif outcome is Outcome.RESEND:
            self._arm(request, now + request.timeout)
        else:
            request.timer_generation += 1  # ABANDONED: no timer
        return outcome

    # -- timers ----------------------------------------------------------------

    def _arm(self, request: Request, when: float) -> None:
        request.timer_generation += 1
        self._timer_seq += 1
        heapq.heappush(self._timers, (when, self._timer_seq, request.request_id,
                                      request.timer_generation))

    def next_deadline(self) -> float | None:
        """When :meth:`due` will next have something (None: no timer armed)."""
        while self._timers:
            when, _, request_id, generation = self._timers[0]
            request = self._requests.get(request_id)
            if request is not None and request.timer_generation == generation:
                return when
            heapq.heappop(self._timers)
        return None

    def due(self, now: float):
        """The requests whose timers fire at ``now``, one at a time (each then takes a
        TIMER event). Lazy: a timer that handling an earlier one voided is skipped."""
        while self._timers and self._timers[0][0] <= now:
            _, _, request_id, generation = heapq.heappop(self._timers)
            request = self._requests.get(request_id)
            if request is not None and request.timer_generation == generation:
                yield request
