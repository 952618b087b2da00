"""Hostile input: frames no localrref worker would send, written into a live worker's inbox.

Each is dropped with a logged error naming the sender, and the worker goes
on serving (``hostile_scenarios.py``). Segments and world files are the
user's alone.
"""

import pytest

import hostile_scenarios as scenarios
from world import running

pytestmark = [pytest.mark.processes, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def world(leak_free):
    with running(2) as w:
        yield w


@pytest.fixture(scope="module")
def seen(world):
    return world.run(scenarios.hostile_frames_are_logged_and_dropped)


EXPECTED = {
    "truncated": "dropped an undecodable frame from rank 0",
    "garbage": "dropped an undecodable frame from rank 0",
    "unknown type": "dropped an undecodable frame from rank 0",
    "wrong field count": "dropped an undecodable frame from rank 0",
    "bad control": "dropped an undecodable control frame from rank 0",
    "bad autograd": "dropped an undecodable autograd frame from rank 0",
    "bad autograd message": "dropped an undecodable autograd frame from rank 0",
    "missing segment": "could not unpickle a call from rank 0: WorkerGoneError",
    "path in segment": "could not unpickle a call from rank 0: ValueError: segment names have "
                       "no '/'",
    "not a segment": "could not unpickle a call from rank 0: ValueError: /dev/shm/lrr_impostor_",
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_a_hostile_frame_is_logged_naming_its_sender_and_the_worker_serves_on(seen, name):
    lines = seen[name]
    assert any(EXPECTED[name] in line for line in lines), lines
    assert all(line.split()[0] in ("ERROR", "WARNING") for line in lines
               if "rank 0" in line), lines


def test_shared_memory_segments_are_readable_by_their_user_only(world):
    modes = world.run(scenarios.segment_modes)
    assert modes and all(mode == 0o600 for mode in modes.values()), modes
