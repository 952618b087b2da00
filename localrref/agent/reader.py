"""The inbox's reader: who reads it, reading a frame, and a caller reading its own reply.

One thread at a time reads the worker's inbox (``leadership.py`` decides
which, and why). The reader takes a frame from the transport, routes a
control message to the agent, has the core handle a protocol message under
the agent's lock, and carries out the effects itself, running the user
function of an incoming call without handing it to another thread.

Threads:

* IO threads (``localrref-io``) follow, lead and retire (:meth:`Reader._io_loop`);
* an application thread that waits for its own reply (``rpc_sync``,
  ``to_here``) may take the inbox for the wait and keep it, parked, until
  its next call (:meth:`Reader.wait_reply`); it hands other futures'
  completions and incoming jobs to the pool, because they are user code
  that could wait for this very thread;
* in a test world without threads (``Agent(driver=...)``) the driver calls
  :meth:`Reader.step` instead.

What they touch: the leadership (its own lock), the transport's ``recv``
(one reader at a time), the core (the agent's lock, never held while
effects run).
"""

from __future__ import annotations

import logging
import os
import threading
import time

import torch

from ..codec import frames
from ..core import effects as fx
from ..core.messages import USER_LEVEL_TYPES
from ..errors import WorkerClosedError
from ..transport import wire
from .current import mark_serving, runs_user_code
from . import profiling
from .futures import wait
from .leadership import LEAD, REQUESTED, Leadership

__all__ = ["Reader"]

log = logging.getLogger("localrref")

# How long a waiting caller waits for the IO thread to hand it the inbox
# before it waits on its future instead (see wait_reply).
_HANDOFF_WAIT_S = 0.0002
# The same, for an IO thread that must first wake from poll(2) (a wait
# that sleeps: the reply is still in flight).
_WAKE_HANDOFF_WAIT_S = 0.005


def _all_done(futures) -> bool:
    # A loop, not all(generator): checked after every frame a caller reads.
    for future in futures:
        if not future.done():
            return False
    return True


