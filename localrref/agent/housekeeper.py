"""The housekeeper: timers, RRefs Python dropped, and the leadership's watch.

Three chores that no message triggers:

* **Timers.** The core's deadlines (call timeouts, retries of control
  messages) fire through :meth:`Housekeeper.pass_`, which calls
  ``core.on_tick`` at ``core.next_deadline()``.
* **Dropped RRefs.** ``RRef.__del__`` may run in any thread, during any
  allocation, even one inside the agent's lock, so it only appends the
  record to a deque (:meth:`Housekeeper.defer_release`); whoever reads the
  inbox next, or the housekeeper, tells the core (``core.release``), which
  may send ``RREF_USER_DELETE``.
* **The watch.** While the world is busy the leadership's watch ticks
  (``leadership.py``): every 2 ms at first, twice as long after each tick
  that found nothing wrong, up to 16 ms. Each tick is a wake-up (tens of us
  of CPU on a VM, and a GIL hand-off): at a fixed 2 ms, four busy workers
  lost 7 % of the main job's throughput to them.

Threads: one ``localrref-housekeeping`` thread sleeps in ``select`` on a
self-pipe; any thread wakes it with one non-blocking byte (``t`` a new
timer, ``r`` a release, ``w`` the watch, ``x`` closing), which never blocks
and takes no lock, so ``__del__`` may do it. In a test world without threads
the driver calls :meth:`pass_` itself.
"""

from __future__ import annotations

import collections
import logging
import os
import select
import threading

from ..errors import LocalRRefError
from .current import mark_serving
from .leadership import DEPOSED

__all__ = ["Housekeeper"]

log = logging.getLogger("localrref")

_WATCH_PERIOD_S = 0.002
_WATCH_PERIOD_MAX_S = 0.016


class Housekeeper:
    """Timers, deferred releases and the watch (see the module docstring)."""

    def __init__(self, agent, *, threads: bool) -> None:
        self.agent = agent
        self.releases: collections.deque = collections.deque()
        self._timer_target: float | None = None
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._thread = (threading.Thread(target=self._loop, name="localrref-housekeeping",
                                         daemon=True) if threads else None)

    def start(self) -> None:
        if self._thread is not None:
            self._thread.start()

    def wake(self, why: bytes) -> None:
        """Wake the housekeeping thread; never blocks, takes no lock."""
        try:
            os.write(self._wake_w, why)
        except (BlockingIOError, OSError):
            pass  # the pipe is full (a wake-up is pending anyway) or closed

    # -- timers ----------------------------------------------------------------

    def poke_timer_locked(self) -> None:
        """After a core call (agent lock held): wake for a deadline earlier than planned."""
        deadline = self.agent.core.next_deadline()
        if deadline is not None and (self._timer_target is None or deadline < self._timer_target):
            self._timer_target = deadline
            self.wake(b"t")

    def next_deadline(self) -> float | None:
        with self.agent.lock:
            return self.agent.core.next_deadline()

    # -- dropped RRefs -----------------------------------------------------------

    def defer_release(self, record) -> None:
        """Called from ``RRef.__del__`` in any thread: never blocks, never locks."""
        agent = self.agent
        if agent.closed:
            return
        self.releases.append(record)
        # The inbox's reader, if it spins, takes the release on its next
        # turn; otherwise the housekeeper is woken for it (a wake-up costs
        # tens of microseconds here, see Endpoint._wait_readable).
        if agent.reader.holds_inbox():
            # The thread holding the inbox (this one, running a job or a
            # callback, or one parked between calls) takes it before its
            # next read; if a parked one stays away, the watch does.
            return
        if agent.transport.nudge():
            return
        self.wake(b"r")

    def take_releases_if_any(self) -> None:
        if self.releases:
            self.take_releases()

    def take_releases(self) -> None:
        """Tell the core about the RRefs Python dropped (see defer_release)."""
        agent = self.agent
        with agent.lock:
            self._release_locked()
            effects = agent.core.take_effects()
        agent.run(effects)

    def _release_locked(self) -> None:
        releases = self.releases
        core = self.agent.core
        while releases:
            record = releases.popleft()
            try:
                core.release(record)
            except LocalRRefError:
                log.exception("localrref: releasing %r", record)

    def inbox_deposed(self) -> None:
        if self.releases:
            self.wake(b"r")  # dropped while the inbox was parked

    # -- one pass ------------------------------------------------------------------

    def pass_(self) -> None:
        """Releases, due timers, and the shutdown machine's deadlines."""
        agent = self.agent
        now = agent.clock()
        with agent.lock:
            self._release_locked()
            effects = agent.core.take_effects()
            effects += agent.core.on_tick(now)
            effects += agent.shutdown.poll_locked(now)
        agent.run(effects)
        agent.signal_progress()

    def _loop(self) -> None:
        mark_serving()
        agent = self.agent
        lead = agent.reader.lead
        next_watch = None
        period = _WATCH_PERIOD_S
        while not agent.closing:
            now = agent.clock()
            with agent.lock:
                deadline = agent.core.next_deadline()
                if deadline is None and self._timer_target is not None \
                        and self._timer_target > now:
                    # No timer armed now, but keep waking at the old target:
                    # a call made meanwhile then need not wake this thread
                    # (its deadline is later), and that one spurious wake-up
                    # is cheaper than a wake-up per call.
                    deadline = self._timer_target
                self._timer_target = deadline
            wake_at = deadline if next_watch is None else (
                next_watch if deadline is None else min(deadline, next_watch))
            timeout = None if wake_at is None else max(0.0, wake_at - now)
            try:
                readable, _, _ = select.select([self._wake_r], [], [], timeout)
                woken = os.read(self._wake_r, 4096) if readable else b""
            except BlockingIOError:
                woken = b""
            except (OSError, ValueError):
                return
            if agent.closing:
                return
            now = agent.clock()
            if next_watch is None and lead.watching:
                period = _WATCH_PERIOD_S
                next_watch = now + period
            elif next_watch is not None and now >= next_watch:
                outcome = lead.watch_tick()
                if outcome is None:
                    next_watch = None
                else:
                    period = _WATCH_PERIOD_S if outcome is DEPOSED else min(
                        2 * period, _WATCH_PERIOD_MAX_S)
                    next_watch = now + period
            if woken.strip(b"w") or (deadline is not None and now >= deadline):
                self.pass_()

    # -- close ---------------------------------------------------------------------

    def close(self, timeout: float) -> None:
        """Stop the thread (after ``agent.closing`` is set) and close the pipe."""
        self.wake(b"x")
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(timeout)

    def close_pipe(self) -> None:
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
