"""Fault injection: the plan (pure) and the transport that carries it out, without processes."""

from __future__ import annotations

import threading

import pytest

from localrref.agent.faults import (ENV, FaultPlan, FaultSpec, FaultyTransport, Fate,
                                    InjectedFault, ScriptSends, spec_for)
from localrref.codec import frames
from localrref.core import messages as m
from localrref.core.ids import GloballyUniqueId as G
from localrref.core.rref import UserRRef
from localrref.options import FaultyRpcBackendOptions, RpcBackendOptions
from localrref.transport import wire


def frame(kind: str, request_id: int = 1) -> bytes:
    message = {
        "PYTHON_CALL": lambda: m.PythonCall(request_id=request_id, payload=b"x"),
        "PYTHON_RET": lambda: m.PythonRet(request_id=request_id, payload=b"x"),
        "RREF_ACK": lambda: m.RRefAck(request_id=request_id),
        "RREF_FORK_REQUEST": lambda: m.RRefForkRequest(request_id=request_id, rref_id=G(0, 1),
                                                       fork_id=G(1, 2)),
    }[kind]()
    return frames.encode_message(message)


class FakeEndpoint:
    def __init__(self) -> None:
        self.sent: list[tuple[int, bytes]] = []
        self.changed = threading.Condition()
        self.closed = False

    def send(self, dst, data) -> None:
        with self.changed:
            self.sent.append((dst, data))
            self.changed.notify_all()

    def wait_for(self, count: int, bound: float = 10.0) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: len(self.sent) >= count, bound)

    def close(self) -> None:
        self.closed = True

    def nudge(self) -> bool:
        return True


# -- the spec and the plan ---------------------------------------------------------

def test_the_environment_switch_reads_every_key():
    spec = FaultSpec.parse("num_fail_sends=2; fail=RREF_FORK_REQUEST,RREF_USER_DELETE;"
                           "delay=PYTHON_CALL:0.01,REMOTE_RET:0.5; duplicate=RREF_ACK;"
                           "reorder=PYTHON_RET; probability=0.25; seed=7")
    assert spec == FaultSpec(num_fail_sends=2,
                             messages_to_fail=("RREF_FORK_REQUEST", "RREF_USER_DELETE"),
                             messages_to_delay={"PYTHON_CALL": 0.01, "REMOTE_RET": 0.5},
                             messages_to_duplicate=("RREF_ACK",),
                             messages_to_reorder=("PYTHON_RET",), probability=0.25, seed=7)


@pytest.mark.parametrize("text, fragment", [
    ("fail=NOT_A_TYPE", "unknown message type(s) NOT_A_TYPE"),
    ("colour=blue", "unknown key 'colour'"),
    ("num_fail_sends=two", "cannot read 'num_fail_sends=two'"),
    ("probability=2", "probability must be within [0, 1]"),
    ("delay=PYTHON_CALL:-1", "delays must be >= 0"),
    ("duplicate=PYTHON_CALL,RREF_ACK", "PYTHON_CALL cannot be duplicated"),
    ("kill=PYTHON_CALL", "cannot kill on 'PYTHON_CALL': write send:TYPE, recv:TYPE or copy"),
    ("kill=recv:Bogus", "or a control record (ArrivalRefused, Hello, HelloBack"),
    # torch's SCRIPT_* names pick faults, but no frame carries one to kill on
    ("kill=send:SCRIPT_CALL", "cannot kill on 'send:SCRIPT_CALL'"),
    ("duplicate=SCRIPT_CALL", "SCRIPT_CALL cannot be duplicated"),
    ("kill=copy;kill_after=0", "kill_after must be >= 1"),
])
def test_bad_specs_are_refused_naming_the_problem(text, fragment):
    with pytest.raises(ValueError) as info:
        FaultSpec.parse(text)
    assert fragment in str(info.value)


def test_options_win_over_the_environment_and_nothing_asked_is_nothing():
    env = {ENV: "duplicate=RREF_ACK"}
    assert spec_for(RpcBackendOptions(), {}) is None
    assert spec_for(RpcBackendOptions(), env).messages_to_duplicate == ("RREF_ACK",)
    faulty = FaultyRpcBackendOptions(num_fail_sends=1)
    assert spec_for(faulty, env).messages_to_fail == (
        "RREF_FORK_REQUEST", "RREF_CHILD_ACCEPT", "RREF_USER_DELETE")  # torch's retryable ones
    assert spec_for(FaultyRpcBackendOptions(), env) is None  # 0 failed sends: nothing to do


