"""Frames: what one inbox write carries.

A frame is one tag byte and a pickle:

* ``M`` a protocol message (:mod:`localrref.core.messages`); its payload is
  already bytes, pickled by :mod:`localrref.codec.pickler` in the sender's
  thread, so this pickle is only the message record around it;
* ``C`` a control tuple ``(tag, ...)``: the hello of ``init_rpc``, and the
  supervisor's notices (:mod:`localrref.world`).

The transport puts the sender's rank in front (:mod:`localrref.transport.mpqueue`).
"""

from __future__ import annotations

import pickle

__all__ = ["encode_message", "encode_control", "decode"]

_PROTOCOL = pickle.HIGHEST_PROTOCOL
MESSAGE = b"M"
CONTROL = b"C"


def encode_message(message) -> bytes:
    return MESSAGE + pickle.dumps(message, protocol=_PROTOCOL)


def encode_control(control: tuple) -> bytes:
    return CONTROL + pickle.dumps(control, protocol=_PROTOCOL)


def decode(frame: bytes):
    """Return ``("message", Message)`` or ``("control", tuple)``."""
    tag, body = frame[:1], memoryview(frame)[1:]
    if tag == MESSAGE:
        return "message", pickle.loads(body)
    if tag == CONTROL:
        return "control", pickle.loads(body)
    raise ValueError(f"unknown frame tag {bytes(tag)!r}")
