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
  next frame to the same peer (or after ``HOLD_S`` if none comes);
* **kill** the worker (SIGKILL, by itself) at one chosen point: right after
  it sends (``send:TYPE``) or as it receives (``recv:TYPE``, before handling
  it) the ``kill_after``-th frame of a type, where a type is a protocol
  message type or a control record's class (``ShutdownArrived``,
  ``ShutdownProceed``, ...); or halfway through copying a tensor into shared
  memory (``copy``). The crash matrix (``tests/runtime/test_crash_matrix.py``)
  kills a worker this way at every step of every exchange.

Delay, duplicate and reorder apply to each such message with probability
``probability``, drawn from a ``random.Random`` seeded with ``seed`` and the
worker's rank, so a run is repeatable. Every injected fault is logged (logger
``localrref.faults``, INFO). Only protocol messages are failed, delayed,
duplicated or reordered: the handshake, the supervisor's control messages
and distributed autograd's frames go as they are.

:class:`FaultPlan` decides (pure: no threads, no clock); :class:`FaultyTransport`
wraps a worker's endpoint and carries the decisions out, with one timer
thread for delayed and held frames.
"""

from __future__ import annotations

import heapq
import logging
import os
import random
import signal
import threading
import time
import weakref
from dataclasses import dataclass, field

import torch

from .. import control_messages
from ..codec import frames
from ..core.messages import DUPLICABLE_TYPES, MessageType
from ..transport import wire
from .current import mark_serving
from .tape import is_builtin

__all__ = ["FaultSpec", "FaultPlan", "Fate", "FaultyTransport", "DyingCopier", "InjectedFault",
           "ScriptSends", "ENV", "HOLD_S", "COPY", "SCRIPT_KINDS", "spec_for"]

log = logging.getLogger("localrref.faults")

ENV = "LOCALRREF_FAULTS"
HOLD_S = 0.05  # a held frame goes after this long if no later frame to its peer comes
# torch's names for the calls, remote()s and fetches of builtin operators and
# TorchScript functions (and of the RRefs those remote()s made): localrref
# sends them as the PYTHON_* messages, and injects faults into them under
# torch's names as well (ScriptSends tells which they are).
SCRIPT_KINDS = {"PYTHON_CALL": "SCRIPT_CALL", "PYTHON_REMOTE_CALL": "SCRIPT_REMOTE_CALL",
                "PYTHON_RREF_FETCH_CALL": "SCRIPT_RREF_FETCH_CALL"}
_MESSAGE_TYPES = tuple(t.value for t in MessageType)
_TYPES = _MESSAGE_TYPES + tuple(SCRIPT_KINDS.values())
_DUPLICABLE = tuple(sorted(t.value for t in DUPLICABLE_TYPES))
_CONTROLS = tuple(sorted(
    name for name, value in vars(control_messages).items()
    if isinstance(value, type) and value.__module__ == control_messages.__name__
    and not name.startswith("_")))
COPY = "copy"


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
    kill_on: str = ""     # "send:TYPE", "recv:TYPE" or "copy"
    kill_after: int = 1   # the how-many-th such frame (or copy) kills

    def __post_init__(self) -> None:
        if self.kill_on:
            direction, _, kind = self.kill_on.partition(":")
            if not ((direction in ("send", "recv") and kind in _MESSAGE_TYPES + _CONTROLS)
                    or self.kill_on == COPY):
                raise ValueError(
                    f"cannot kill on {self.kill_on!r}: write send:TYPE, recv:TYPE or copy, "
                    f"where TYPE is a message type ({', '.join(_MESSAGE_TYPES)}) or a control "
                    f"record ({', '.join(_CONTROLS)})")
        if self.kill_after < 1:
            raise ValueError(f"kill_after must be >= 1, got {self.kill_after}")
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
                    or self.messages_to_duplicate or self.messages_to_reorder or self.kill_on)

    @classmethod
    def parse(cls, text: str) -> "FaultSpec":
        """``$LOCALRREF_FAULTS``: ``key=value`` items separated by ``;``.

        ``fail=TYPE,TYPE`` with ``num_fail_sends=N``; ``delay=TYPE:SECONDS,...``;
        ``duplicate=TYPE,...``; ``reorder=TYPE,...``; ``probability=P``;
        ``seed=S``; ``kill=send:TYPE`` (or ``recv:TYPE``, or ``copy``) with
        ``kill_after=N``. For example
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
                elif key == "kill":
                    fields["kill_on"] = value
                elif key == "kill_after":
                    fields["kill_after"] = int(value)
                else:
                    raise ValueError(f"unknown key {key!r}")
            except ValueError as exc:
                raise ValueError(
                    f"{ENV}: cannot read {item!r} ({exc}); write key=value items separated by "
                    f"';': num_fail_sends=N, fail=TYPE,..., delay=TYPE:SECONDS,..., "
                    f"duplicate=TYPE,..., reorder=TYPE,..., probability=P, seed=S, "
                    f"kill=send:TYPE|recv:TYPE|copy, kill_after=N") from None
        return cls(**fields)


def spec_for(options, environ) -> FaultSpec | None:
    """What a worker with ``options`` injects: its faulty options, else ``$LOCALRREF_FAULTS``."""
    if hasattr(options, "num_fail_sends"):  # FaultyRpcBackendOptions
        spec = FaultSpec(num_fail_sends=options.num_fail_sends,
                         messages_to_fail=tuple(options.messages_to_fail),
                         messages_to_delay=dict(options.messages_to_delay),
                         messages_to_duplicate=tuple(options.messages_to_duplicate),
                         messages_to_reorder=tuple(options.messages_to_reorder),
                         probability=options.fault_probability, seed=options.fault_seed,
                         kill_on=options.kill_on, kill_after=options.kill_after)
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
        self._kill_seen = 0

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

    def kills(self, point: str) -> bool:
        """Whether passing ``point`` (``send:TYPE``, ``recv:TYPE``, ``copy``) kills now."""
        if point != self.spec.kill_on:
            return False
        self._kill_seen += 1
        return self._kill_seen == self.spec.kill_after

    def _draw(self) -> bool:
        return self.spec.probability >= 1.0 or self._rng.random() < self.spec.probability


