"""A seeded, single-process simulator of N workers running the real core.

The simulator is to localrref what h11's ``ConnectionPair`` and trio's
``FakeNet`` are to theirs: every worker is a real
:class:`~localrref.core.RRefContext`; the network is a bag of in-flight
messages, and the schedule (which message is delivered next, which user
function runs next, when time moves) is drawn from one ``random.Random(seed)``.
No threads, processes, clocks or pickling: a schedule is a pure function of
its seed, so any failure replays exactly.

The model, and why:

* Any deliverable message may be delivered next: the protocol assumes no
  ordering between workers, and neither do we (rref_context.h: "we do not have
  FIFO communication between workers").
* Fault knobs follow torch's faulty agent, keyed by message-type name:
  ``fail_sends`` fails a send (the sender's core is told and retries with
  backoff; an ``RREF_ACK`` is silently lost and the requester's ack timeout
  retries), at most ``num_fail_sends`` times per request, fewer than the
  retry limit; ``duplicate`` delivers a message twice; ``delay`` holds a
  message back in fake time. Only messages the protocol promises to handle
  idempotently may be failed or duplicated; a call or reply is never
  duplicated, exactly as torch's transport never does.
* Fake time moves only when the schedule says so, and never past the latest
  delivery time of a message in flight (``max_delay``) or the latest start of
  a runnable user function. Slow user functions (``slow_job``) are how calls
  time out; the protocol (like torch's) assumes a ``remote()`` is not
  overtaken by the delete its own timeout triggers.
* User functions are scripted by the call's payload (:class:`SimCall`): echo
  the argument RRefs back, keep them, drop them, fail, or wrap them in a new
  local RRef; ``remote()`` stores its arguments as the value, so values hold
  RRefs and fetching a value forks them again.

Invariants (checked after every step by :meth:`SimWorld.check`):

* safety: an owner never frees a value while a live UserRRef, a pending child
  or an in-flight fork refers to it, and no fetch or fork ever reaches an
  owner that freed its value;
* every UserRRef's hold count equals the references the simulator can see;
* the debug counters equal the table sizes;
* after every reference is dropped and the network drained, every table on
  every worker is empty (:meth:`SimWorld.check_no_leak`);
* after ``delAllUsersAndUnforkedOwners`` on every worker, with users still
  alive, every table is empty too (:meth:`SimWorld.shutdown`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from ..core import effects as fx
from ..core.messages import DUPLICABLE_TYPES, RETRYABLE_TYPES, USER_LEVEL_TYPES, MessageType
from ..core.rref import OwnerRRef, UserRRef
from ..core.rref_context import RequestKind, RetryPolicy, RRefContext
from ..core.shutdown import DelAllUsersAndUnforkedOwners
from ..errors import RRefCreationError

__all__ = ["Faults", "SimCall", "SimWorld", "InvariantViolation", "replay_command"]

_FAILABLE = RETRYABLE_TYPES | {MessageType.RREF_ACK}
# RREF_FORK_REQUEST's retried copies, which the protocol does produce, come
# from fail_sends on RREF_ACK instead (see DUPLICABLE_TYPES).
_DUPLICABLE = DUPLICABLE_TYPES


class InvariantViolation(AssertionError):
    """A protocol invariant failed; the message names the seed that replays it."""


def replay_command(seed: int, faults: str = "all") -> str:
    return f"python tools/simulate.py --replay {seed} --faults {faults}"


@dataclass(frozen=True, slots=True, kw_only=True)
class Faults:
    """torch's faulty-agent knobs: probabilities keyed by message-type name."""

    fail_sends: dict = field(default_factory=dict)
    num_fail_sends: int = 3
    duplicate: dict = field(default_factory=dict)
    delay: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for knob, allowed in (("fail_sends", _FAILABLE), ("duplicate", _DUPLICABLE),
                              ("delay", frozenset(MessageType))):
            for name, probability in getattr(self, knob).items():
                kind = MessageType(name)
                if kind not in allowed:
                    raise ValueError(
                        f"{knob} cannot apply to {name}: only "
                        f"{sorted(t.value for t in allowed)} are handled idempotently")
                if not 0 <= probability <= 1:
                    raise ValueError(f"{knob}[{name}] must be a probability, got {probability}")

    @classmethod
    def none(cls) -> "Faults":
        return cls()

    @classmethod
    def all_on(cls, probability: float = 0.2) -> "Faults":
        return cls(fail_sends={t.value: probability for t in _FAILABLE},
                   duplicate={t.value: probability for t in _DUPLICABLE},
                   delay={t.value: probability for t in MessageType})

    def fail(self, kind: MessageType) -> float:
        return self.fail_sends.get(kind.value, 0.0)


