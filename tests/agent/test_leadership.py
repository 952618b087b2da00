"""The inbox leadership's decisions, without an agent, an inbox or a clock."""

import threading

import pytest

from localrref.agent.leadership import DECLINED, DEPOSED, LEAD, REQUESTED, WATCHING, Leadership

pytestmark = pytest.mark.timeout(30)

IO_THREAD, CALLER, OTHER_CALLER = 101, 202, 303


class Recorder:
    """The agent's side of the callbacks: counts what the leadership asked for."""

    def __init__(self):
        self.readers_started = 0
        self.watch_wakes = 0
        self.deposes = 0

    def build(self, **kwargs):
        return Leadership(start_reader=self.start_reader, wake_watch=self.wake_watch,
                          on_depose=self.on_depose, **kwargs)

    def start_reader(self):
        self.readers_started += 1

    def wake_watch(self):
        self.watch_wakes += 1

    def on_depose(self):
        self.deposes += 1


@pytest.fixture
def rec():
    return Recorder()


def io_leads(lead):
    """An IO thread reads the inbox (it waited for the role, nobody held it)."""
    lead.io_thread_started(IO_THREAD)
    assert lead.wait_to_lead(IO_THREAD)
    assert lead.leader == IO_THREAD


def test_a_caller_takes_a_free_inbox_at_once(rec):
    lead = rec.build()
    assert lead.claim(CALLER) == LEAD
    assert lead.leader == CALLER and not lead.parked


def test_a_reading_io_thread_is_asked_to_hand_over_and_does_at_its_next_turn(rec):
    lead = rec.build()
    io_leads(lead)
    assert lead.claim(CALLER) == REQUESTED
    assert lead.poll_handoff(CALLER, expired=False) is None  # not yet
    assert lead.hand_off(IO_THREAD)
    assert lead.leader == CALLER and lead.handoff_to is None
    assert lead.poll_handoff(CALLER, expired=False) is True
    assert not lead.hand_off(IO_THREAD)  # nobody else asked


@pytest.mark.parametrize("situation", ["busy", "asked", "caller_reads", "closing"])
def test_a_claim_is_declined_when_the_reader_should_bring_the_reply(rec, situation):
    lead = rec.build()
    io_leads(lead)
    claimant = CALLER
    if situation == "busy":
        lead.busy_begin()  # the reader is out in user code
    elif situation == "asked":
        assert lead.claim(OTHER_CALLER) == REQUESTED
    elif situation == "caller_reads":
        lead.step_down(IO_THREAD)
        assert lead.claim(OTHER_CALLER) == LEAD  # reads for its own reply, not parked
    elif situation == "closing":
        lead.close()
    before = lead.leader
    assert lead.claim(claimant) == DECLINED
    assert lead.leader == before


def test_a_parked_inbox_goes_to_the_next_caller_without_waking_anyone(rec):
    lead = rec.build()
    assert lead.claim(CALLER) == LEAD
    lead.park(CALLER)
    assert lead.parked
    assert lead.claim(OTHER_CALLER) == LEAD
    assert lead.leader == OTHER_CALLER and not lead.parked
    assert rec.readers_started == 0 and rec.deposes == 0


def test_an_expired_or_withdrawn_request_is_forgotten(rec):
    lead = rec.build()
    io_leads(lead)
    assert lead.claim(CALLER) == REQUESTED
    assert lead.poll_handoff(CALLER, expired=True) is False
    assert lead.handoff_to is None and not lead.hand_off(IO_THREAD)
    assert lead.claim(CALLER) == REQUESTED
    assert lead.withdraw(CALLER) is False
    assert lead.handoff_to is None and lead.leader == IO_THREAD


def test_a_caller_sleeps_until_a_woken_reader_hands_over(rec):
    lead = rec.build()
    io_leads(lead)
    assert lead.claim(CALLER) == REQUESTED
    got = []
    waiter = threading.Thread(target=lambda: got.append(lead.await_handoff(CALLER, 30.0)))
    waiter.start()
    assert lead.hand_off(IO_THREAD)  # the reader woke and saw the request
    waiter.join(30)
    assert got == [True] and lead.leader == CALLER


@pytest.mark.parametrize("ending", ["timeout", "closing"])
def test_a_hand_off_that_does_not_come_is_withdrawn(rec, ending):
    lead = rec.build()
    io_leads(lead)
    assert lead.claim(CALLER) == REQUESTED
    if ending == "closing":
        lead.close()
    assert lead.await_handoff(CALLER, 0.0 if ending == "timeout" else 30.0) is False
    assert lead.handoff_to is None and lead.leader == IO_THREAD
    assert not lead.hand_off(IO_THREAD)


