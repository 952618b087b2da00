"""Who reads a worker's inbox: the leader/followers state of its threads.

One thread at a time, the *leader*, reads the inbox. It lets the core handle
each frame and carries out the effects itself, running any user function it
was asked to, *still as leader*: handing the inbox to a follower before every
call would wake a second thread per message, and on a busy machine that
wake-up cost more than the whole call. While the leader is out in user code
nobody reads the inbox, so the leader steps down (a follower takes the inbox)
as soon as that could matter:

* at once, when the code it runs makes a request it does not wait for at
  once (``rpc_async``, ``remote()``); for one it waits for (``rpc_sync``,
  ``to_here()``) it keeps the inbox and reads its reply itself, as a caller
  that claimed it would (below), waking nobody;
* otherwise when the housekeeper's watch, which ticks every 2 to 16 ms while
  the world is busy, sees the same *busy spell* on two ticks in a row (code
  that sleeps, computes, or waits on a lock or an event another call will
  set).

An application thread that waits for its own reply (rpc_sync, to_here) may
*claim* the inbox: it becomes the leader, reads until its reply is in, and
then keeps the role *parked* between calls, so its next call needs no
hand-over. The IO threads get the inbox back when that thread makes an
rpc_async, when another thread must wait on a future only the inbox can
complete (a *fallback waiter*), or when the watch finds the parked thread
away for a whole period.

This class only decides; the agent reads the inbox and runs the effects.
What a decision needs done elsewhere goes through three callbacks, each
called with :attr:`lock` held (so none may block or take the agent's locks):

* ``start_reader()``: start one more IO thread (nobody waits to take over);
* ``wake_watch()``: the watch should start ticking;
* ``on_depose()``: the inbox just lost its reader (it may have been parked:
  anything dropped meanwhile needs someone else to send it).

Which thread touches what: every method may be called from any thread and
takes :attr:`lock`. The hot path reads :attr:`leader` and :attr:`parked`
without it: single attribute loads, whose stale answer only sends a thread
through the locked path that decides again.
"""

from __future__ import annotations

import enum
import threading
from typing import Callable

__all__ = ["Leadership", "Claim", "Watch", "LEAD", "REQUESTED", "DECLINED", "DEPOSED",
           "WATCHING"]

class Claim(enum.Enum):
    """What :meth:`Leadership.claim` decided."""

    LEAD = "lead"            # the caller leads now
    REQUESTED = "requested"  # the leader will hand over at its next turn
    DECLINED = "declined"    # let the current reader bring the reply


class Watch(enum.Enum):
    """What a tick of the watch found (:meth:`Leadership.watch_tick`; None: quiet)."""

    DEPOSED = "deposed"      # the leader was away: a follower reads now
    WATCHING = "watching"    # something may still need the watch


LEAD, REQUESTED, DECLINED = Claim.LEAD, Claim.REQUESTED, Claim.DECLINED
DEPOSED, WATCHING = Watch.DEPOSED, Watch.WATCHING