@dataclass(frozen=True, slots=True)
class SimCall:
    """What a simulated user function does with the RRefs it receives.

    ``action``: for rpc, one of echo / keep / drop / fail / make_local; for
    remote, store / fail. ``slow`` makes the job take ``slow_job`` seconds.
    """

    action: str
    slow: bool = False


@dataclass(slots=True)
class _InFlight:
    src: int
    dst: int
    message: object
    not_before: float
    deliver_by: float


@dataclass(slots=True)
class _Job:
    worker: int
    execute: fx.Execute
    ready_at: float
    run_by: float


@dataclass(slots=True)
class _OwnerState:
    """What the simulator knows of an OwnerRRef beyond the core: who refers to it."""

    record: OwnerRRef
    refs: int = 0
    dead: bool = False


class SimWorld:
    """N workers, a bag of messages and a seeded scheduler."""

    def __init__(self, n_workers: int, *, seed: int, faults: Faults | None = None,
                 max_delay: float = 0.2, slow_job: float = 3.0, short_timeout: float = 1.0,
                 retry: RetryPolicy | None = None, faults_name: str = "custom") -> None:
        if n_workers < 1:
            raise ValueError("a world needs at least one worker")
        self.n = n_workers
        self.seed = seed
        self.rng = random.Random(seed)
        self.faults = faults or Faults.none()
        self.faults_name = faults_name
        self.max_delay = max_delay
        self.slow_job = slow_job
        self.short_timeout = short_timeout
        self.now = 0.0
        self.ctx = [RRefContext(w, retry=retry) for w in range(n_workers)]
        self.in_flight: list[_InFlight] = []
        self.jobs: list[_Job] = []
        # Application handles per worker: UserRRefs (each with one hold) and
        # OwnerRRefs (counted in _OwnerState.refs).
        self.handles: list[list] = [[] for _ in range(n_workers)]
        self.owner_states: dict[int, _OwnerState] = {}
        self.dead_owners: set = set()
        self.values: dict[int, tuple] = {}       # id(OwnerRRef) -> the handles its value holds
        self._fail_counts: dict[tuple[int, int], int] = {}
        self.shutdowns: list[DelAllUsersAndUnforkedOwners | None] = [None] * n_workers
        self.trace: list[str] = []
        self.stats = {"delivered": 0, "jobs": 0, "ops": 0, "timeouts": 0, "failed_sends": 0,
                      "duplicates": 0, "completions": 0, "failures": 0, "refused_forks": 0}
        self.errors: list[str] = []

    # ------------------------------------------------------------------
    # Effects
    # ------------------------------------------------------------------

    def _apply(self, worker: int, effects: list) -> None:
        # Owner deaths are judged after the whole list: a Complete or Execute
        # later in the same list may hand the released owner to the
        # application, as an unpickled object would keep it alive in Python.
        released = []
        for effect in effects:
            match effect:
                case fx.Send():
                    self._send(worker, effect.dst, effect.message)
                case fx.Execute():
                    self._queue_job(worker, effect)
                case fx.Complete():
                    self.stats["completions"] += 1
                    for rref in effect.rrefs:
                        self._adopt(worker, rref)
                case fx.Fail():
                    self.stats["failures"] += 1
                case fx.CreationSettled():
                    pass
                case fx.Released():
                    released.append(effect.rref_id)
                case fx.Log():
                    if effect.level == "error":
                        self.errors.append(f"worker {worker}: {effect.text}")
                case _:
                    raise TypeError(f"unknown effect {effect!r}")
        for rref_id in released:
            self._maybe_owner_dead(worker, rref_id)

    def _send(self, src: int, dst: int, message) -> None:
        kind = message.type
        # Faults are counted per request, on the requester's side: an ACK
        # belongs to the request it answers.
        key = (dst if kind is MessageType.RREF_ACK else src, message.request_id)
        p_fail = self.faults.fail(kind)
        if p_fail and self._fail_counts.get(key, 0) < self.faults.num_fail_sends \
                and self.rng.random() < p_fail:
            self._fail_counts[key] = self._fail_counts.get(key, 0) + 1
            self.stats["failed_sends"] += 1
            self.trace.append(f"t={self.now:.3f} FAIL {kind.value} {src}->{dst} "
                              f"req={message.request_id}")
            if kind in RETRYABLE_TYPES:
                self._apply(src, self.ctx[src].on_send_failed(message.request_id, now=self.now))
            return
        copies = 1
        if self.rng.random() < self.faults.duplicate.get(kind.value, 0.0):
            copies = 2
            self.stats["duplicates"] += 1
        for _ in range(copies):
            delay = 0.0
            if self.rng.random() < self.faults.delay.get(kind.value, 0.0):
                delay = self.rng.uniform(0, self.max_delay)
            self.in_flight.append(_InFlight(src, dst, message, self.now + delay,
                                            self.now + self.max_delay))

    def _queue_job(self, worker: int, execute: fx.Execute) -> None:
        duration = 0.0
        if isinstance(execute.payload, SimCall) and execute.payload.slow:
            duration = self.slow_job
        for rref in execute.rrefs:
            if rref.is_owner:
                self._owner_ref(rref, +1)
        if execute.owner is not None:
            self._owner_ref(execute.owner, +1)
        self.jobs.append(_Job(worker, execute, self.now + duration,
                              self.now + duration + self.max_delay))

    # ------------------------------------------------------------------
    # Owner liveness (the simulator's stand-in for Python's refcounts)
    # ------------------------------------------------------------------

    def _owner_state(self, record: OwnerRRef) -> _OwnerState:
        state = self.owner_states.get(id(record))
        if state is None:
            state = self.owner_states[id(record)] = _OwnerState(record)
        return state

    def _owner_ref(self, record: OwnerRRef, delta: int) -> None:
        state = self._owner_state(record)
        state.refs += delta
        if state.refs < 0:
            raise self._violation(f"negative reference count on {record!r}")
        if delta < 0:
            self._maybe_owner_dead(record.owner, record.rref_id, record)

    def _maybe_owner_dead(self, worker: int, rref_id, record: OwnerRRef | None = None) -> None:
        ctx = self.ctx[worker]
        if rref_id in ctx.owners:
            return
        states = [s for s in self.owner_states.values()
                  if s.record.rref_id == rref_id and (record is None or s.record is record)]
        waiting = self._owners_in_waiting_jobs(worker)
        for state in states:
            if state.dead or state.refs > 0 or id(state.record) in waiting:
                continue
            state.dead = True
            self.dead_owners.add(rref_id)
            self._check_no_user_refers_to(rref_id)
            for held in self.values.pop(id(state.record), ()):
                self._drop_handle_ref(worker, held)

    def _owners_in_waiting_jobs(self, worker: int) -> set[int]:
        held = set()
        for job in self._parked_jobs(worker):
            held.update(id(r) for r in job.rrefs if r.is_owner)
            if job.owner is not None:
                held.add(id(job.owner))
        return held

    def _parked_jobs(self, worker: int) -> list:
        """Jobs the core keeps until their argument RRefs are confirmed.

        Such a job already holds its arguments: in the runtime they are the
        objects its request unpickles into, and the user function will use
        them (fetch them, pass them on) the moment it starts. So they count
        as references like any job's.
        """
        jobs = {}
        for state in self.ctx[worker].pending_users.values():
            for waiter in state.waiters:
                if waiter.job is not None:
                    jobs[waiter.job.job_id] = waiter.job
        return list(jobs.values())

    def _check_no_user_refers_to(self, rref_id) -> None:
        for w, ctx in enumerate(self.ctx):
            for rref in self._live_users(w):
                if rref.rref_id == rref_id:
                    raise self._violation(f"owner of RRef {rref_id} freed its value while user "
                                          f"fork {rref.fork_id} on worker {w} is alive")
            for fork_id, rref in ctx.pending_children.items():
                if rref.rref_id == rref_id:
                    raise self._violation(f"owner of RRef {rref_id} freed its value while "
                                          f"child fork {fork_id} of worker {w} is pending")
        for msg in self.in_flight:
            for fork_data in getattr(msg.message, "rrefs", ()):
                if fork_data.rref_id == rref_id:
                    raise self._violation(f"owner of RRef {rref_id} freed its value while fork "
                                          f"{fork_data.fork_id} is in flight "
                                          f"{msg.src}->{msg.dst}")

    def _live_users(self, worker: int):
        ctx = self.ctx[worker]
        seen = {}
        for rref in self._visible_refs(worker):
            if not rref.is_owner:
                seen[id(rref)] = rref
        for state in ctx.pending_users.values():
            seen[id(state.rref)] = state.rref
        for rref in ctx.pending_children.values():
            seen[id(rref)] = rref
        for request in ctx.requests.values():
            if request.kind is RequestKind.FETCH:
                seen[id(request.rref)] = request.rref
        return [r for r in seen.values() if not r.deleted_on_owner]

    def _visible_refs(self, worker: int) -> list:
        refs = list(self.handles[worker])
        for state in self.owner_states.values():
            if state.record.owner == worker and not state.dead:
                refs.extend(self.values.get(id(state.record), ()))
        for job in self.jobs:
            if job.worker == worker:
                refs.extend(job.execute.rrefs)
        for job in self._parked_jobs(worker):
            refs.extend(job.rrefs)
        return refs

    # ------------------------------------------------------------------
    # Application operations
    # ------------------------------------------------------------------

    def _adopt(self, worker: int, rref) -> None:
        # A record handed over with one hold (users) becomes an app handle.
        if rref.is_owner:
            self._owner_ref(rref, +1)
        self.handles[worker].append(rref)

    def _drop_handle_ref(self, worker: int, rref) -> None:
        if rref.is_owner:
            self._owner_ref(rref, -1)
        else:
            self._apply(worker, self._release(worker, rref))

    def _release(self, worker: int, rref) -> list:
        ctx = self.ctx[worker]
        ctx.release(rref)
        return ctx.take_effects()

    def _fork_all(self, worker: int, rrefs) -> tuple | None:
        """Serialise ``rrefs`` on ``worker``; None (and nothing leaked) if one refuses."""
        ctx = self.ctx[worker]
        made = []
        try:
            for rref in rrefs:
                made.append(ctx.prepare_child_fork(rref))
        except (RRefCreationError, ValueError):
            self.stats["refused_forks"] += 1
            for fork_data in made:
                ctx.abandon_child_fork(fork_data)
            self._apply(worker, ctx.take_effects())
            return None
        return tuple(made)

    def _hold_copy(self, worker: int, rref) -> None:
        if rref.is_owner:
            self._owner_ref(rref, +1)
        else:
            self.ctx[worker].acquire(rref)

    def _pick_args(self, worker: int) -> list:
        handles = self.handles[worker]
        k = self.rng.choice((0, 0, 1, 1, 2, 3))
        return [self.rng.choice(handles) for _ in range(min(k, len(handles)))] if handles else []

    def _timeout(self) -> float:
        return self.short_timeout if self.rng.random() < 0.15 else 0.0

    def op_remote(self, caller: int, dst: int, args: list, call: SimCall, timeout: float) -> None:
        forks = self._fork_all(caller, args)
        if forks is None:
            return
        ctx = self.ctx[caller]
        rref = ctx.remote(dst, call, forks, now=self.now, timeout=timeout)
        self._apply(caller, ctx.take_effects())
        self.trace.append(f"t={self.now:.3f} remote {caller}->{dst} {call} rref={rref.rref_id}")
        self._adopt(caller, rref)

    def op_rpc(self, caller: int, dst: int, args: list, call: SimCall, timeout: float) -> None:
        forks = self._fork_all(caller, args)
        if forks is None:
            return
        ctx = self.ctx[caller]
        request_id = ctx.rpc(dst, call, forks, now=self.now, timeout=timeout)
        self.trace.append(f"t={self.now:.3f} rpc {caller}->{dst} {call} req={request_id}")
        self._apply(caller, ctx.take_effects())

    def op_fetch(self, caller: int, rref: UserRRef, timeout: float) -> None:
        ctx = self.ctx[caller]
        if rref.deleted_on_owner:
            return
        request_id = ctx.fetch(rref, now=self.now, timeout=timeout)
        self.trace.append(f"t={self.now:.3f} fetch on {caller} of {rref.rref_id} "
                          f"req={request_id}")
        self._apply(caller, ctx.take_effects())

    def op_create_local(self, worker: int, args: list) -> None:
        ctx = self.ctx[worker]
        owner = ctx.create_owner_rref()
        owner.set_value(None)
        for rref in args:
            self._hold_copy(worker, rref)
        self.values[id(owner)] = tuple(args)
        self._adopt(worker, owner)

    def op_drop(self, worker: int, index: int) -> None:
        rref = self.handles[worker].pop(index)
        self.trace.append(f"t={self.now:.3f} drop on {worker} {rref!r}")
        self._drop_handle_ref(worker, rref)

    def random_op(self) -> None:
        self.stats["ops"] += 1
        rng = self.rng
        caller = rng.randrange(self.n)
        dst = rng.randrange(self.n)
        roll = rng.random()
        handles = self.handles[caller]
        if roll < 0.25:
            call = SimCall(rng.choice(("store", "store", "store", "fail")), slow=rng.random() < 0.2)
            self.op_remote(caller, dst, self._pick_args(caller), call, self._timeout())
        elif roll < 0.55:
            call = SimCall(rng.choice(("echo", "keep", "drop", "fail", "make_local")),
                           slow=rng.random() < 0.15)
            self.op_rpc(caller, dst, self._pick_args(caller), call, self._timeout())
        elif roll < 0.65:
            users = [h for h in handles if not h.is_owner]
            if users:
                self.op_fetch(caller, rng.choice(users), self._timeout())
        elif roll < 0.72:
            self.op_create_local(caller, self._pick_args(caller))
        elif handles:
            self.op_drop(caller, rng.randrange(len(handles)))

    # ------------------------------------------------------------------
    # Jobs: the scripted user functions
    # ------------------------------------------------------------------

    def _run_job(self, job: _Job) -> None:
        worker, execute = job.worker, job.execute
        ctx = self.ctx[worker]
        self.stats["jobs"] += 1
        call = execute.payload
        args = list(execute.rrefs)
        for rref in args:
            # A user function may fetch or pass on any RRef it was given.
            if not rref.is_owner and rref.deleted_on_owner:
                raise self._violation(f"job {execute.job_id} on worker {worker} was given "
                                      f"{rref!r}, already deleted on its owner: the function "
                                      f"cannot fetch it")
        self.trace.append(f"t={self.now:.3f} run {execute.kind.value} job {execute.job_id} on "
                          f"{worker} {call}")
        owner_ref = execute.owner
        if execute.kind is fx.JobKind.FETCH:
            owner = execute.owner
            if owner.error is not None:
                effects = ctx.fail_job(execute.job_id, owner.error)
            else:
                forks = self._fork_all(worker, self.values.get(id(owner), ()))
                if forks is None:
                    effects = ctx.fail_job(execute.job_id, "value holds a failed RRef")
                else:
                    effects = ctx.finish_call(execute.job_id, None, forks)
            self._apply(worker, effects)
        elif execute.kind is fx.JobKind.REMOTE:
            if call.action == "fail":
                self._apply(worker, ctx.fail_job(execute.job_id, f"job {execute.job_id} raised"))
                for rref in args:
                    self._drop_handle_ref(worker, rref)
            else:
                # The arguments become the value: the job's holds move into it.
                self.values[id(execute.owner)] = tuple(args)
                self._apply(worker, ctx.finish_remote(execute.job_id, None))
        else:
            action = call.action
            keep_args = False
            if action == "echo":
                forks = self._fork_all(worker, args)
                effects = (ctx.fail_job(execute.job_id, "cannot echo") if forks is None
                           else ctx.finish_call(execute.job_id, None, forks))
            elif action == "make_local":
                local = ctx.create_owner_rref()
                local.set_value(None)
                self.values[id(local)] = tuple(args)
                keep_args = True
                self._owner_ref(local, +1)
                forks = self._fork_all(worker, [local])
                effects = ctx.finish_call(execute.job_id, None, forks or ())
                self._owner_ref(local, -1)
            elif action == "fail":
                effects = ctx.fail_job(execute.job_id, f"job {execute.job_id} raised")
            elif action == "keep":
                for rref in args:
                    self._hold_copy(worker, rref)
                    self.handles[worker].append(rref)
                effects = ctx.finish_call(execute.job_id, None, ())
            else:
                effects = ctx.finish_call(execute.job_id, None, ())
            self._apply(worker, effects)
            if not keep_args:
                for rref in args:
                    self._drop_handle_ref(worker, rref)
            # else: the job's references moved into the new local value.
        if owner_ref is not None:
            self._owner_ref(owner_ref, -1)

    # ------------------------------------------------------------------
    # Scheduling
    # ------------------------------------------------------------------

    def _deliverable(self) -> list[int]:
        return [i for i, m in enumerate(self.in_flight) if m.not_before <= self.now]

    def _ready_jobs(self) -> list[int]:
        return [i for i, j in enumerate(self.jobs) if j.ready_at <= self.now]

    def _time_bound(self) -> float:
        bounds = [m.deliver_by for m in self.in_flight] + [j.run_by for j in self.jobs]
        return min(bounds) if bounds else float("inf")

    def _next_event(self) -> float | None:
        times = [m.not_before for m in self.in_flight] + [j.ready_at for j in self.jobs]
        for ctx in self.ctx:
            deadline = ctx.next_deadline()
            if deadline is not None:
                times.append(deadline)
        for machine in self.shutdowns:
            if machine is not None and not machine.done:
                times.append(machine.deadline)
        future = [t for t in times if t > self.now]
        return min(future) if future else None

    def deliver(self, index: int) -> None:
        msg = self.in_flight.pop(index)
        self._check_delivery(msg)
        self.stats["delivered"] += 1
        self.trace.append(f"t={self.now:.3f} deliver {msg.src}->{msg.dst} "
                          f"{_brief(msg.message)}")
        self._apply(msg.dst, self.ctx[msg.dst].handle(msg.src, msg.message, now=self.now))

    def run_job(self, index: int) -> None:
        self._run_job(self.jobs.pop(index))

    def advance_time(self, to: float) -> None:
        if to < self.now:
            raise ValueError("time only moves forward")
        self.now = to
        for worker, ctx in enumerate(self.ctx):
            effects = ctx.on_tick(self.now)
            self.stats["timeouts"] += sum(1 for e in effects if isinstance(e, fx.Fail))
            self._apply(worker, effects)

    def step(self, *, move_time: bool = True) -> bool:
        """Take one scheduling step; False when nothing at all can happen.

        With ``move_time`` False only a delivery or a job may happen.
        """
        self._poll_shutdowns()
        deliverable = self._deliverable()
        ready = self._ready_jobs()
        choices = len(deliverable) + len(ready)
        if choices and self.rng.random() < 0.93:
            pick = self.rng.randrange(choices)
            if pick < len(deliverable):
                self.deliver(deliverable[pick])
            else:
                self.run_job(ready[pick - len(deliverable)])
            return True
        if not move_time:
            return False
        bound = self._time_bound()
        target = self._next_event()
        if target is None or target > bound:
            if not choices:
                if target is None:
                    return False
                raise self._violation(f"stuck: next event at {target} is past the delivery "
                                      f"bound {bound}")
            # Move time a little within the bound, so timers may fire between
            # deliveries.
            target = self.now + self.rng.uniform(0, max(0.0, bound - self.now))
        self.advance_time(target)
        return True

    def run_until_quiescent(self, *, check: bool = True, max_steps: int = 200_000) -> None:
        for _ in range(max_steps):
            self._poll_shutdowns()
            if not self.step():
                self._poll_shutdowns()
                if not self._any_pending():
                    return
                continue
            if check:
                self.check()
        raise self._violation(f"no quiescence after {max_steps} steps")

    def _any_pending(self) -> bool:
        return bool(self.in_flight or self.jobs) or any(
            m is not None and not m.done for m in self.shutdowns)

    # ------------------------------------------------------------------
    # Programs
    # ------------------------------------------------------------------

    def run_program(self, n_ops: int, *, check: bool = True) -> None:
        """Interleave ``n_ops`` random application operations with random steps."""
        for _ in range(n_ops):
            self.random_op()
            for _ in range(self.rng.randrange(0, 4)):
                if not self.step():
                    break
                if check:
                    self.check()
            if check:
                self.check()

    def drop_everything(self) -> None:
        for worker in range(self.n):
            while self.handles[worker]:
                self.op_drop(worker, self.rng.randrange(len(self.handles[worker])))
                if self.rng.random() < 0.5:
                    self.step()

    def drain_user_level(self, *, check: bool = True, max_steps: int = 200_000) -> None:
        """Run until no user call, reply or job is left (torch's shutdown barrier)."""
        for _ in range(max_steps):
            busy = self.jobs or any(self._parked_jobs(w) for w in range(self.n)) or any(
                m.message.type in USER_LEVEL_TYPES for m in self.in_flight) or any(
                r.kind in (RequestKind.CALL, RequestKind.REMOTE, RequestKind.REMOTE_SELF,
                           RequestKind.FETCH)
                for ctx in self.ctx for r in ctx.requests.values())
            if not busy:
                return
            if not self.step():
                raise self._violation("user-level work left but nothing can happen")
            if check:
                self.check()
        raise self._violation(f"user-level work not drained after {max_steps} steps")

    def shutdown(self, *, timeout: float = 600.0, check: bool = True) -> None:
        """Graceful shutdown with users still alive: delAll... on every worker."""
        self.drain_user_level(check=check)
        order = list(range(self.n))
        self.rng.shuffle(order)
        for worker in order:
            self.shutdowns[worker] = DelAllUsersAndUnforkedOwners(self.ctx[worker], now=self.now,
                                                                  timeout=timeout)
            for _ in range(self.rng.randrange(0, 3)):
                # Not past any deadline: the workers not yet shutting down
                # would look dead to those waiting on them.
                self.step(move_time=False)
        self.run_until_quiescent(check=check)
        for worker, machine in enumerate(self.shutdowns):
            if not machine.done or machine.timed_out:
                raise self._violation(f"worker {worker}: shutdown {machine.phase.value}, timed "
                                      f"out in {[p.value for p in machine.timed_out]}")
        self.check_tables_empty("after delAllUsersAndUnforkedOwners")
        for ctx in self.ctx:
            ctx.destroy_instance(ignore_rref_leak=False)

    def _poll_shutdowns(self) -> None:
        for worker, machine in enumerate(self.shutdowns):
            if machine is not None and not machine.done:
                self._apply(worker, machine.poll(self.now))

    # ------------------------------------------------------------------
    # Invariants
    # ------------------------------------------------------------------

    def _violation(self, text: str) -> InvariantViolation:
        tail = "\n".join(self.trace[-25:])
        return InvariantViolation(
            f"{text}\n  seed={self.seed} workers={self.n} faults={self.faults_name} "
            f"t={self.now:.3f}\n  replay: {replay_command(self.seed, self.faults_name)}\n"
            f"  last steps:\n{tail}")

    def _check_delivery(self, msg: _InFlight) -> None:
        message = msg.message
        asked = []
        if message.type in (MessageType.PYTHON_RREF_FETCH_CALL, MessageType.RREF_FORK_REQUEST):
            asked.append(message.rref_id)
        asked.extend(f.rref_id for f in getattr(message, "rrefs", ()) if f.owner == msg.dst)
        for rref_id in asked:
            if rref_id in self.dead_owners:
                raise self._violation(f"{message.type.value} for RRef {rref_id} reached "
                                          f"worker {msg.dst} after its value was freed")

    def check(self) -> None:
        """The per-step invariants (see the module docstring)."""
        for worker, ctx in enumerate(self.ctx):
            info = ctx.get_debug_info()
            expected = {
                "num_owner_rrefs": len(ctx.owners),
                "num_pending_users": len(ctx.pending_users),
                "num_forks": sum(len(f) for f in ctx.forks.values()),
                "num_pending_children": len(ctx.pending_children),
                "num_confirmed_users": len(ctx.confirmed_users),
                "num_pending_futures": sum(
                    1 for r in ctx.requests.values()
                    if r.kind in (RequestKind.FORK_REQUEST, RequestKind.CHILD_ACCEPT,
                                  RequestKind.USER_DELETE)),
            }
            for key, value in expected.items():
                if info[key] != value:
                    raise self._violation(f"worker {worker}: debug info {key}={info[key]} but "
                                          f"the tables say {value}")
            self._check_holds(worker)

    def _check_holds(self, worker: int) -> None:
        ctx = self.ctx[worker]
        counted: dict[int, list] = {}

        def count(rref) -> None:
            if not rref.is_owner:
                counted.setdefault(id(rref), [rref, 0])[1] += 1

        for rref in self._visible_refs(worker):
            count(rref)
        for state in ctx.pending_users.values():
            count(state.rref)
        for rref in ctx.pending_children.values():
            count(rref)
        for request in ctx.requests.values():
            if request.kind is RequestKind.FETCH:
                count(request.rref)
        for rref, n in counted.values():
            if rref.holds != n:
                raise self._violation(f"worker {worker}: {rref!r} has {rref.holds} holds but "
                                      f"{n} references")

    def check_tables_empty(self, when: str) -> None:
        for worker, ctx in enumerate(self.ctx):
            if not ctx.tables_empty():
                info = {k: v for k, v in ctx.get_debug_info().items() if v}
                raise self._violation(f"worker {worker} not empty {when}: {info}, leaks "
                                      f"{ctx.leaks()}")
        if self.errors:
            raise self._violation(f"errors logged: {self.errors[:3]}")

    def check_no_leak(self) -> None:
        """Drop every reference, drain, and demand empty tables everywhere."""
        # Replies still in flight hand out new references, so drop until
        # nothing is held any more.
        while True:
            self.drop_everything()
            self.run_until_quiescent()
            if not any(self.handles):
                break
        self.check_tables_empty("after every reference was dropped")
        alive = [s.record for s in self.owner_states.values() if not s.dead]
        if alive:
            raise self._violation(f"values never freed: {alive[:5]}")


def _brief(message) -> str:
    """One trace line for a message: its type, request id, ids and forks."""
    parts = [message.type.value, f"req={message.request_id}"]
    for name in ("rref_id", "fork_id"):
        value = getattr(message, name, None)
        if value is not None:
            parts.append(f"{name}={value.created_on}:{value.local_id}")
    forks = getattr(message, "rrefs", ())
    if forks:
        parts.append("forks=[" + ", ".join(
            f"{f.rref_id.created_on}:{f.rref_id.local_id}/{f.fork_id.created_on}:"
            f"{f.fork_id.local_id}@{f.owner}" for f in forks) + "]")
    return " ".join(parts)