def test_the_first_n_sends_of_each_type_fail_then_all_go():
    plan = FaultPlan(FaultSpec(num_fail_sends=2, messages_to_fail=("RREF_ACK", "PYTHON_CALL")), 0)
    fates = [plan.fate(kind) for kind in ("RREF_ACK", "PYTHON_CALL", "RREF_ACK", "RREF_ACK",
                                          "PYTHON_CALL", "PYTHON_CALL", "PYTHON_RET")]
    assert [f.fail for f in fates] == [True, True, True, False, True, False, False]


def test_draws_are_seeded_by_seed_and_rank():
    spec = FaultSpec(messages_to_duplicate=("RREF_ACK",), probability=0.5, seed=3)

    def draws(rank):
        plan = FaultPlan(spec, rank)
        return [plan.fate("RREF_ACK").copies for _ in range(64)]

    assert draws(1) == draws(1) and draws(1) != draws(2)
    assert {1, 2} == set(draws(1))
    assert FaultPlan(FaultSpec(messages_to_duplicate=("RREF_ACK",), probability=0.0), 0) \
        .fate("RREF_ACK") == Fate()


def test_a_kill_point_fires_once_at_its_nth_passage():
    spec = FaultSpec.parse("kill=recv:ShutdownProceed; kill_after=2")
    assert spec.kill_on == "recv:ShutdownProceed" and spec.kill_after == 2 and spec.active
    plan = FaultPlan(spec, 0)
    seen = [plan.kills(point) for point in ("recv:ShutdownProceed", "send:ShutdownProceed",
                                            "recv:ShutdownProceed", "recv:ShutdownProceed")]
    assert seen == [False, False, True, False]
    options = FaultyRpcBackendOptions(kill_on="copy")
    assert spec_for(options, {}).kill_on == "copy"


# -- the transport -----------------------------------------------------------------

def test_a_failed_send_raises_and_sends_nothing():
    endpoint = FakeEndpoint()
    faulty = FaultyTransport(endpoint, FaultPlan(
        FaultSpec(num_fail_sends=1, messages_to_fail=("RREF_ACK",)), 0))
    with pytest.raises(InjectedFault, match="send of RREF_ACK to rank 1 failed on purpose"):
        faulty.send(1, frame("RREF_ACK"))
    faulty.send(1, frame("RREF_ACK"))
    assert endpoint.sent == [(1, frame("RREF_ACK"))]


def test_control_frames_and_other_tags_pass_untouched():
    endpoint = FakeEndpoint()
    faulty = FaultyTransport(endpoint, FaultPlan(
        FaultSpec(num_fail_sends=5, messages_to_fail=("RREF_ACK",)), 0))
    faulty.send(2, wire.CONTROL_TAG + b"x")
    faulty.send(2, wire.AUTOGRAD_TAG + b"y")
    assert [data for _, data in endpoint.sent] == [wire.CONTROL_TAG + b"x", wire.AUTOGRAD_TAG + b"y"]
    assert faulty.nudge() is True  # the rest is the endpoint's


def test_a_duplicate_is_sent_twice_and_counted():
    endpoint, copies = FakeEndpoint(), []
    faulty = FaultyTransport(endpoint, FaultPlan(FaultSpec(messages_to_duplicate=("RREF_ACK",)),
                                                 0), on_copy=copies.append)
    faulty.send(1, frame("RREF_ACK"))
    assert endpoint.sent == [(1, frame("RREF_ACK"))] * 2
    assert [c.type.value for c in copies] == ["RREF_ACK"]


def test_a_reordered_frame_goes_right_after_the_next_one_to_its_peer():
    endpoint = FakeEndpoint()
    faulty = FaultyTransport(endpoint, FaultPlan(FaultSpec(messages_to_reorder=("PYTHON_CALL",)),
                                                 0))
    try:
        faulty.send(1, frame("PYTHON_CALL", 1))
        faulty.send(2, frame("RREF_ACK", 9))      # another peer: does not release it
        faulty.send(1, frame("RREF_ACK", 2))
        assert endpoint.sent == [(2, frame("RREF_ACK", 9)), (1, frame("RREF_ACK", 2)),
                                 (1, frame("PYTHON_CALL", 1))]
        faulty.send(1, frame("PYTHON_CALL", 3))    # nothing follows: it goes on its own
        assert endpoint.wait_for(4)
        assert endpoint.sent[3] == (1, frame("PYTHON_CALL", 3))
    finally:
        faulty.close()
    assert endpoint.closed


