"""Frames: every protocol message survives the wire exactly; bad frames are named."""

import dataclasses
import pickle
import typing

import pytest
import torch

from localrref import control_messages as cm
from localrref.codec import frames
from localrref.codec.pickler import dumps, loads
from localrref.core import dist_autograd as da
from localrref.core import messages as m
from localrref.core.ids import GloballyUniqueId as G
from localrref.core.rref import RRefForkData
from localrref.transport import wire

FORK = RRefForkData(owner=1, rref_id=G(1, 7), fork_id=G(2, 9), parent=2, type_name="Tensor")
OTHER = RRefForkData(owner=0, rref_id=G(0, 1), fork_id=G(0, 1), parent=0)

EVERY_MESSAGE = [
    m.PythonCall(request_id=0, payload=b"call"),
    m.PythonCall(request_id=3, payload=b"call", rrefs=(FORK, OTHER)),
    m.PythonRet(request_id=4, payload=b"ret", rrefs=(FORK,)),
    m.PythonRemoteCall(request_id=5, payload=b"r", rref_id=G(0, 2), fork_id=G(0, 3),
                       type_name="Tensor", rrefs=(OTHER,)),
    m.RemoteRet(request_id=6, rref_id=G(0, 2), fork_id=G(0, 3)),
    m.RemoteRet(request_id=6, rref_id=G(0, 2), fork_id=G(0, 3), error=b"pickled error"),
    m.PythonRRefFetchCall(request_id=7, rref_id=G(3, 4)),
    m.PythonRRefFetchCall(request_id=7, rref_id=G(3, 4), payload=b"\x02context header"),
    m.PythonRRefFetchRet(request_id=8, payload=b"v", rrefs=(FORK,)),
    m.RRefForkRequest(request_id=9, rref_id=G(1, 7), fork_id=G(2, 9)),
    m.RRefChildAccept(request_id=10, fork_id=G(2, 9)),
    m.RRefUserDelete(request_id=11, rref_id=G(1, 7), fork_id=G(2, 9)),
    m.RRefAck(request_id=2 ** 40),
    m.ExceptionMessage(request_id=12, payload=b"exc"),
]


def test_every_message_type_is_covered():
    assert {type(msg) for msg in EVERY_MESSAGE} == set(frames._MESSAGE_CLASSES)
    assert {cls.type for cls in frames._MESSAGE_CLASSES} == set(m.MessageType)


@pytest.mark.parametrize("message", EVERY_MESSAGE, ids=lambda msg: msg.type.value)
def test_messages_round_trip_equal(message):
    decoded = frames.decode_message(frames.encode_message(message))
    assert decoded == message and type(decoded) is type(message)


@pytest.mark.parametrize("control", [
    cm.Hello(rank=1, name="ps", pid=42, world_size=3, serial=0),
    cm.HelloBack(rank=1, name="ps", pid=42, world_size=3, serial=0, answering=2),
    cm.PeerExited(rank=2, pid=7, exitcode=-9), cm.ShutdownArrived(rank=0),
    cm.ShutdownDrained(rank=0, sent=3, received=4),
    cm.ShutdownDone(rank=1, leaks=({"rref_id": "0:1"},)), cm.ShutdownFinished(rank=1),
    cm.ShutdownProceed(), cm.ShutdownAgain(), cm.ShutdownFailed(reason="rank 2 died"),
    cm.LeakReport(rank=0, leaks=()),
], ids=lambda c: type(c).__name__)
def test_control_records_round_trip_as_control_frames(control):
    frame = wire.encode_control(control)
    assert frame[:1] == wire.CONTROL_TAG != frames.MESSAGE
    assert wire.decode_control(frame) == control


def test_every_control_record_is_covered_and_checked():
    assert set(cm.CONTROL_TYPES) == set(typing.get_args(cm.Control))
    with pytest.raises(ValueError, match="rank must be an int >= 0"):
        cm.ShutdownArrived(rank=-1)
    with pytest.raises(ValueError, match="not a control frame"):
        wire.decode_control(frames.encode_message(m.RRefAck(request_id=1)))


@pytest.mark.parametrize("body, fragment", [
    ((99, 1), "not a message"),
    (("PYTHON_CALL", 1), "not a message"),
    ((0, 1, b"x"), "has 3 fields, this frame 2"),
])
def test_malformed_message_frames_are_named(body, fragment):
    with pytest.raises(ValueError, match=fragment):
        frames.decode_message(frames.MESSAGE + pickle.dumps(body))


def test_a_decoded_message_is_checked_like_a_constructed_one():
    with pytest.raises(ValueError, match="request_id must be an int >= 0"):
        frames.decode_message(frames.MESSAGE + pickle.dumps((0, -1, b"x", ())))


def test_unknown_tags_are_named():
    with pytest.raises(ValueError, match="not a message frame \\(tag b'Z'\\)"):
        frames.decode_message(b"Z" + pickle.dumps(()))


AUTOGRAD = [
    da.PropagateGradients(context_id=(3 << 48) | 7, message_id=2, propagation_id=(1 << 48) | 9,
                          grads={0: torch.arange(6.0).reshape(2, 3), 2: torch.ones(70_000)},
                          retain_graph=True, backward_id=(3 << 48) | 1),
    da.PropagateDone(propagation_id=5, error="ValueError: boom"),
    da.PropagateDone(propagation_id=6),
    da.CleanupContext(context_id=(2 << 48) | 1),
]


@pytest.mark.parametrize("message", AUTOGRAD, ids=lambda m: type(m).__name__)
def test_autograd_messages_round_trip_through_the_pickler(message):
    data = dumps(frames.flatten_autograd(message)).data
    back = frames.unflatten_autograd(loads(data)[0])
    assert type(back) is type(message)
    for field in dataclasses.fields(message):
        mine, theirs = getattr(back, field.name), getattr(message, field.name)
        if field.name == "grads":
            assert mine.keys() == theirs.keys()
            assert all(torch.equal(mine[k], theirs[k]) for k in theirs)
        else:
            assert mine == theirs


def test_autograd_messages_without_tensors_take_the_plain_path():
    data = dumps(frames.flatten_autograd(da.PropagateDone(propagation_id=5))).data
    assert data[:1] == b"\x01"  # the pickler's plain-pickle prefix: no Pickler subclass


@pytest.mark.parametrize("flat", [(), (99, 1), ("x",), (1, 2, 3, 4), [1, 2], None])
def test_malformed_autograd_messages_are_refused(flat):
    with pytest.raises(ValueError, match="autograd message|fields"):
        frames.unflatten_autograd(flat)
