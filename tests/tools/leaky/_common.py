"""Shared by the deliberately leaky programs: argument parsing and the probe helper.

These programs are run by tests/tools/test_leak_audit_run.py under the
auditor. Each leaks exactly one kind of thing (clean.py leaks nothing while
doing a bit of everything), so a test can check the auditor names it.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..",
                                "tools"))

import leak_audit  # noqa: E402


def shm_name(what: str) -> str:
    """A /dev/shm name under the prefix the test chose (env LEAKY_SHM_PREFIX).

    Tests judge only that prefix, so /dev/shm traffic of other programs on
    the machine cannot turn a clean run into a false alarm.
    """
    return f"{os.environ.get('LEAKY_SHM_PREFIX', 'leaky_')}{what}_{os.getpid()}"


def steps_arg(default: int = 60) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=default)
    p.add_argument("--size", type=int, default=4096)
    return p.parse_args()


def probe(step: int, **extra: float) -> None:
    print(leak_audit.probe_line(step, **extra), flush=True)