class Reader:
    """Reads this worker's inbox (see the module docstring)."""

    def __init__(self, agent, *, threads: bool) -> None:
        self.agent = agent
        self.threads = threads
        self.lead = Leadership(start_reader=self._start_io_thread_locked,
                               wake_watch=lambda: agent.housekeeper.wake(b"w"),
                               on_depose=self._inbox_deposed)
        # Guarded by the leadership's lock.
        self._io_threads: set[threading.Thread] = set()

    def start(self) -> None:
        if self.threads:
            with self.lead.lock:
                self._start_io_thread_locked()

    # -- the hot path's questions ------------------------------------------------

    def before_request(self, will_wait: bool, *, parked_keeps: bool = False) -> None:
        """This thread is about to make a request: if it holds the inbox, give it
        up, unless it will read the inbox itself for the reply.

        ``will_wait``: the caller waits for the reply next (rpc_sync,
        to_here): a parked caller, or the reader out in a job it read, keeps
        the inbox and reads its reply (wait_reply). Stepping down would wake
        a follower for nothing, which on two cores costs the other processes
        a core at the moment they need it. ``parked_keeps``: a parked caller
        keeps the inbox although it does not wait now (remote()); the reader
        out in a job gives it up, as the job goes on without reading.
        """
        lead = self.lead
        me = threading.get_ident()
        if lead.leader != me:
            return
        if lead.parked and (will_wait or parked_keeps):
            return
        if lead.busy and will_wait:
            return
        lead.step_down(me)

    def holds_inbox(self) -> bool:
        """This thread, or a parked caller, will read the inbox again soon."""
        lead = self.lead
        return lead.leader == threading.get_ident() or lead.parked

    def on_io_thread(self) -> bool:
        return threading.get_ident() in self.lead.io_idents

    def release_inbox(self) -> None:
        """This thread stops holding the inbox between waits (see wait_reply)."""
        me = threading.get_ident()
        if self.lead.leader == me:
            self.lead.step_down(me)

    # -- IO threads ----------------------------------------------------------------

    def _start_io_thread_locked(self) -> None:
        """Start an IO thread (called with the leadership's lock held).

        A thread leaves ``_io_threads`` only once it is dead, not when
        ``_io_loop`` returns: after that it still frees its frame (the last
        effects, tensors among them, whose dealloc drops the GIL inside
        torch). Were close() not to join it, that could run into interpreter
        finalization, and a thread that takes the GIL back then is killed
        inside torch's C++, which aborts the whole process ("terminate called
        without an active exception", pytorch/pytorch#38228).
        """
        self._io_threads = {t for t in self._io_threads if t.is_alive()}
        thread = threading.Thread(target=self._io_loop, name="localrref-io", daemon=True)
        self._io_threads.add(thread)
        thread.start()

    def _inbox_deposed(self) -> None:
        self.agent.housekeeper.inbox_deposed()

    def _io_loop(self) -> None:
        """An IO thread: follow, lead (read, carry out effects), step down or retire.

        See leadership.py for when a leader gives up the inbox and why it
        runs user functions itself.
        """
        mark_serving()
        runs_user_code()
        agent = self.agent
        housekeeper = agent.housekeeper
        lead = self.lead
        me = threading.get_ident()
        lead.io_thread_started(me)
        try:
            while lead.wait_to_lead(me):
                while True:
                    effects = self._read_one(None)
                    if effects is None:
                        housekeeper.take_releases_if_any()
                        lead.stop_reading(me)
                        return
                    still_leader = True
                    if effects:
                        lead.busy_begin()
                        try:
                            agent.run(effects, inline_jobs=True)
                        except Exception:
                            log.exception("localrref: error carrying out effects")
                        still_leader = lead.busy_end(me)
                    # RRefs dropped meanwhile, by the job or by other threads
                    # (see Housekeeper.defer_release); after the frame's
                    # effects, which someone may be waiting for (a fetch of
                    # a pipeline's input), while a release only frees memory.
                    housekeeper.take_releases_if_any()
                    if not still_leader:
                        break  # deposed meanwhile: another thread reads the inbox
                    agent.signal_progress()
                    if lead.handoff_to is not None and lead.hand_off(me):
                        break
                    if lead.leader != me:
                        # Only the leader may sit in recv: a second thread
                        # there would wait on its lock, and a caller that
                        # claimed the inbox would queue behind it for a frame
                        # that may never come.
                        break
                agent.signal_progress()
                if lead.should_retire():
                    return
        finally:
            lead.io_thread_exited(me)

    def step(self) -> None:
        """Without threads: read the next frame (the driver knows one is there) and
        carry out its effects on this thread, jobs included."""
        agent = self.agent
        effects = self._read_one(0)
        agent.housekeeper.take_releases_if_any()
        if effects:
            agent.run(effects, inline_jobs=True)
            agent.housekeeper.take_releases_if_any()
        agent.signal_progress()

    # -- one frame -----------------------------------------------------------------

    def _read_one(self, timeout: float | None):
        """Read and handle one frame; return its effects, or None to stop reading."""
        agent = self.agent
        if agent.closing:
            return None
        try:
            item = agent.transport.recv(timeout)
        except (WorkerClosedError, OSError, ValueError):
            return None
        if item is None:
            return None if agent.closing else []
        src, frame = item
        if frame[:1] == wire.CONTROL_TAG:
            try:
                control = wire.decode_control(frame)
            except ValueError:
                log.exception("localrref: dropped an undecodable control frame from rank %d", src)
                return []
            agent.on_control(src, control)
            return []
        if frame[:1] == wire.AUTOGRAD_TAG:
            # Handled right here, pass and all: these messages are short
            # protocol steps, or a gradient pass someone is waiting for.
            agent.on_autograd(src, frame)
            return []
        try:
            message = frames.decode_message(frame)
        except Exception:
            log.exception("localrref: dropped an undecodable frame from rank %d", src)
            return []
        if message.type in USER_LEVEL_TYPES:
            agent.count_received()
        try:
            with agent.lock:
                effects = agent.core.handle(src, message, now=agent.clock())
                agent.housekeeper.poke_timer_locked()
        except Exception:
            log.exception("localrref: error handling %s from rank %d",
                          getattr(message, "type", message), src)
            return []
        return effects

    # -- the caller reads its own reply ----------------------------------------------

    def wait_reply(self, future: torch.futures.Future):
        """``wait(future)``, reading the inbox in this thread while it can.

        A blocking call (rpc_sync, to_here) that waits on a torch future
        needs a second thread to read the reply and wake it: two wake-ups
        per call in this process, and two threads fighting over the GIL.
        Instead the waiting thread takes the inbox from the IO thread (only
        from one that spins, which hands over within a few microseconds; a
        sleeping one is left to wake for the reply itself), reads until its
        reply is in, and then *keeps* the inbox, parked, so that its next
        call needs no hand-off at all. Jobs and other futures' completions it
        reads go to the pool. The IO threads get the inbox back on an
        rpc_async or a shutdown by the parked thread, when another thread
        waits on a future, or when the housekeeper's watch finds the parked
        thread away for a whole period (2 to 16 ms; see housekeeper.py).
        """
        self.wait_replies((future,))
        return wait(future)

    def wait_replies(self, futures) -> None:
        """Return once every one of ``futures`` (internal futures of requests this
        thread made) is done, reading the inbox as :meth:`wait_reply` does.

        The replies to any of them are completed on this thread, in whatever
        order they come: a caller waiting for several owners (a
        ``DistributedOptimizer`` step) would otherwise have the reply that
        overtook the one it waits for first completed on the pool, a thread
        hand-off for nothing.
        """
        try:
            self._wait_replies(futures)
        finally:
            for future in futures:
                profiling.end_waited(future)

    def _wait_replies(self, futures) -> None:
        if not self.threads:
            self.agent.block_until(lambda: _all_done(futures), None, "a reply")
            return
        me = threading.get_ident()
        if not _all_done(futures) and self._claim_inbox(me):
            try:
                self._read_until(futures, me)
            finally:
                self.lead.park(me)
        if _all_done(futures):
            return
        self.lead.fallback_wait_begins()
        try:
            for future in futures:
                future.wait()
        finally:
            self.lead.fallback_wait_ends()

    def _claim_inbox(self, me: int) -> bool:
        """Become the inbox's reader for this wait; False: another thread brings the reply."""
        outcome = self.lead.claim(me)
        if outcome is not REQUESTED:
            return outcome is LEAD
        transport = self.agent.transport
        if not transport.nudge():
            # The IO thread sleeps in poll. Letting it wake for the reply
            # would cost the same wake-up, plus a hand-off of the reply to
            # this thread, and on every later call too: a caller that does
            # not get the inbox back waits on its futures for good while the
            # IO thread reads its replies and then spins, beside it, for the
            # GIL and a core (a trainer calling every millisecond spent as
            # much CPU in that spin as in its own step). Wake it to hand over
            # instead, and sleep until it has: the reply is in flight meanwhile.
            transport.wake()
            return self.lead.await_handoff(me, _WAKE_HANDOFF_WAIT_S)
        deadline = time.perf_counter() + _HANDOFF_WAIT_S
        while (handed := self.lead.poll_handoff(me, time.perf_counter() > deadline)) is None:
            os.sched_yield()
        return handed

    def _read_until(self, futures, me: int) -> None:
        agent = self.agent
        transport = agent.transport
        housekeeper = agent.housekeeper

        def reply_arrived(_future, me=me):
            # Completed by another thread (a timeout, a peer's death): this
            # thread may be in recv, so make it look.
            if threading.get_ident() != me and not transport.nudge():
                transport.wake()

        for future in futures:
            future.add_done_callback(reply_arrived)
        while not _all_done(futures) and self.lead.leader == me:
            housekeeper.take_releases_if_any()
            effects = self._read_one(None)
            if effects is None:
                return
            if effects:
                mine, others = self._split_for(futures, effects)
                if others:
                    # Other futures' callbacks are user code that must not
                    # run on this thread (one could wait for this very
                    # caller), and jobs go to the pool.
                    self.run_on_pool(others)
                self.lead.busy_begin()
                try:
                    agent.run(mine, inline_jobs=True)  # fetches only (see _split_for)
                except Exception:
                    log.exception("localrref: error carrying out effects")
                still_leader = self.lead.busy_end(me)
                housekeeper.take_releases_if_any()
                if not still_leader:
                    return
            agent.signal_progress()

    def run_on_pool(self, effects) -> None:
        agent = self.agent
        try:
            agent.jobs.executor.submit(agent.run, effects)
        except Exception:  # the pool is at its limit or closing:
            agent.run(effects)  # better on this thread than never

    def _split_for(self, futures, effects) -> tuple[list, list]:
        """The effects this waiting thread carries out itself, and the rest."""
        calls = self.agent.calls
        mine, others = [], []
        for effect in effects:
            if isinstance(effect, (fx.Complete, fx.Fail)):
                (mine if calls.is_reply_for(futures, effect) else others).append(effect)
            elif isinstance(effect, fx.Execute):
                # A fetch of a value that is ready runs no user function:
                # serving it here (pickling the value, as an IO thread does)
                # saves the pool thread's wake-up on the peer's to_here().
                (mine if effect.kind is fx.JobKind.FETCH else others).append(effect)
            elif (isinstance(effect, fx.CreationSettled)
                  and calls.is_exposed_creation(effect.rref)):
                others.append(effect)
            else:
                mine.append(effect)
        return mine, others

    # -- close ---------------------------------------------------------------------

    def close(self, timeout: float) -> None:
        """Stop the IO threads and join every one (see _start_io_thread_locked)."""
        self.lead.close()
        self.agent.transport.wake()
        with self.lead.lock:
            io_threads = list(self._io_threads)
        for thread in io_threads:
            if thread is not threading.current_thread():
                thread.join(timeout)