class Leadership:
    """The inbox's reader and who waits for the role (see the module docstring).

    Args:
        start_reader: starts an IO thread that calls :meth:`wait_to_lead`.
        wake_watch: wakes the housekeeper so that it calls :meth:`watch_tick`.
        on_depose: called whenever the leader loses the role to the watch,
            an unpark or a step down.
        idle_followers: IO threads kept waiting to take over; more retire.
    """

    def __init__(self, *, start_reader: Callable[[], None], wake_watch: Callable[[], None],
                 on_depose: Callable[[], None], idle_followers: int = 1) -> None:
        self.lock = threading.Lock()
        self._turn = threading.Condition(self.lock)
        self._handed = threading.Condition(self.lock)  # a hand-off happened
        self._start_reader = start_reader
        self._wake_watch = wake_watch
        self._on_depose = on_depose
        self._idle_followers = idle_followers
        self.closing = False
        self.leader: int | None = None      # thread ident of the inbox's reader
        self.busy = False                   # the leader is out carrying out effects
        self.parked = False                 # the leader is a caller, between two waits
        self.handoff_to: int | None = None  # a caller waiting for the leader's role
        self.followers = 0                  # IO threads waiting for the inbox
        self.fallback_waiters = 0           # threads waiting on futures only others complete
        self.fallback_waits = 0             # how many waits were (a hand-off each; for debug_info)
        self.io_idents: set[int] = set()    # the live IO threads
        self._busy_spells = 0               # how many times the leader went out
        self._spells_seen = 0               # _busy_spells at the watch's last tick
        self._parks = 0
        self._parks_seen = 0
        self.watching = False               # the watch ticks (read by the housekeeper)

    # -- IO threads ----------------------------------------------------------

    def io_thread_started(self, me: int) -> None:
        with self.lock:
            self.io_idents.add(me)

    def io_thread_exited(self, me: int) -> None:
        with self.lock:
            self.io_idents.discard(me)

    def wait_to_lead(self, me: int) -> bool:
        """Follow until the inbox is free, then lead; False once closing."""
        with self._turn:
            self.followers += 1
            while self.leader is not None and not self.closing:
                self._turn.wait()
            self.followers -= 1
            if self.closing:
                return False
            self.leader = me
            return True

    def stop_reading(self, me: int) -> None:
        """The leader found the inbox closed: let a follower see it too."""
        with self._turn:
            if self.leader == me:
                self.leader = None
                self._turn.notify()

    def busy_begin(self) -> None:
        """The leader goes out to carry out effects (maybe user code)."""
        with self.lock:
            self.busy = True
            self._busy_spells += 1
            self._start_watching_locked()

    def busy_end(self, me: int) -> bool:
        """Back from carrying out effects: True if ``me`` still leads.

        An IO thread can come back parked: the job it ran made a blocking
        call, claimed the inbox for its reply and parked it. It reads again
        now, so it is no longer parked; left parked, the watch would depose
        it while it sits in recv and a second reader would queue behind it,
        one that took its last look at ``closing`` before the close's wake-up,
        which the first one then drains.
        """
        with self.lock:
            if self.leader != me:
                return False
            self.busy = False
            self.parked = False
            return True

    def step_down(self, me: int) -> None:
        """The leader, in user code about to wait for a reply, gives up the inbox."""
        with self.lock:
            if self.leader == me:
                self._depose_locked()

    def hand_off(self, me: int) -> bool:
        """The leader gives the inbox to the caller that asked (:meth:`claim`)."""
        with self.lock:
            wanted_by = self.handoff_to
            if wanted_by is None or self.leader != me:
                return False
            self.handoff_to = None
            self.leader = wanted_by
            self.busy = False
            self._handed.notify_all()
            return True

    def should_retire(self) -> bool:
        """An IO thread that lost the inbox: enough others already wait?"""
        with self.lock:
            return self.closing or self.followers >= self._idle_followers

    # -- callers that wait for their own reply ------------------------------

    def claim(self, me: int) -> str:
        """A caller about to wait for its reply asks to read the inbox itself.

        :data:`LEAD` when the inbox was free or parked, or when the caller is
        the reader itself, out in a job it read (the caller leads now, as a
        caller: no longer out in user code, as it reads),
        :data:`REQUESTED` when an IO thread reads and was asked to hand over,
        :data:`DECLINED` when the reader should be left to bring the reply: it
        is out in user code, another caller already asked, or another caller
        reads (it only hands over when done).
        """
        with self.lock:
            if self.closing:
                return DECLINED
            leader = self.leader
            if leader is None or self.parked or leader == me:
                self.leader, self.parked, self.busy = me, False, False
                return LEAD
            if (self.busy or self.handoff_to is not None
                    or leader not in self.io_idents):
                return DECLINED
            self.handoff_to = me
            return REQUESTED

    def withdraw(self, me: int) -> bool:
        """Cancel a :data:`REQUESTED` claim; True if the role came meanwhile."""
        with self.lock:
            if self.handoff_to == me:
                self.handoff_to = None
            return self.leader == me

    def poll_handoff(self, me: int, expired: bool) -> bool | None:
        """While a claim is :data:`REQUESTED`: True once ``me`` leads, False to
        give up (closing, or ``expired``; the request is withdrawn), None to keep
        waiting."""
        with self.lock:
            if self.leader == me:
                return True
            if self.closing or expired:
                if self.handoff_to == me:
                    self.handoff_to = None
                return False
            return None

    def await_handoff(self, me: int, timeout: float) -> bool:
        """While a claim is :data:`REQUESTED` of a reader that must first wake:
        sleep until ``me`` leads (True) or ``timeout`` seconds pass, or closing
        (False; the request is withdrawn)."""
        with self._handed:
            self._handed.wait_for(lambda: self.leader == me or self.closing, timeout)
            if self.leader == me:
                return True
            if self.handoff_to == me:
                self.handoff_to = None
            return False

    def park(self, me: int) -> None:
        """The caller has its reply: keep the inbox, unread, until its next wait."""
        with self.lock:
            if self.leader != me:
                return
            if self.fallback_waiters or self.closing or self.handoff_to is not None:
                self._depose_locked()
                return
            self.parked = True
            self._parks += 1
            self._start_watching_locked()

    def unpark_for_others(self) -> None:
        """Whoever holds the inbox parked gives it back to the IO threads."""
        with self.lock:
            if self.parked:
                self._depose_locked()

    def fallback_wait_begins(self) -> None:
        """A thread will wait on a future only the inbox's reader can complete."""
        with self.lock:
            self.fallback_waiters += 1
            self.fallback_waits += 1
            if self.parked:
                self._depose_locked()

    def fallback_wait_ends(self) -> None:
        with self.lock:
            self.fallback_waiters -= 1

    # -- the housekeeper -----------------------------------------------------

    def watch_tick(self) -> str | None:
        """The watch's check on the leader.

        :data:`DEPOSED` if the leader was out in user code, or parked, since
        before the previous tick (the inbox goes back to the IO threads);
        :data:`WATCHING` while something may still need the watch; None once
        a whole period passed quietly (the watch may sleep until the next
        busy spell or park wakes it).
        """
        with self.lock:
            spells, seen = self._busy_spells, self._spells_seen
            self._spells_seen = spells
            parks, parks_seen = self._parks, self._parks_seen
            self._parks_seen = parks
            if self.busy and spells == seen and self.leader is not None:
                self._depose_locked()
                return DEPOSED
            if self.parked and parks == parks_seen:
                self._depose_locked()
                return DEPOSED
            if self.busy or self.parked or spells != seen or parks != parks_seen:
                return WATCHING
            self.watching = False
            return None

    def close(self) -> None:
        """No more leaders: every follower and waiting caller gives up."""
        with self._turn:
            self.closing = True
            self._turn.notify_all()
            self._handed.notify_all()

    # -- internals -----------------------------------------------------------

    def _start_watching_locked(self) -> None:
        if not self.watching:
            self.watching = True
            self._wake_watch()

    def _depose_locked(self) -> None:
        self.leader = None
        self.busy = False
        self.parked = False
        self._on_depose()
        if self.followers:
            self._turn.notify()
        elif not self.closing:
            self._start_reader()
