"""Message frames: a protocol message as the bytes of one inbox frame.

A message frame is the tag byte ``M`` and a pickle of the protocol message
(:mod:`localrref.core.messages`) as a flat tuple ``(type code, field, field,
...)``, with ids as ``(created_on, local_id)`` pairs and fork data as plain
tuples. Its payload is already bytes, pickled by
:mod:`localrref.codec.pickler` in the sender's thread. (Control frames, tag
``C``, and the record around every frame are the transport's:
:mod:`localrref.transport.wire`.)

Why flat tuples: pickling the frozen, slotted message records themselves
costs about 2 us each way (their state goes through ``__getstate__`` and
``object.__setattr__`` field by field); a tuple of primitives pickles in a
tenth of that, and rebuilding the record through its constructor still runs
its field checks on every frame that arrives.
"""

from __future__ import annotations

import dataclasses
import pickle

from ..core import dist_autograd as _autograd
from ..core import messages as _messages
from ..core.ids import GloballyUniqueId
from ..core.rref import RRefForkData

__all__ = ["MESSAGE", "encode_message", "decode_message", "flatten_autograd",
           "unflatten_autograd"]

_PROTOCOL = pickle.HIGHEST_PROTOCOL
MESSAGE = b"M"

_PLAIN, _GID, _FORKS = 0, 1, 2
_MESSAGE_CLASSES = (
    _messages.PythonCall, _messages.PythonRet, _messages.PythonRemoteCall,
    _messages.RemoteRet, _messages.PythonRRefFetchCall, _messages.PythonRRefFetchRet,
    _messages.RRefForkRequest, _messages.RRefChildAccept, _messages.RRefUserDelete,
    _messages.RRefAck, _messages.ExceptionMessage,
)


def _field_kinds(cls) -> tuple[tuple[str, int], ...]:
    kinds = []
    for field in dataclasses.fields(cls):
        if field.name in ("rref_id", "fork_id"):
            kinds.append((field.name, _GID))
        elif field.name == "rrefs":
            kinds.append((field.name, _FORKS))
        else:
            kinds.append((field.name, _PLAIN))
    return tuple(kinds)


_ENCODERS = {cls: (code, _field_kinds(cls)) for code, cls in enumerate(_MESSAGE_CLASSES)}


def _flat_fork(fork: RRefForkData) -> tuple:
    return (fork.owner, fork.rref_id.created_on, fork.rref_id.local_id,
            fork.fork_id.created_on, fork.fork_id.local_id, fork.parent, fork.type_name)


def _fork(flat: tuple) -> RRefForkData:
    owner, rref_on, rref_local, fork_on, fork_local, parent, type_name = flat
    return RRefForkData(owner=owner, rref_id=GloballyUniqueId(rref_on, rref_local),
                        fork_id=GloballyUniqueId(fork_on, fork_local), parent=parent,
                        type_name=type_name)


def encode_message(message) -> bytes:
    code, kinds = _ENCODERS[type(message)]
    flat = [code]
    for name, kind in kinds:
        value = getattr(message, name)
        if kind == _PLAIN:
            flat.append(value)
        elif kind == _GID:
            flat.append((value.created_on, value.local_id))
        else:
            flat.append(tuple(map(_flat_fork, value)) if value else ())
    return MESSAGE + pickle.dumps(tuple(flat), protocol=_PROTOCOL)


def _decoder(cls) -> tuple:
    kinds = _field_kinds(cls)
    names = tuple(name for name, _ in kinds)
    gids = tuple(i for i, (_, kind) in enumerate(kinds) if kind == _GID)
    forks = next((i for i, (_, kind) in enumerate(kinds) if kind == _FORKS), None)
    return cls, names, gids, forks


_DECODERS = tuple(_decoder(cls) for cls in _MESSAGE_CLASSES)


def _decode_message(flat: tuple):
    try:
        cls, names, gids, forks = _DECODERS[flat[0]]
    except (IndexError, TypeError, KeyError):
        raise ValueError(f"not a message: {flat!r:.200}") from None
    values = list(flat[1:])
    if len(values) != len(names):
        raise ValueError(f"a {cls.__name__} has {len(names)} fields, this frame {len(values)}")
    for i in gids:
        values[i] = GloballyUniqueId(*values[i])
    if forks is not None and values[forks]:
        values[forks] = tuple(map(_fork, values[forks]))
    return cls(**dict(zip(names, values)))


def decode_message(frame: bytes):
    """The protocol message a message frame carries.

    Raises:
        ValueError: not a message frame, or not a well-formed message.
    """
    tag = frame[:1]
    if tag != MESSAGE:
        raise ValueError(f"not a message frame (tag {bytes(tag)!r})")
    return _decode_message(pickle.loads(memoryview(frame)[1:]))


# -- distributed autograd messages ------------------------------------------------
# Flat tuples too (the gradients stay tensors, for the pickler to place), so
# that the messages without tensors take the pickler's plain fast path.

_AUTOGRAD_CLASSES = (_autograd.PropagateGradients, _autograd.PropagateDone,
                     _autograd.CleanupContext)
_AUTOGRAD_FIELDS = tuple(tuple(f.name for f in dataclasses.fields(cls))
                         for cls in _AUTOGRAD_CLASSES)
_AUTOGRAD_CODES = {cls: code for code, cls in enumerate(_AUTOGRAD_CLASSES)}


def flatten_autograd(message) -> tuple:
    """A distributed autograd message as ``(type code, field, field, ...)``."""
    code = _AUTOGRAD_CODES[type(message)]
    return (code, *(getattr(message, name) for name in _AUTOGRAD_FIELDS[code]))


def unflatten_autograd(flat):
    """The message :func:`flatten_autograd` made.

    Raises:
        ValueError: not a well-formed autograd message.
    """
    if not isinstance(flat, tuple) or not flat or not isinstance(flat[0], int) \
            or not 0 <= flat[0] < len(_AUTOGRAD_CLASSES):
        raise ValueError(f"not an autograd message: {flat!r:.200}")
    names = _AUTOGRAD_FIELDS[flat[0]]
    if len(flat) != len(names) + 1:
        raise ValueError(f"a {_AUTOGRAD_CLASSES[flat[0]].__name__} has {len(names)} fields, "
                         f"this frame {len(flat) - 1}")
    return _AUTOGRAD_CLASSES[flat[0]](**dict(zip(names, flat[1:])))
