"""Fault injection: fail, delay, duplicate and reorder the protocol messages a worker sends.

For testing the runtime, and a user's own program, under the faults the
protocol is built to survive (torch's faulty agent,
``FaultyTensorPipeRpcBackendOptions``, does the first two):

* **fail** the first ``num_fail_sends`` sends of each chosen message type:
  the send raises, so the protocol's control messages are retried with
  backoff (and delivered), while a call whose send fails fails;
* **delay** chosen types by a number of seconds each (later frames to the
  same peer overtake them);
* **duplicate** chosen types, among those the protocol promises to take
  twice (``DUPLICABLE_TYPES``: the receiver ignores the second copy);
* **reorder** chosen types: the frame is held back and sent right after the
  next frame to the same peer (or after ``HOLD_S`` if none comes).

Delay, duplicate and reorder apply to each such message with probability
``probability``, drawn from a ``random.Random`` seeded with ``seed`` and the
worker's rank, so a run is repeatable. Every injected fault is logged (logger
``localrref.faults``, INFO). Only protocol messages are touched: the
handshake, the supervisor's control messages and distributed autograd's
frames go as they are.

:class:`FaultPlan` decides (pure: no threads, no clock); :class:`FaultyTransport`
wraps a worker's endpoint and carries the decisions out, with one timer
thread for delayed and held frames.
"""

from __future__ import annotations

import heapq
import logging
import random
import threading
import time
from dataclasses import dataclass, field

from ..codec import frames
from ..core.messages import DUPLICABLE_TYPES, MessageType

__all__ = ["FaultSpec", "FaultPlan", "Fate", "FaultyTransport", "InjectedFault", "ENV",
           "HOLD_S", "spec_for"]

log = logging.getLogger("localrref.faults")

ENV = "LOCALRREF_FAULTS"
HOLD_S = 0.05  # a held frame goes after this long if no later frame to its peer comes
_TYPES = tuple(t.value for t in MessageType)
_DUPLICABLE = tuple(sorted(t.value for t in DUPLICABLE_TYPES))


class InjectedFault(RuntimeError):
    """A send failed on purpose (fault injection)."""


