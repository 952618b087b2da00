"""Rendezvous decisions (launch/rendezvous.py) and the supervisor's roster, without processes."""

from __future__ import annotations

import dataclasses

import pytest

from localrref.control_messages import Joined, Leaving
from localrref.launch.rendezvous import (Arrival, Create, Join, Member, Reclaim, Refuse, Wait,
                                         WorldRecord, decide, is_local_host, parse_init_method)
from localrref.launch.standalone import Roster

ENV = {"MASTER_ADDR": "localhost", "MASTER_PORT": "29500"}


# ------------------------------------------------------------------ init_method


def test_env_is_the_default_and_reads_master_addr_and_port():
    rdv = parse_init_method(None, ENV)
    assert (rdv.host, rdv.port, rdv.path) == ("localhost", 29500, None)
    assert rdv.key == "port-29500"
    assert parse_init_method("env://", ENV) == rdv


@pytest.mark.parametrize("missing", ["MASTER_ADDR", "MASTER_PORT"])
def test_env_without_master_settings_names_the_variable_as_torch_does(missing):
    env = {k: v for k, v in ENV.items() if k != missing}
    with pytest.raises(ValueError, match=f"environment variable {missing} expected, but not set"):
        parse_init_method("env://", env)


def test_tcp_and_env_of_one_port_are_one_world():
    assert parse_init_method("tcp://127.0.0.1:29500", {}).key == parse_init_method(None, ENV).key


def test_file_worlds_are_keyed_by_their_path():
    a = parse_init_method("file:///tmp/a/rdv", {})
    assert a.path == "/tmp/a/rdv" and a.host is None
    assert a.key != parse_init_method("file:///tmp/b/rdv", {}).key
    assert a.key == parse_init_method("file:///tmp/a/rdv", {}).key


@pytest.mark.parametrize("method, message", [
    ("udp://x:1", "not supported"),
    ("tcp://localhost", "tcp://HOST:PORT"),
    ("file://", "names no file"),
])
def test_bad_init_methods_say_what_is_supported(method, message):
    with pytest.raises(ValueError, match=message):
        parse_init_method(method, {})


def test_bad_ports_are_refused():
    with pytest.raises(ValueError, match="must be a number"):
        parse_init_method("env://", {"MASTER_ADDR": "localhost", "MASTER_PORT": "http"})
    with pytest.raises(ValueError, match="1..65535"):
        parse_init_method("env://", {"MASTER_ADDR": "localhost", "MASTER_PORT": "70000"})


@pytest.mark.parametrize("host, local", [
    ("localhost", True), ("127.0.0.1", True), ("127.0.1.1", True), ("::1", True),
    ("[::1]", True), ("0.0.0.0", True), ("myhost", True), ("10.0.0.5", True),
    ("10.0.0.6", False), ("otherhost", False),
])
def test_local_hosts(host, local):
    assert is_local_host(host, {"myhost"}, {"10.0.0.5"}) is local


# -------------------------------------------------------------------- decisions

RDV = parse_init_method(None, ENV)


def arrival(rank, *, world_size=3, name=None, pid=None):
    return Arrival(rank=rank, world_size=world_size, name=name or f"worker{rank}",
                   pid=pid or 100 + rank, started=7)


def member(rank, *, pid=None, left=False, name=None):
    return Member(rank=rank, name=name or f"worker{rank}", pid=pid or 100 + rank, started=7,
                  left=left)


def record(*members, world_size=3):
    return WorldRecord(world_id="abc", world_size=world_size, supervisor_pid=50,
                       supervisor_started=7, members=tuple(members))


def everyone_alive(pid, started):
    return True


def alive_only(*pids):
    return lambda pid, started: pid in pids


def test_the_first_to_arrive_creates_the_world():
    assert decide(None, arrival(1), RDV, everyone_alive) == Create()


def test_later_arrivals_join():
    found = record(member(0))
    assert decide(found, arrival(1), RDV, everyone_alive) == Join(found)


def test_two_processes_claiming_one_rank_is_refused_naming_both():
    decision = decide(record(member(1, pid=101)), arrival(1, pid=999), RDV, everyone_alive)
    assert isinstance(decision, Refuse)
    assert "two processes claim rank 1" in decision.reason
    assert "101" in decision.reason and "999" in decision.reason


def test_world_sizes_that_disagree_are_refused_with_both_sizes():
    decision = decide(record(member(0)), arrival(1, world_size=4), RDV, everyone_alive)
    assert isinstance(decision, Refuse)
    assert "world_size=4" in decision.reason and "has 3 workers" in decision.reason


def test_a_name_taken_by_a_live_member_is_refused():
    decision = decide(record(member(0, name="ps")), arrival(1, name="ps"), RDV, everyone_alive)
    assert isinstance(decision, Refuse) and "'ps' is not unique: it is taken" in decision.reason
    # Rank 1 stays empty: the members are told (they would wait for it).
    assert decision.dooms_world


def test_a_world_a_refusal_doomed_refuses_later_arrivals():
    doomed = dataclasses.replace(record(member(0, name="ps")),
                                 refused="worker name 'ps' is not unique: ...")
    decision = decide(doomed, arrival(2, name="trainer"), RDV, everyone_alive)
    assert isinstance(decision, Refuse) and "cannot form" in decision.reason
    assert "'ps' is not unique" in decision.reason
    assert WorldRecord.from_json(doomed.to_json()) == doomed
    # Every member gone: still refused until the supervisor removes the
    # world; a crashed run's record (its supervisor dead too) is reclaimed.
    gone = dataclasses.replace(doomed, members=(member(0, name="ps", left=True),))
    assert isinstance(decide(gone, arrival(2), RDV, everyone_alive), Refuse)
    supervisor_dead = lambda pid, started: pid != gone.supervisor_pid  # noqa: E731
    assert isinstance(decide(gone, arrival(2), RDV, supervisor_dead), Reclaim)


