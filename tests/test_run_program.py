"""localrref.testing.programs.run_program: subprocess.run whose timeout kills the whole program."""

from __future__ import annotations

import os
import select
import subprocess
import sys

import pytest

from localrref.testing.programs import run_program

pytestmark = [pytest.mark.processes, pytest.mark.timeout(60)]

# Starts a grandchild, says its pid, and both wait for ever.
HANGS_WITH_A_GRANDCHILD = """\
import signal, subprocess, sys
child = subprocess.Popen([sys.executable, "-S", "-c", "import signal; signal.pause()"])
print(child.pid, flush=True)
signal.pause()
"""


def _ends(pid: int, within: float) -> bool:
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True  # gone and reaped
    try:
        return bool(select.select([fd], [], [], within)[0])  # readable once it exited
    finally:
        os.close(fd)


def test_a_timeout_kills_the_programs_children_too():
    with pytest.raises(subprocess.TimeoutExpired) as expired:
        run_program([sys.executable, "-S", "-c", HANGS_WITH_A_GRANDCHILD], timeout=3,
                    capture_output=True, text=True)
    grandchild = int(expired.value.stdout)  # what it printed before the time was up
    # It was killed, not left to wait for ever: it ends. (Its pipe closes a
    # moment before it is a zombie, so wait for its exit, not for the pipe.)
    assert _ends(grandchild, within=30)


def test_a_finished_program_reads_as_with_subprocess_run():
    done = run_program([sys.executable, "-S", "-c", "import sys; print(sys.stdin.read()[::-1]);"
                        "sys.exit(3)"], input="abc", timeout=30, capture_output=True,
                       text=True)
    assert (done.returncode, done.stdout) == (3, "cba\n")
    with pytest.raises(subprocess.CalledProcessError):
        run_program([sys.executable, "-S", "-c", "raise SystemExit(2)"], timeout=30, check=True)
    with pytest.raises(TypeError, match="start_new_session"):
        run_program([sys.executable, "-S", "-c", ""], timeout=30, start_new_session=False)
