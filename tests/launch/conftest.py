"""Fixtures for the launch tests: nothing a test starts may outlive it.

Every test runs with a fresh marker in its environment (``LRR_LAUNCH_TEST``),
which every process it starts inherits (launcher, workers, their helpers). At
teardown no process carrying the marker may be alive (after a bounded wait
for ones already exiting) and no thread may have been added to the test
process. /dev/shm is checked by the tests that know their world ids: other
suites create ``lrr_*`` entries of their own while these tests run.
"""

from __future__ import annotations

import multiprocessing.resource_tracker
import os
import threading
import uuid

import psutil
import pytest

from lrr_launch_helpers import MARKER


def processes_with_marker(token: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(MARKER) == token:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


@pytest.fixture(autouse=True)
def run_marker(monkeypatch):
    # multiprocessing starts one resource tracker per process and keeps it:
    # start it before the marker is set so it is not mistaken for a leak.
    multiprocessing.resource_tracker.ensure_running()
    token = uuid.uuid4().hex
    monkeypatch.setenv(MARKER, token)
    threads = set(threading.enumerate())
    yield token
    survivors = [p for p in processes_with_marker(token) if p.pid != os.getpid()]
    _, alive = psutil.wait_procs(survivors, timeout=10)
    for proc in alive:
        proc.kill()
    assert alive == [], f"processes of the test still alive: {[p.pid for p in alive]}"
    assert set(threading.enumerate()) - threads == set(), "the test left threads running"