@dataclass(frozen=True, kw_only=True)
class FaultSpec:
    """What to inject; see the module docstring. Built from backend options or ``$LOCALRREF_FAULTS``."""

    num_fail_sends: int = 0
    messages_to_fail: tuple[str, ...] = ()
    messages_to_delay: dict = field(default_factory=dict)  # type -> seconds
    messages_to_duplicate: tuple[str, ...] = ()
    messages_to_reorder: tuple[str, ...] = ()
    probability: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        named = (list(self.messages_to_fail) + list(self.messages_to_delay)
                 + list(self.messages_to_duplicate) + list(self.messages_to_reorder))
        unknown = sorted({n for n in named if n not in _TYPES})
        if unknown:
            raise ValueError(f"unknown message type(s) {', '.join(unknown)} in the fault "
                             f"injection options; the types are {', '.join(_TYPES)}")
        twice = sorted(set(self.messages_to_duplicate) - set(_DUPLICABLE))
        if twice:
            raise ValueError(
                f"{', '.join(twice)} cannot be duplicated: the protocol (as torch's) relies on "
                f"calls, replies and fork requests arriving once; duplicate only "
                f"{', '.join(_DUPLICABLE)}")
        if self.num_fail_sends < 0:
            raise ValueError(f"num_fail_sends must be >= 0, got {self.num_fail_sends}")
        if any(s < 0 for s in self.messages_to_delay.values()):
            raise ValueError(f"delays must be >= 0 seconds, got {self.messages_to_delay}")
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"probability must be within [0, 1], got {self.probability}")

    @property
    def active(self) -> bool:
        return bool((self.num_fail_sends and self.messages_to_fail) or self.messages_to_delay
                    or self.messages_to_duplicate or self.messages_to_reorder)

    @classmethod
    def parse(cls, text: str) -> "FaultSpec":
        """``$LOCALRREF_FAULTS``: ``key=value`` items separated by ``;``.

        ``fail=TYPE,TYPE`` with ``num_fail_sends=N``; ``delay=TYPE:SECONDS,...``;
        ``duplicate=TYPE,...``; ``reorder=TYPE,...``; ``probability=P``;
        ``seed=S``. For example
        ``num_fail_sends=2;fail=RREF_FORK_REQUEST,RREF_USER_DELETE;delay=PYTHON_CALL:0.01``.
        """
        fields: dict = {}
        for item in filter(None, (part.strip() for part in text.split(";"))):
            key, sep, value = item.partition("=")
            key, value = key.strip(), value.strip()
            names = tuple(filter(None, (v.strip() for v in value.split(","))))
            try:
                if not sep:
                    raise ValueError("no '='")
                if key == "num_fail_sends":
                    fields["num_fail_sends"] = int(value)
                elif key == "fail":
                    fields["messages_to_fail"] = names
                elif key == "delay":
                    fields["messages_to_delay"] = {
                        name: float(seconds) for name, _, seconds in
                        (n.partition(":") for n in names)}
                elif key == "duplicate":
                    fields["messages_to_duplicate"] = names
                elif key == "reorder":
                    fields["messages_to_reorder"] = names
                elif key == "probability":
                    fields["probability"] = float(value)
                elif key == "seed":
                    fields["seed"] = int(value)
                else:
                    raise ValueError(f"unknown key {key!r}")
            except ValueError as exc:
                raise ValueError(
                    f"{ENV}: cannot read {item!r} ({exc}); write key=value items separated by "
                    f"';': num_fail_sends=N, fail=TYPE,..., delay=TYPE:SECONDS,..., "
                    f"duplicate=TYPE,..., reorder=TYPE,..., probability=P, seed=S") from None
        return cls(**fields)


def spec_for(options, environ) -> FaultSpec | None:
    """What a worker with ``options`` injects: its faulty options, else ``$LOCALRREF_FAULTS``."""
    if hasattr(options, "num_fail_sends"):  # FaultyRpcBackendOptions
        spec = FaultSpec(num_fail_sends=options.num_fail_sends,
                         messages_to_fail=tuple(options.messages_to_fail),
                         messages_to_delay=dict(options.messages_to_delay),
                         messages_to_duplicate=tuple(options.messages_to_duplicate),
                         messages_to_reorder=tuple(options.messages_to_reorder),
                         probability=options.fault_probability, seed=options.fault_seed)
    elif environ.get(ENV, "").strip():
        spec = FaultSpec.parse(environ[ENV])
    else:
        return None
    return spec if spec.active else None


@dataclass(frozen=True, slots=True)
class Fate:
    """What happens to one message: fail its send, or send ``copies`` after ``delay``
    seconds, or ``hold`` it until the next frame to the same peer has gone."""

    fail: bool = False
    delay: float = 0.0
    copies: int = 1
    hold: bool = False


_PLAIN = Fate()


class FaultPlan:
    """Decides each message's :class:`Fate` (pure; see the module docstring)."""

    def __init__(self, spec: FaultSpec, rank: int) -> None:
        self.spec = spec
        self._rng = random.Random(spec.seed * 1_000_003 + rank)
        self._failed: dict[str, int] = {}

    def fate(self, message_type: str) -> Fate:
        spec = self.spec
        if message_type in spec.messages_to_fail:
            done = self._failed.get(message_type, 0)
            if done < spec.num_fail_sends:
                self._failed[message_type] = done + 1
                return Fate(fail=True)
        delay = spec.messages_to_delay.get(message_type, 0.0)
        copies = 2 if message_type in spec.messages_to_duplicate and self._draw() else 1
        hold = message_type in spec.messages_to_reorder and self._draw()
        if delay and not self._draw():
            delay = 0.0
        if not delay and copies == 1 and not hold:
            return _PLAIN
        return Fate(delay=delay, copies=copies, hold=hold and not delay)

    def _draw(self) -> bool:
        return self.spec.probability >= 1.0 or self._rng.random() < self.spec.probability


