"""init_rpc's hello exchange, decided by Handshake alone (no processes)."""

import pytest

from localrref.agent.handshake import Handshake, WorkerDesc
from localrref.control_messages import HelloBack, ShutdownArrived


def agent(rank, name=None, serial=0, world_size=2):
    return Handshake(rank=rank, name=name or f"w{rank}", pid=100 + rank, world_size=world_size,
                     serial=serial)


def exchange(inboxes, agents):
    """Deliver every message, in order, until no inbox holds any; return how many went."""
    delivered = 0
    while any(inboxes.values()):
        for rank, inbox in inboxes.items():
            while inbox:
                src, message = inbox.pop(0)
                delivered += 1
                reply = agents[rank].receive(message)
                if reply is not None:
                    inboxes[src].append((rank, reply))
    return delivered


def say_hello(inboxes, agents, sender):
    for rank in inboxes:
        if rank != sender:
            inboxes[rank].append((sender, agents[sender].hello()))


def test_two_agents_meet_with_four_messages():
    agents = {0: agent(0), 1: agent(1)}
    inboxes = {0: [], 1: []}
    say_hello(inboxes, agents, 0)
    say_hello(inboxes, agents, 1)
    assert exchange(inboxes, agents) == 4  # two hellos, one answer each, nothing more
    for me in agents.values():
        assert me.complete and me.missing() == []
    assert agents[0].peers[1] == WorkerDesc("w1", 1, 101)


def test_a_hello_alone_does_not_make_a_peer_known():
    me = agent(0)
    reply = me.receive(agent(1).hello())
    assert isinstance(reply, HelloBack) and reply.answering == 0  # answers rank 1's serial 0
    assert not me.complete and me.missing() == [1]


def test_an_answer_to_a_previous_agents_hello_is_ignored():
    old, new = agent(0, serial=0), agent(0, serial=1)
    stale_answer = agent(1).receive(old.hello())
    assert new.receive(stale_answer) is None
    assert new.missing() == [1]


def test_a_stale_hello_is_answered_but_gives_no_peer():
    # The new agent reads a hello that rank 1's previous agent sent to our previous one.
    new = agent(0, "again0", serial=1)
    stale = agent(1, "first1", serial=0).hello()
    assert new.receive(stale).answering == 0  # an answer the peer's next agent will ignore
    assert new.peers == {0: WorkerDesc("again0", 0, 100)}


def test_a_restart_whose_hello_the_old_agent_dropped_still_completes():
    old0 = agent(0, "first0", serial=0)
    old1 = agent(1, "first1", serial=0)
    inboxes = {0: [], 1: []}
    say_hello(inboxes, {0: old0, 1: old1}, 0)
    say_hello(inboxes, {0: old0, 1: old1}, 1)
    exchange(inboxes, {0: old0, 1: old1})
    # Rank 1 restarts first; rank 0's old agent, which knows every peer, drops its hello.
    new1 = agent(1, "again1", serial=1)
    assert old0.complete and old0.receive(new1.hello()) is None
    new0 = agent(0, "again0", serial=1)
    agents = {0: new0, 1: new1}
    say_hello(inboxes, agents, 0)
    exchange(inboxes, agents)
    assert new0.peers[1].name == "again1" and new1.peers[0].name == "again0"


def test_each_peer_agent_is_answered_once():
    me, peer = agent(0), agent(1)
    assert me.receive(peer.hello()) is not None
    assert me.receive(peer.hello()) is None  # a duplicate hello
    answer = me.receive(peer.receive(me.hello()))  # its answer to ours
    assert answer is None and me.complete


def test_a_world_size_mismatch_is_recorded_and_not_answered():
    me = agent(0)
    assert me.receive(agent(1, world_size=3).hello()) is None
    assert "world size mismatch: rank 1 ('w1')" in me.mismatches[1]
    assert not me.complete


def test_a_complete_agent_ignores_the_exchange():
    agents = {0: agent(0), 1: agent(1)}
    inboxes = {0: [], 1: []}
    say_hello(inboxes, agents, 0)
    exchange(inboxes, agents)
    assert agents[0].complete
    assert agents[0].receive(agent(1, "next1", serial=5).hello()) is None
    assert agents[0].peers[1].name == "w1"


def test_anything_else_is_refused():
    with pytest.raises(TypeError, match="not a handshake message"):
        agent(0).receive(ShutdownArrived(rank=1))