def test_a_rank_claimed_twice_leaves_the_world_whole():
    decision = decide(record(member(0, name="ps")), arrival(0, name="other"), RDV, everyone_alive)
    assert isinstance(decision, Refuse) and not decision.dooms_world


def test_a_rank_outside_the_world_is_refused():
    decision = decide(None, arrival(3), RDV, everyone_alive)
    assert isinstance(decision, Refuse) and "outside the world of 3" in decision.reason


def test_a_world_whose_members_all_left_is_reclaimed_not_joined():
    # init_rpc after shutdown(): the old world is over even if its
    # supervisor is still cleaning up.
    over = record(member(0, left=True), member(1, left=True))
    assert decide(over, arrival(0), RDV, everyone_alive) == Reclaim(over, stale=False)


def test_a_crashed_runs_record_is_reclaimed_by_its_dead_pids():
    crashed = record(member(0), member(1))
    assert decide(crashed, arrival(0), RDV, alive_only()) == Reclaim(crashed, stale=True)


def test_pid_reuse_does_not_keep_a_stale_world_alive():
    # The pid runs, but it is not the process that joined (another start time).
    crashed = record(member(0, pid=100))
    decision = decide(crashed, arrival(0, pid=300), RDV,
                      lambda pid, started: pid == 100 and started == 8)
    assert isinstance(decision, Reclaim) and decision.stale


def test_a_world_without_its_supervisor_refuses_newcomers():
    orphaned = record(member(0, pid=100))
    decision = decide(orphaned, arrival(1), RDV, alive_only(100))
    assert isinstance(decision, Refuse) and "lost its supervisor" in decision.reason


def test_a_rank_that_died_waits_for_the_old_world_to_end():
    decision = decide(record(member(0, pid=100), member(1, pid=101)), arrival(1, pid=201), RDV,
                      alive_only(50, 100, 201))
    assert isinstance(decision, Wait) and "already died" in decision.reason
    assert "rank 0 pid 100" in decision.reason  # who still runs the old world


def test_init_rpc_right_after_shutdown_waits_for_the_others_to_leave():
    ending = record(member(0, left=True), member(1))
    decision = decide(ending, arrival(0), RDV, everyone_alive)
    assert isinstance(decision, Wait) and "already left" in decision.reason
    assert decide(ending.leaving(1, 101), arrival(0), RDV, everyone_alive) == \
        Reclaim(ending.leaving(1, 101), stale=False)


def test_the_same_process_joining_twice_is_told_to_shut_down_first():
    decision = decide(record(member(0, pid=100)), arrival(0, pid=100), RDV, everyone_alive)
    assert isinstance(decision, Refuse) and "call shutdown() before init_rpc again" in decision.reason


# ------------------------------------------------------------------------ record


def test_records_round_trip_through_json():
    found = record(member(0), member(2, left=True))
    assert WorldRecord.from_json(found.to_json()) == found


def test_a_record_of_another_version_is_not_read():
    with pytest.raises(ValueError, match="version"):
        WorldRecord.from_json('{"version": 99}')
    with pytest.raises(ValueError, match="not a localrref world record"):
        WorldRecord.from_json("{")


def test_leaving_marks_only_this_process():
    found = record(member(0, pid=100), member(1, pid=101))
    assert found.leaving(0, 100).member(0).left
    assert found.leaving(0, 555) == found  # a newer process holds rank 0 now
    assert not found.finished(everyone_alive)
    assert found.leaving(0, 100).leaving(1, 101).finished(everyone_alive)
    assert found.leaving(0, 100).finished(alive_only(50, 100))  # rank 1 died


# ------------------------------------------------------------------------ roster


def joined_roster(n):
    roster = Roster(n)
    for rank in range(n):
        assert roster.joined(Joined(rank=rank, pid=100 + rank, started=1))
    return roster


def test_roster_a_member_that_left_gracefully_is_no_death():
    roster = joined_roster(3)
    verdict = roster.leaving(Leaving(rank=0, graceful=True))
    assert not verdict.death and verdict.exitcode == 0
    assert roster.exited(0) is None  # its process ending later changes nothing
    assert roster.live() == [1, 2] and not roster.done


def test_roster_leaving_without_graceful_shutdown_is_a_death_at_once():
    roster = joined_roster(3)
    verdict = roster.leaving(Leaving(rank=1, graceful=False))
    assert verdict.death and verdict.exitcode is None
    assert roster.live() == [0, 2]  # a leaver gets no more notices
    assert roster.exited(1) is None  # told once, not again at its exit


def test_roster_vanishing_is_a_death_and_the_world_ends_when_all_departed():
    roster = joined_roster(2)
    death = roster.exited(1)
    assert death.death and death.exitcode is None
    assert roster.leaving(Leaving(rank=1, graceful=True)) is None  # too late
    assert not roster.done
    roster.leaving(Leaving(rank=0, graceful=True))
    assert roster.done  # its process may live on: the world is over


def test_roster_refuses_a_second_member_for_a_rank():
    roster = Roster(2)
    assert roster.joined(Joined(rank=0, pid=100, started=1))
    assert not roster.joined(Joined(rank=0, pid=200, started=1))
    assert roster.joined(Joined(rank=0, pid=100, started=1))  # a repeat is harmless
    assert not roster.joined(Joined(rank=5, pid=300, started=1))
    assert roster.pids == {0: 100}


def test_roster_is_not_done_before_anyone_joined():
    assert not Roster(2).done
