"""Fixtures for the transport tests: a fresh world id and leak checks.

Every test ends with nothing left behind: no segment of its world in
/dev/shm, no new thread, no new file descriptor, no live child process.
Only the test's own world prefix is checked in /dev/shm, because other
suites may be running on the machine at the same time.
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import multiprocessing.resource_tracker
import os
import threading

import pytest

from transport_workers import open_fds

from localrref.transport.shm import new_world_id, sweep_world_segments, world_segments


def _checked_world(who: str):
    """A fresh world id; afterwards, nothing of it may be left in /dev/shm."""
    world = new_world_id()
    yield world
    gc.collect()
    left = world_segments(world)
    sweep_world_segments(world)
    assert left == [], f"segments left in /dev/shm {who}: {left}"


@pytest.fixture
def world_id():
    yield from _checked_world("after the test")


@pytest.fixture(scope="module")
def peers_world():
    yield from _checked_world("by the peers")


@pytest.fixture(autouse=True)
def no_leaks():
    # The tracker starts (and keeps a pipe to itself) with the first
    # multiprocessing lock of the session: not a leak of the test's.
    multiprocessing.resource_tracker.ensure_running()
    gc.collect()
    threads, fds, children = set(threading.enumerate()), open_fds(), set(mp.active_children())
    yield
    gc.collect()
    assert set(threading.enumerate()) - threads == set(), "the test left threads running"
    assert set(mp.active_children()) - children == set(), "the test left child processes"
    new_fds = {fd for fd in open_fds() - fds if os.path.exists(f"/proc/self/fd/{fd}")}
    assert new_fds == set(), f"the test left file descriptors open: " \
        f"{ {fd: os.readlink(f'/proc/self/fd/{fd}') for fd in new_fds} }"