class FaultyTransport:
    """An endpoint whose protocol messages meet a :class:`FaultPlan`.

    ``on_copy(message)`` is told of each extra copy sent (the agent counts it
    as sent, for the shutdown drain). Everything but ``send`` and ``close``
    is the wrapped endpoint's.
    """

    def __init__(self, endpoint, plan: FaultPlan, *, on_copy=None) -> None:
        self._endpoint = endpoint
        self._plan = plan
        self._on_copy = on_copy
        self._lock = threading.Condition()
        self._timers: list = []  # heap of (due, serial, dst, frame)
        self._serial = 0
        self._held: dict[int, bytes] = {}  # dst -> a frame waiting for the next one
        self._thread: threading.Thread | None = None
        self._closed = False

    def __getattr__(self, name):
        return getattr(self._endpoint, name)

    def send(self, dst: int, frame) -> None:
        if frame[:1] != frames.MESSAGE:
            self._send_now(dst, frame)
            return
        message = frames.decode_message(frame)
        kind = message.type.value
        with self._lock:
            fate = self._plan.fate(kind)
        if fate.fail:
            log.info("localrref fault injection: failed a send of %s to rank %d", kind, dst)
            raise InjectedFault(f"fault injection: send of {kind} to rank {dst} failed on "
                                f"purpose")
        for extra in range(fate.copies - 1):
            log.info("localrref fault injection: %s to rank %d sent twice", kind, dst)
            if self._on_copy is not None:
                self._on_copy(message)
        if fate.delay:
            log.info("localrref fault injection: %s to rank %d delayed %.3f s", kind, dst,
                     fate.delay)
            for _ in range(fate.copies):
                self._later(time.monotonic() + fate.delay, dst, frame)
            return
        if fate.hold:
            with self._lock:
                if dst not in self._held:
                    log.info("localrref fault injection: %s to rank %d held back", kind, dst)
                    self._held[dst] = frame
                    self._later(time.monotonic() + HOLD_S, dst, None)
                    for _ in range(fate.copies - 1):
                        self._later(time.monotonic() + HOLD_S, dst, frame)
                    return
        for _ in range(fate.copies):
            self._send_now(dst, frame)

    def _send_now(self, dst: int, frame) -> None:
        self._endpoint.send(dst, frame)
        with self._lock:
            held = self._held.pop(dst, None)
        if held is not None:  # overtaken: it goes right after
            self._send_quietly(dst, held)

    def _send_quietly(self, dst: int, frame) -> None:
        try:
            self._endpoint.send(dst, frame)
        except Exception as exc:  # noqa: BLE001 - a peer gone meanwhile: the agent knows
            log.info("localrref fault injection: a delayed frame to rank %d was dropped: %s",
                     dst, exc)

    def _later(self, due: float, dst: int, frame) -> None:
        """Send ``frame`` at ``due`` (``None``: release what is held for ``dst``)."""
        with self._lock:
            if self._closed:
                return
            self._serial += 1
            heapq.heappush(self._timers, (due, self._serial, dst, frame))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="localrref-faults",
                                                daemon=True)
                self._thread.start()
            self._lock.notify()

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._closed and (not self._timers
                                            or self._timers[0][0] > time.monotonic()):
                    self._lock.wait(None if not self._timers
                                    else self._timers[0][0] - time.monotonic())
                if self._closed:
                    return
                _, _, dst, frame = heapq.heappop(self._timers)
                if frame is None:
                    frame = self._held.pop(dst, None)
            if frame is not None:
                self._send_quietly(dst, frame)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._timers.clear()
            self._held.clear()
            self._lock.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        self._endpoint.close()