def test_withdraw_reports_a_hand_off_that_raced_in(rec):
    lead = rec.build()
    io_leads(lead)
    assert lead.claim(CALLER) == REQUESTED
    assert lead.hand_off(IO_THREAD)
    assert lead.withdraw(CALLER) is True


def test_parking_starts_the_watch_once(rec):
    lead = rec.build()
    assert lead.claim(CALLER) == LEAD
    lead.park(CALLER)
    assert lead.claim(CALLER) == LEAD
    lead.park(CALLER)
    assert rec.watch_wakes == 1 and lead.watching


@pytest.mark.parametrize("why", ["fallback_waiter", "handoff_requested", "closing"])
def test_parking_gives_the_inbox_back_when_someone_else_needs_it(rec, why):
    lead = rec.build()
    assert lead.claim(CALLER) == LEAD
    if why == "fallback_waiter":
        lead.fallback_waiters += 1
    elif why == "handoff_requested":
        lead.handoff_to = OTHER_CALLER
    else:
        lead.close()
    lead.park(CALLER)
    assert lead.leader is None and not lead.parked and rec.deposes == 1
    # A new IO thread reads unless the agent is closing.
    assert rec.readers_started == (0 if why == "closing" else 1)


def test_a_fallback_waiter_unparks_the_inbox(rec):
    lead = rec.build()
    assert lead.claim(CALLER) == LEAD
    lead.park(CALLER)
    lead.fallback_wait_begins()
    assert lead.leader is None and rec.readers_started == 1
    lead.fallback_wait_ends()
    assert lead.fallback_waiters == 0


def test_a_deposed_leader_wakes_a_waiting_follower_instead_of_starting_a_reader(rec):
    lead = rec.build()
    assert lead.claim(CALLER) == LEAD
    took_over = threading.Event()

    def follower():
        me = threading.get_ident()
        if lead.wait_to_lead(me) and lead.leader == me:
            took_over.set()

    thread = threading.Thread(target=follower)
    thread.start()
    while True:  # until the follower waits (it counts itself under the lock)
        with lead.lock:
            if lead.followers == 1:
                break
    lead.step_down(CALLER)
    thread.join(10)
    assert took_over.is_set() and rec.readers_started == 0


def test_the_watch_deposes_a_leader_out_in_user_code_for_a_whole_period(rec):
    lead = rec.build()
    io_leads(lead)
    lead.busy_begin()
    assert rec.watch_wakes == 1
    assert lead.watch_tick() == WATCHING   # the spell began since the last tick
    assert lead.watch_tick() == DEPOSED    # the same spell, a whole period later
    assert lead.leader is None and rec.readers_started == 1
    assert lead.busy_end(IO_THREAD) is False  # it comes back a follower


def test_a_job_the_reader_runs_reads_its_own_reply_waking_nobody(rec):
    # The job an IO thread runs makes a blocking call: the thread keeps the
    # inbox and reads its reply as a caller does. No follower is woken or
    # started for it, and the watch no longer counts it as out in user code.
    lead = rec.build()
    io_leads(lead)
    lead.busy_begin()
    assert lead.claim(IO_THREAD) == LEAD
    assert lead.leader == IO_THREAD and not lead.busy and not lead.parked
    assert rec.readers_started == 0 and rec.deposes == 0
    assert lead.watch_tick() == WATCHING
    assert lead.watch_tick() is None, "reading for its reply is no busy spell"
    assert lead.leader == IO_THREAD


@pytest.mark.parametrize("how", ["stepped_down", "deposed_then_handed_back", "kept"])
def test_an_io_thread_whose_job_parked_the_inbox_reads_on_unparked(rec, how):
    # The job an IO thread runs makes a blocking call: the thread gets the
    # inbox back for its reply (free after its step down, or handed over by
    # the reader that took it meanwhile) and parks it, then returns to its
    # loop and reads. The watch must not take the inbox from a thread in
    # recv: a second reader would then read beside it.
    lead = rec.build()
    io_leads(lead)
    lead.busy_begin()
    if how == "stepped_down":
        lead.step_down(IO_THREAD)  # before_request of a call it does not wait for
        assert lead.claim(IO_THREAD) == LEAD
    elif how == "kept":
        assert lead.claim(IO_THREAD) == LEAD  # a call it waits for: no step down
    else:
        assert lead.watch_tick() == WATCHING
        assert lead.watch_tick() == DEPOSED
        lead.io_thread_started(OTHER_CALLER)  # the reader started in its place
        assert lead.wait_to_lead(OTHER_CALLER)
        assert lead.claim(IO_THREAD) == REQUESTED
        assert lead.hand_off(OTHER_CALLER)
    lead.park(IO_THREAD)
    assert lead.parked
    assert lead.busy_end(IO_THREAD) is True
    assert not lead.parked
    deposes = rec.deposes
    assert lead.watch_tick() == WATCHING
    assert lead.watch_tick() is None
    assert lead.leader == IO_THREAD and rec.deposes == deposes