class ScriptSends:
    """Which of a worker's requests torch would send as SCRIPT_* messages.

    torch's agent sends a call or ``remote()`` of a builtin operator or a
    TorchScript function as SCRIPT_CALL / SCRIPT_REMOTE_CALL, and a fetch of
    an RRef such a ``remote()`` made as SCRIPT_RREF_FETCH_CALL; its faulty
    agent's options name them so. localrref sends the PYTHON_* messages for
    all of them; the calls note here which requests torch's names fit, so
    that fault injection meets them under either name. (An RRef made this
    way and passed to another worker is fetched there as a PYTHON_* one.)
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: set[int] = set()  # each leaves as its message is sent
        self._rrefs = weakref.WeakSet()   # the core's RRef records

    @staticmethod
    def is_script(func) -> bool:
        return isinstance(func, torch.jit.ScriptFunction) or is_builtin(func)

    def note_request(self, request_id: int) -> None:
        with self._lock:
            self._requests.add(request_id)

    def note_rref(self, record) -> None:
        with self._lock:
            self._rrefs.add(record)

    def made_by_script(self, record) -> bool:
        with self._lock:
            return record in self._rrefs

    def kind(self, message) -> str:
        """The type under which fault injection meets ``message``."""
        kind = message.type.value
        script = SCRIPT_KINDS.get(kind)
        if script is not None:
            with self._lock:
                if message.request_id in self._requests:
                    self._requests.discard(message.request_id)
                    return script
        return kind


class FaultyTransport:
    """An endpoint whose protocol messages meet a :class:`FaultPlan`.

    ``on_copy(message)`` is told of each extra copy sent (the agent counts it
    as sent, for the shutdown drain); ``classify(message)`` names the type
    a message meets the plan as (default: its own, ``message.type``).
    Everything but ``send`` and ``close`` is the wrapped endpoint's.
    """

    def __init__(self, endpoint, plan: FaultPlan, *, on_copy=None, classify=None) -> None:
        self._endpoint = endpoint
        self._plan = plan
        self._on_copy = on_copy
        self._classify = classify
        self._lock = threading.Condition()
        self._timers: list = []  # heap of (due, serial, dst, frame)
        self._serial = 0
        self._held: dict[int, bytes] = {}  # dst -> a frame waiting for the next one
        self._thread: threading.Thread | None = None
        self._closed = False
        self._kill_on = plan.spec.kill_on

    def __getattr__(self, name):
        return getattr(self._endpoint, name)

    def send(self, dst: int, frame) -> None:
        self._send(dst, frame)
        if self._kill_on:
            self._maybe_die("send", dst, frame)

    def recv(self, timeout: float | None = None):
        got = self._endpoint.recv(timeout)
        if got is not None and self._kill_on:
            self._maybe_die("recv", *got)
        return got

    def copy_point(self) -> None:
        """Halfway through a tensor's copy into shared memory (see DyingCopier)."""
        with self._lock:
            dies = self._plan.kills(COPY)
        if dies:
            _die("halfway through copying a tensor into shared memory")

    def _maybe_die(self, direction: str, peer: int, frame) -> None:
        kind = _kind_of(frame)
        if kind is None:
            return
        with self._lock:
            dies = self._plan.kills(f"{direction}:{kind}")
        if dies:
            _die(f"{'after sending' if direction == 'send' else 'on receiving'} {kind} "
                 f"{'to' if direction == 'send' else 'from'} rank {peer}")

    def _send(self, dst: int, frame) -> None:
        if frame[:1] != frames.MESSAGE:
            self._send_now(dst, frame)
            return
        message = frames.decode_message(frame)
        kind = message.type.value if self._classify is None else self._classify(message)
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
        mark_serving()
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


class DyingCopier:
    """A shared-memory copier that lets the fault plan kill the worker halfway
    through a copy (``kill=copy``); otherwise it is the copier it wraps."""

    def __init__(self, copier, transport: FaultyTransport) -> None:
        self._copier = copier
        self._transport = transport

    def memmove(self, dst: int, src: int, nbytes: int) -> None:
        half = nbytes // 2
        self._copier.memmove(dst, src, half)
        self._transport.copy_point()
        self._copier.memmove(dst + half, src + half, nbytes - half)

    def close(self) -> None:
        self._copier.close()


def _kind_of(frame) -> str | None:
    """A frame's type as ``kill_on`` names it (None: a frame of no such type)."""
    tag = bytes(frame[:1])
    try:
        if tag == frames.MESSAGE:
            return frames.decode_message(frame).type.value
        if tag == wire.CONTROL_TAG:
            return type(wire.decode_control(frame)).__name__
    except Exception:  # noqa: BLE001 - a frame the agent will reject anyway
        return None
    return None


def _die(where: str) -> None:
    log.warning("localrref fault injection: pid %d kills itself (SIGKILL) %s", os.getpid(),
                where)
    for handler in logging.getLogger("localrref").handlers + logging.getLogger().handlers:
        try:
            handler.flush()
        except Exception:  # noqa: BLE001
            pass
    os.kill(os.getpid(), signal.SIGKILL)
