"""Messages are immutable and well formed on construction."""

import dataclasses

import pytest

from localrref.core.ids import GloballyUniqueId, IdGenerator
from localrref.core.messages import (
    ExceptionMessage, MessageType, PythonCall, PythonRemoteCall, PythonRet, PythonRRefFetchCall,
    PythonRRefFetchRet, REQUEST_TYPES, RETRYABLE_TYPES, RemoteRet, RRefAck, RRefChildAccept,
    RRefForkRequest, RRefUserDelete,
)
from localrref.core.rref import RRefForkData

G = GloballyUniqueId


def test_message_type_values_are_torchs_names():
    assert {t.value for t in MessageType} == {
        "PYTHON_CALL", "PYTHON_RET", "PYTHON_REMOTE_CALL", "REMOTE_RET",
        "PYTHON_RREF_FETCH_CALL", "PYTHON_RREF_FETCH_RET", "RREF_FORK_REQUEST",
        "RREF_CHILD_ACCEPT", "RREF_USER_DELETE", "RREF_ACK", "EXCEPTION"}
    assert {t.value for t in RETRYABLE_TYPES} == {
        "RREF_FORK_REQUEST", "RREF_CHILD_ACCEPT", "RREF_USER_DELETE"}
    assert RETRYABLE_TYPES <= REQUEST_TYPES


ALL = [
    PythonCall(request_id=1, payload=b"x"),
    PythonRet(request_id=1, payload=b"y"),
    PythonRemoteCall(request_id=1, payload=b"x", rref_id=G(0, 1), fork_id=G(0, 2)),
    RemoteRet(request_id=1, rref_id=G(0, 1), fork_id=G(0, 2)),
    PythonRRefFetchCall(request_id=1, rref_id=G(0, 1)),
    PythonRRefFetchRet(request_id=1, payload=b"v"),
    RRefForkRequest(request_id=1, rref_id=G(0, 1), fork_id=G(2, 3)),
    RRefChildAccept(request_id=1, fork_id=G(2, 3)),
    RRefUserDelete(request_id=1, rref_id=G(0, 1), fork_id=G(2, 3)),
    RRefAck(request_id=1),
    ExceptionMessage(request_id=1, payload="boom"),
]


@pytest.mark.parametrize("message", ALL, ids=lambda m: m.type.value)
def test_messages_are_frozen(message):
    with pytest.raises(dataclasses.FrozenInstanceError):
        message.request_id = 2


def test_every_message_type_has_a_record():
    assert {m.type for m in ALL} == set(MessageType)


@pytest.mark.parametrize("bad", [-1, 1.5, "3", True])
def test_request_id_is_checked(bad):
    with pytest.raises(ValueError, match="request_id must be an int >= 0"):
        RRefAck(request_id=bad)


def test_ids_and_rrefs_tables_are_checked():
    with pytest.raises(TypeError, match="rref_id must be a GloballyUniqueId"):
        RRefForkRequest(request_id=1, rref_id=(0, 1), fork_id=G(0, 2))
    with pytest.raises(TypeError, match="rrefs must be a tuple of RRefForkData"):
        PythonCall(request_id=1, payload=None, rrefs=[1])
    with pytest.raises(ValueError, match="type_name"):
        PythonRemoteCall(request_id=1, payload=None, rref_id=G(0, 1), fork_id=G(0, 2),
                         type_name="")
    with pytest.raises(ValueError, match="owner must be a worker id"):
        RRefForkData(owner=-1, rref_id=G(0, 1), fork_id=G(0, 2), parent=0)


def test_globally_unique_id_prints_like_torch_and_generates_in_order():
    gen = IdGenerator(3)
    assert [gen.next(), gen.next()] == [G(3, 0), G(3, 1)]
    assert str(G(3, 1)) == "GloballyUniqueId(created_on=3, local_id=1)"
    with pytest.raises(ValueError):
        G(-1, 0)
    with pytest.raises(ValueError):
        IdGenerator(-2)