def test_a_delayed_frame_is_overtaken_and_close_drops_what_waits():
    endpoint = FakeEndpoint()
    faulty = FaultyTransport(endpoint, FaultPlan(
        FaultSpec(messages_to_delay={"PYTHON_CALL": 0.02, "RREF_ACK": 3600.0}), 0))
    faulty.send(1, frame("PYTHON_CALL", 1))
    faulty.send(1, frame("RREF_ACK", 2))  # an hour: still waiting when closed
    faulty.send(1, frame("PYTHON_RET", 3))
    assert endpoint.wait_for(2)
    assert endpoint.sent == [(1, frame("PYTHON_RET", 3)), (1, frame("PYTHON_CALL", 1))]
    faulty.close()
    assert len(endpoint.sent) == 2 and endpoint.closed
    assert not any(t.name == "localrref-faults" for t in threading.enumerate())


def test_torchs_faulty_agent_options_become_localrrefs():
    # torch's FaultyTensorPipeRpcBackendOptions (torch.distributed.rpc._testing),
    # as torch's faulty test fixture makes them.
    from torch.distributed.rpc._testing import FaultyTensorPipeRpcBackendOptions

    from localrref.options import from_torch_faulty
    torchs = FaultyTensorPipeRpcBackendOptions(
        num_worker_threads=8, rpc_timeout=20, init_method="tcp://127.0.0.1:1", num_fail_sends=3,
        messages_to_fail=["RREF_FORK_REQUEST", "RREF_CHILD_ACCEPT", "RREF_USER_DELETE",
                          "CLEANUP_AUTOGRAD_CONTEXT_REQ"],
        messages_to_delay={"PYTHON_CALL": 1.5, "SCRIPT_CALL": 1.5})
    ours, dropped = from_torch_faulty(torchs)
    assert type(ours) is FaultyRpcBackendOptions
    assert (ours.num_fail_sends, ours.rpc_timeout, ours.num_worker_threads, ours.init_method) == (
        3, 20, 8, "tcp://127.0.0.1:1")
    assert ours.messages_to_fail == ["RREF_FORK_REQUEST", "RREF_CHILD_ACCEPT", "RREF_USER_DELETE"]
    assert ours.messages_to_delay == {"PYTHON_CALL": 1.5, "SCRIPT_CALL": 1.5}
    assert dropped == ("CLEANUP_AUTOGRAD_CONTEXT_REQ",)
    assert spec_for(ours, {}).messages_to_delay == {"PYTHON_CALL": 1.5, "SCRIPT_CALL": 1.5}
    assert from_torch_faulty(RpcBackendOptions()) is None


def test_calls_of_builtins_and_torchscript_meet_torchs_script_faults():
    # torch sends them as SCRIPT_CALL / SCRIPT_REMOTE_CALL, and the fetch of
    # an RRef such a remote() made as SCRIPT_RREF_FETCH_CALL; localrref's
    # PYTHON_* messages meet faults under those names once noted.
    import torch

    @torch.jit.script
    def scripted(x):
        return x + 1

    script = ScriptSends()
    assert script.is_script(torch.add) and script.is_script(scripted)
    assert not script.is_script(print) and not script.is_script(lambda x: x)
    script.note_request(5)
    made, other = (UserRRef(1, G(0, 1), G(0, 2), "PyObject"),
                   UserRRef(1, G(0, 3), G(0, 4), "PyObject"))
    script.note_rref(made)
    assert script.made_by_script(made) and not script.made_by_script(other)
    call = m.PythonCall(request_id=5, payload=b"")
    assert script.kind(call) == "SCRIPT_CALL"
    assert script.kind(call) == "PYTHON_CALL"  # noted once, for its one send
    assert script.kind(m.PythonCall(request_id=6, payload=b"")) == "PYTHON_CALL"

    endpoint = FakeEndpoint()
    plan = FaultPlan(FaultSpec(num_fail_sends=1, messages_to_fail=("SCRIPT_CALL",)), rank=0)
    faulty = FaultyTransport(endpoint, plan, classify=script.kind)
    script.note_request(7)
    with pytest.raises(InjectedFault, match="SCRIPT_CALL"):
        faulty.send(1, frames.encode_message(m.PythonCall(request_id=7, payload=b"")))
    faulty.send(1, frames.encode_message(m.PythonCall(request_id=8, payload=b"")))
    assert len(endpoint.sent) == 1
    faulty.close()