def test_short_spells_never_depose_and_a_quiet_period_stops_the_watch(rec):
    lead = rec.build()
    io_leads(lead)
    for _ in range(3):
        lead.busy_begin()
        assert lead.busy_end(IO_THREAD) is True
        assert lead.watch_tick() == WATCHING
    assert lead.watch_tick() is None and not lead.watching
    lead.busy_begin()  # the next spell wakes it again
    assert rec.watch_wakes == 2 and lead.leader == IO_THREAD


def test_the_watch_unparks_a_caller_that_stays_away(rec):
    lead = rec.build()
    assert lead.claim(CALLER) == LEAD
    lead.park(CALLER)
    assert lead.watch_tick() == WATCHING
    assert lead.claim(CALLER) == LEAD  # back for another call: not away
    lead.park(CALLER)
    assert lead.watch_tick() == WATCHING
    assert lead.watch_tick() == DEPOSED
    assert lead.leader is None and rec.deposes == 1 and rec.readers_started == 1


def test_closing_releases_every_follower(rec):
    lead = rec.build()
    io_leads(lead)
    answers = []
    threads = [threading.Thread(target=lambda: answers.append(
        lead.wait_to_lead(threading.get_ident()))) for _ in range(3)]
    for thread in threads:
        thread.start()
    while True:
        with lead.lock:
            if lead.followers == 3:
                break
    lead.close()
    for thread in threads:
        thread.join(10)
    assert answers == [False, False, False] and lead.leader == IO_THREAD
    lead.step_down(IO_THREAD)
    assert rec.readers_started == 0


def test_stop_reading_passes_the_closed_inbox_on(rec):
    lead = rec.build()
    io_leads(lead)
    lead.stop_reading(OTHER_CALLER)  # not the leader: nothing happens
    assert lead.leader == IO_THREAD
    lead.stop_reading(IO_THREAD)
    assert lead.leader is None and rec.readers_started == 0


def test_only_the_leader_steps_down_and_extra_followers_retire(rec):
    lead = rec.build(idle_followers=1)
    io_leads(lead)
    lead.step_down(CALLER)
    assert lead.leader == IO_THREAD and rec.deposes == 0
    assert not lead.should_retire()
    lead.followers = 1
    assert lead.should_retire()


def test_io_threads_are_tracked_by_ident(rec):
    lead = rec.build()
    lead.io_thread_started(IO_THREAD)
    assert lead.claim(CALLER) == LEAD  # free inbox
    lead.step_down(CALLER)
    assert lead.wait_to_lead(IO_THREAD)
    assert lead.claim(OTHER_CALLER) == REQUESTED  # an IO thread reads: ask it
    lead.io_thread_exited(IO_THREAD)
    lead.handoff_to = None
    assert lead.claim(OTHER_CALLER) == DECLINED  # no longer an IO thread: a caller reads


@pytest.mark.parametrize("holder, call, keeps", [
    ("job", "waits", True),            # rpc_sync / to_here in a job the reader runs
    ("job", "async", False),           # rpc_async: the job goes on without reading
    ("job", "remote", False),          # remote(): likewise
    ("parked", "waits", True),         # a caller's next blocking call
    ("parked", "remote", True),        # a parked caller's remote() keeps its inbox
    ("parked", "async", False),        # rpc_async: the IO threads get it back
])
def test_before_request_keeps_the_inbox_only_for_a_thread_that_reads_its_reply(
        rec, holder, call, keeps):
    from types import SimpleNamespace

    from localrref.agent.reader import Reader

    reader = Reader(SimpleNamespace(), threads=False)
    lead = reader.lead = rec.build()
    me = threading.get_ident()
    if holder == "job":
        lead.io_thread_started(me)
        assert lead.wait_to_lead(me)
        lead.busy_begin()
    else:
        assert lead.claim(me) == LEAD
        lead.park(me)
    if call == "waits":
        reader.before_request(True)
    elif call == "remote":
        reader.before_request(False, parked_keeps=True)
    else:
        reader.before_request(False)
    assert (lead.leader == me) is keeps
    assert rec.deposes == (0 if keeps else 1)
