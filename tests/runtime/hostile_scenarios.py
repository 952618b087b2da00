"""Hostile frames written straight into worker1's inbox by rank 0 (test_hostile_input).

Rank 0 bypasses its agent and writes raw frames with its transport, as any
process holding the inbox could. worker1 must log each one, naming the
sender, drop it, and go on serving.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import stat

import torch

import localrref as rpc
from localrref import world
from localrref.agent import current
from localrref.codec import frames, pickler
from localrref.core import messages
from localrref.transport import wire
from localrref.transport.segment import SHM_DIR, world_segments
from localrref.transport.shm import TensorHandle


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record) -> None:
        self.lines.append(f"{record.levelname} {record.getMessage()}")


_CAPTURE = _Capture()


def start_capture() -> None:
    _CAPTURE.lines.clear()
    logging.getLogger("localrref").addHandler(_CAPTURE)


def stop_capture() -> list[str]:
    logging.getLogger("localrref").removeHandler(_CAPTURE)
    return list(_CAPTURE.lines)


def add(a, b):
    return a + b


class _Mark:
    """Stands for the forged tensor in the call's arguments."""


def _call_frame(request_id: int, segment: str) -> bytes:
    """A PYTHON_CALL of ``add`` whose first argument is a tensor in ``segment``."""
    handle = TensorHandle(segment=segment, offset=4096, nbytes=4096, slot=0, private=False,
                          dtype=torch.float32, shape=(1024,), stride=(1,), storage_offset=0,
                          requires_grad=False)

    class Forger(pickle.Pickler):
        # What localrref's own pickler writes for a tensor in shared memory.
        dispatch_table = {_Mark: lambda mark: (pickler._tensor_from_pid,
                                               (b"t" + handle.pack(),))}

    buffer = io.BytesIO()
    Forger(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump((add, (_Mark(), 1), {}))
    return frames.encode_message(messages.PythonCall(request_id=request_id,
                                                     payload=buffer.getvalue()))


def hostile_frames_are_logged_and_dropped():
    """Returns worker1's log lines, one group per frame, after each was sent."""
    agent = current.require()
    # A file in /dev/shm that is not a localrref segment (no magic header).
    impostor = f"lrr_impostor_{os.getpid()}"
    with open(os.path.join(SHM_DIR, impostor), "wb") as f:
        f.write(b"not a segment" * 1000)
    try:
        return _send_hostile(agent, impostor)
    finally:
        os.unlink(os.path.join(SHM_DIR, impostor))


def _send_hostile(agent, impostor: str) -> dict:
    good = frames.encode_message(messages.PythonCall(
        request_id=10 ** 9, payload=pickle.dumps((add, (1, 2), {}))))
    hostile = {
        "truncated": good[: len(good) // 2],
        "garbage": b"\xff\x00\x13 not a frame at all",
        "unknown type": frames.MESSAGE + pickle.dumps((99, 1, 2)),
        "wrong field count": frames.MESSAGE + pickle.dumps((0, 1)),
        "bad control": wire.CONTROL_TAG + b"\x80\x05garbage",
        "bad autograd": wire.AUTOGRAD_TAG + b"\x80\x05garbage",
        "bad autograd message": wire.AUTOGRAD_TAG + pickle.dumps((7, 1)),
        "missing segment": _call_frame(10 ** 9 + 1, "lrr_nosuchworld_0_0_0"),
        "path in segment": _call_frame(10 ** 9 + 2, "../../etc/passwd"),
        "not a segment": _call_frame(10 ** 9 + 3, impostor),
    }
    seen = {}
    rpc.rpc_sync("worker1", start_capture)
    for name, frame in hostile.items():
        rpc.rpc_sync("worker1", start_capture)
        agent.transport.send(1, frame)
        if name.endswith("segment"):
            # A call that decodes counts as received there, and its failure
            # comes back here: count it as sent, as the agent would have, or
            # the shutdown's drain would wait for a call that never left.
            agent._count_sent(+1)
        # Frames from one sender are read in order: this call's answer comes
        # after worker1 has handled the frame above, and shows it still serves.
        assert rpc.rpc_sync("worker1", add, args=(2, 3)) == 5, name
        seen[name] = rpc.rpc_sync("worker1", stop_capture)
    return seen


def segment_modes():
    """The permission bits of this world's shared-memory segments, with some in use."""
    assert torch.equal(rpc.rpc_sync("worker1", add, args=(torch.ones(1 << 18), 1)),
                       torch.full((1 << 18,), 2.0))
    names = world_segments(world.current().world_id)
    return {name: stat.S_IMODE(os.stat(os.path.join(SHM_DIR, name)).st_mode) for name in names}
