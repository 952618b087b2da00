"""Protocol messages: one immutable record per torch ``MessageType``.

Rules:

* A message that exists is well formed: every constructor checks its fields
  (``__post_init__``), so handlers never re-validate.
* Payloads are opaque. The core never looks inside ``payload``; it only reads
  the ``rrefs`` table, the RRefs the sender forked while serialising the
  payload (the RRef analogue of torch's tensor table). That table is what lets
  the receiving core run ``getOrCreateRRef`` and ``notifyOwnerAndParentOfFork``
  for every RRef in a call, a return value or a fetched value, and hold a user
  function until those RRefs are confirmed.
* Every message carries the ``request_id`` chosen by the requester; replies
  (``PYTHON_RET``, ``REMOTE_RET``, ``PYTHON_RREF_FETCH_RET``, ``RREF_ACK``,
  ``EXCEPTION``) echo it.
* ``MessageType`` values are torch's names, so fault configurations read the
  same in both projects (torch's faulty agent keys its knobs by these names).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import ClassVar, Union

from .ids import GloballyUniqueId
from .rref import RRefForkData

__all__ = [
    "MessageType", "PythonCall", "PythonRet", "PythonRemoteCall", "RemoteRet",
    "PythonRRefFetchCall", "PythonRRefFetchRet", "RRefForkRequest", "RRefChildAccept",
    "RRefUserDelete", "RRefAck", "ExceptionMessage", "Message", "REQUEST_TYPES",
    "RETRYABLE_TYPES", "RESPONSE_TYPES", "USER_LEVEL_TYPES", "DUPLICABLE_TYPES",
]


# str first: its C hash, not Enum's Python-level __hash__, is what sets and
# dicts keyed by message types (the faults, USER_LEVEL_TYPES) pay per message.
class MessageType(str, enum.Enum):
    PYTHON_CALL = "PYTHON_CALL"
    PYTHON_RET = "PYTHON_RET"
    PYTHON_REMOTE_CALL = "PYTHON_REMOTE_CALL"
    REMOTE_RET = "REMOTE_RET"
    PYTHON_RREF_FETCH_CALL = "PYTHON_RREF_FETCH_CALL"
    PYTHON_RREF_FETCH_RET = "PYTHON_RREF_FETCH_RET"
    RREF_FORK_REQUEST = "RREF_FORK_REQUEST"
    RREF_CHILD_ACCEPT = "RREF_CHILD_ACCEPT"
    RREF_USER_DELETE = "RREF_USER_DELETE"
    RREF_ACK = "RREF_ACK"
    EXCEPTION = "EXCEPTION"


def _check_request_id(value: object) -> None:
    if type(value) is not int or value < 0:  # exact type: bools are not ids
        raise ValueError(f"request_id must be an int >= 0, got {value!r}")


def _check_gid(name: str, value: object) -> None:
    if not isinstance(value, GloballyUniqueId):
        raise TypeError(f"{name} must be a GloballyUniqueId, got {type(value).__name__}")


def _check_rrefs(value: object) -> None:
    if type(value) is not tuple or (value and not all(type(v) is RRefForkData for v in value)):
        raise TypeError(f"rrefs must be a tuple of RRefForkData, got {value!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class PythonCall:
    """``rpc_sync`` / ``rpc_async``: run ``payload`` on the receiver, reply PYTHON_RET."""

    type: ClassVar[MessageType] = MessageType.PYTHON_CALL
    request_id: int
    payload: object
    rrefs: tuple[RRefForkData, ...] = ()

    def __post_init__(self) -> None:
        _check_request_id(self.request_id)
        _check_rrefs(self.rrefs)


@dataclass(frozen=True, slots=True, kw_only=True)
class PythonRet:
    type: ClassVar[MessageType] = MessageType.PYTHON_RET
    request_id: int
    payload: object
    rrefs: tuple[RRefForkData, ...] = ()

    def __post_init__(self) -> None:
        _check_request_id(self.request_id)
        _check_rrefs(self.rrefs)


@dataclass(frozen=True, slots=True, kw_only=True)
class PythonRemoteCall:
    """``remote()``: run ``payload`` and keep its result in OwnerRRef ``rref_id``.

    ``fork_id == rref_id`` if and only if the caller is the owner (a remote to
    self); the callee must then not register a fork (seed: assignOwnerRRef).
    """

    type: ClassVar[MessageType] = MessageType.PYTHON_REMOTE_CALL
    request_id: int
    payload: object
    rref_id: GloballyUniqueId
    fork_id: GloballyUniqueId
    type_name: str = "PyObject"
    rrefs: tuple[RRefForkData, ...] = ()

    def __post_init__(self) -> None:
        _check_request_id(self.request_id)
        _check_gid("rref_id", self.rref_id)
        _check_gid("fork_id", self.fork_id)
        _check_rrefs(self.rrefs)
        if not isinstance(self.type_name, str) or not self.type_name:
            raise ValueError(f"type_name must be a non-empty str, got {self.type_name!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class RemoteRet:
    """The owner created ``rref_id`` (and registered ``fork_id``).

    ``error`` is localrref's addition: torch only reports a failed user
    function when the RRef is fetched; carrying it here lets every later use
    of the user RRef fail at once (pytorch/pytorch#39411).
    """

    type: ClassVar[MessageType] = MessageType.REMOTE_RET
    request_id: int
    rref_id: GloballyUniqueId
    fork_id: GloballyUniqueId
    error: object = None

    def __post_init__(self) -> None:
        _check_request_id(self.request_id)
        _check_gid("rref_id", self.rref_id)
        _check_gid("fork_id", self.fork_id)


@dataclass(frozen=True, slots=True, kw_only=True)
class PythonRRefFetchCall:
    """``to_here()`` on a user: ask the owner for the value of ``rref_id``.

    ``payload``: opaque to the protocol, handed to the owner's FETCH job as
    is (the driver's distributed autograd context rides there).
    """

    type: ClassVar[MessageType] = MessageType.PYTHON_RREF_FETCH_CALL
    request_id: int
    rref_id: GloballyUniqueId
    payload: object = None

    def __post_init__(self) -> None:
        _check_request_id(self.request_id)
        _check_gid("rref_id", self.rref_id)


@dataclass(frozen=True, slots=True, kw_only=True)
class PythonRRefFetchRet:
    type: ClassVar[MessageType] = MessageType.PYTHON_RREF_FETCH_RET
    request_id: int
    payload: object
    rrefs: tuple[RRefForkData, ...] = ()

    def __post_init__(self) -> None:
        _check_request_id(self.request_id)
        _check_rrefs(self.rrefs)


@dataclass(frozen=True, slots=True, kw_only=True)
class RRefForkRequest:
    """A user that received a fork from another user tells the owner about it."""

    type: ClassVar[MessageType] = MessageType.RREF_FORK_REQUEST
    request_id: int
    rref_id: GloballyUniqueId
    fork_id: GloballyUniqueId

    def __post_init__(self) -> None:
        _check_request_id(self.request_id)
        _check_gid("rref_id", self.rref_id)
        _check_gid("fork_id", self.fork_id)


@dataclass(frozen=True, slots=True, kw_only=True)
class RRefChildAccept:
    """The child fork ``fork_id`` is known to the owner: the parent may let go."""

    type: ClassVar[MessageType] = MessageType.RREF_CHILD_ACCEPT
    request_id: int
    fork_id: GloballyUniqueId

    def __post_init__(self) -> None:
        _check_request_id(self.request_id)
        _check_gid("fork_id", self.fork_id)


@dataclass(frozen=True, slots=True, kw_only=True)
class RRefUserDelete:
    """The user fork ``fork_id`` of ``rref_id`` is gone (seed: delUser)."""

    type: ClassVar[MessageType] = MessageType.RREF_USER_DELETE
    request_id: int
    rref_id: GloballyUniqueId
    fork_id: GloballyUniqueId

    def __post_init__(self) -> None:
        _check_request_id(self.request_id)
        _check_gid("rref_id", self.rref_id)
        _check_gid("fork_id", self.fork_id)


@dataclass(frozen=True, slots=True, kw_only=True)
class RRefAck:
    type: ClassVar[MessageType] = MessageType.RREF_ACK
    request_id: int

    def __post_init__(self) -> None:
        _check_request_id(self.request_id)


@dataclass(frozen=True, slots=True, kw_only=True)
class ExceptionMessage:
    """The request failed on the receiver; ``payload`` describes the error (opaque)."""

    type: ClassVar[MessageType] = MessageType.EXCEPTION
    request_id: int
    payload: object

    def __post_init__(self) -> None:
        _check_request_id(self.request_id)


Message = Union[
    PythonCall, PythonRet, PythonRemoteCall, RemoteRet, PythonRRefFetchCall,
    PythonRRefFetchRet, RRefForkRequest, RRefChildAccept, RRefUserDelete, RRefAck,
    ExceptionMessage,
]

REQUEST_TYPES = frozenset({
    MessageType.PYTHON_CALL, MessageType.PYTHON_REMOTE_CALL, MessageType.PYTHON_RREF_FETCH_CALL,
    MessageType.RREF_FORK_REQUEST, MessageType.RREF_CHILD_ACCEPT, MessageType.RREF_USER_DELETE,
})
RESPONSE_TYPES = frozenset(MessageType) - REQUEST_TYPES

# The application's calls and their replies, as opposed to the RRef
# protocol's own control messages: what graceful shutdown waits to see
# drained, counting them sent and received (launch/control.py).
USER_LEVEL_TYPES = frozenset({
    MessageType.PYTHON_CALL, MessageType.PYTHON_RET, MessageType.PYTHON_REMOTE_CALL,
    MessageType.REMOTE_RET, MessageType.PYTHON_RREF_FETCH_CALL,
    MessageType.PYTHON_RREF_FETCH_RET, MessageType.EXCEPTION,
})

# torch's faulty_rpc_agent_test_fixture.retryable_message_types, less the
# autograd one: the messages sent with sendWithRetries, whose handlers are
# idempotent, and therefore the only ones a transport may deliver twice.
RETRYABLE_TYPES = frozenset({
    MessageType.RREF_FORK_REQUEST, MessageType.RREF_CHILD_ACCEPT, MessageType.RREF_USER_DELETE,
})


# What a transport may deliver twice: the messages whose handlers ignore a
# second copy. RREF_FORK_REQUEST is missing on purpose: a copy that arrives
# after its user's RREF_USER_DELETE re-registers a dead fork (a limit of the
# seed's protocol, shown by tests/sim/test_known_limits.py). A call or a
# reply is never delivered twice, as torch's transport never does.
DUPLICABLE_TYPES = frozenset({
    MessageType.RREF_CHILD_ACCEPT, MessageType.RREF_USER_DELETE, MessageType.RREF_ACK,
    MessageType.REMOTE_RET,
})
