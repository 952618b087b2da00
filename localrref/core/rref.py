"""The protocol's view of an RRef: fork data, OwnerRRef and UserRRef records.

These are bookkeeping records, not the objects applications hold. The
runtime wraps them in the public ``localrref.RRef``; the simulator holds them
directly. Who may change what:

* ``OwnerRRef.value`` / ``error`` are set once, by the owner's core when the
  creating call finishes (seed: ``OwnerRRef::setValue`` / ``setError``).
* ``UserRRef.holds`` counts the references that keep a user alive: the
  application's handles, the ``pending_users`` entry, and one per entry in
  ``pending_children`` naming it as parent. It stands for the seed's
  ``intrusive_ptr`` count: when it drops to zero the core runs ``tryDel``,
  which sends ``RREF_USER_DELETE`` once.
"""

from __future__ import annotations

from dataclasses import dataclass

from .ids import GloballyUniqueId

__all__ = ["RRefForkData", "OwnerRRef", "UserRRef", "PyObjectType", "TensorType"]

# Type names play the role of the seed's TypePtr. Python RPC only ever uses
# these two; the type check in getOrCreateOwnerRRef compares them.
PyObjectType = "PyObject"
TensorType = "Tensor"

_UNSET = object()


@dataclass(frozen=True, slots=True, kw_only=True)
class RRefForkData:
    """What a serialised RRef carries across the wire (seed: ``RRefForkData``)."""

    owner: int
    rref_id: GloballyUniqueId
    fork_id: GloballyUniqueId
    parent: int
    type_name: str = PyObjectType

    def __post_init__(self) -> None:
        for name in ("owner", "parent"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a worker id >= 0, got {value!r}")
        for name in ("rref_id", "fork_id"):
            if not isinstance(getattr(self, name), GloballyUniqueId):
                raise TypeError(f"{name} must be a GloballyUniqueId")


class RRefRecord:
    """Fields common to owners and users."""

    __slots__ = ("owner", "rref_id", "type_name", "creation_error", "timed_out", "__weakref__")

    def __init__(self, owner: int, rref_id: GloballyUniqueId, type_name: str) -> None:
        self.owner = owner
        self.rref_id = rref_id
        self.type_name = type_name
        # Remembered from a failed or timed-out remote() (seed: RRef::handleError).
        self.creation_error: object = None
        self.timed_out = False

    is_owner = False

    @property
    def creation_failed(self) -> bool:
        return self.timed_out or self.creation_error is not None


class OwnerRRef(RRefRecord):
    """The owner's record. The value is opaque to the core."""

    __slots__ = ("_value", "_error", "awaiting_creation")

    is_owner = True

    def __init__(self, owner: int, rref_id: GloballyUniqueId, type_name: str) -> None:
        super().__init__(owner, rref_id, type_name)
        self._value: object = _UNSET
        self._error: object = _UNSET
        # True while this owner exists only because a fork of it arrived
        # before the PYTHON_REMOTE_CALL that creates it (see RRefContext).
        self.awaiting_creation = False

    @property
    def has_value(self) -> bool:
        """True once the value or the error is set (seed: ``OwnerRRef::hasValue``)."""
        return self._value is not _UNSET or self._error is not _UNSET

    @property
    def value(self) -> object:
        if self._value is _UNSET:
            raise LookupError(f"OwnerRRef {self.rref_id} has no value")
        return self._value

    @property
    def error(self) -> object:
        return None if self._error is _UNSET else self._error

    def set_value(self, value: object) -> None:
        if self.has_value:
            raise ValueError(f"OwnerRRef {self.rref_id} already has a value")
        self._value = value

    def set_error(self, error: object) -> None:
        if self.has_value:
            raise ValueError(f"OwnerRRef {self.rref_id} already has a value")
        self._error = error

    def __repr__(self) -> str:
        return f"OwnerRRef(rref_id={self.rref_id}, owner={self.owner})"


class UserRRef(RRefRecord):
    __slots__ = ("fork_id", "confirmed", "deleted_on_owner", "holds")

    def __init__(self, owner: int, rref_id: GloballyUniqueId, fork_id: GloballyUniqueId,
                 type_name: str) -> None:
        super().__init__(owner, rref_id, type_name)
        self.fork_id = fork_id
        # Set when the owner is known to have registered this fork.
        self.confirmed = False
        self.deleted_on_owner = False
        self.holds = 0

    def __repr__(self) -> str:
        return f"UserRRef(rref_id={self.rref_id}, fork_id={self.fork_id}, owner={self.owner})"
