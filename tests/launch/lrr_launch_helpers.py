"""Helpers for the launch tests: running the launcher and reading its output with deadlines."""

from __future__ import annotations

import os
import selectors
import subprocess
import sys
import time

from localrref.testing.programs import run_program

MARKER = "LRR_LAUNCH_TEST"
HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPTS = os.path.join(HERE, "scripts")
REPO = os.path.dirname(os.path.dirname(HERE))


def launcher_env(**extra: str) -> dict[str, str]:
    """The environment for a launcher subprocess: the repo importable, no PET_* leaking in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PET_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, SCRIPTS, env.get("PYTHONPATH")]))
    env.pop("OMP_NUM_THREADS", None)
    env.update(extra)
    return env


def run_launcher(*args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess:
    return run_program([sys.executable, "-m", "localrref.launch", *args], cwd=SCRIPTS,
                       env=launcher_env(**env), capture_output=True, text=True, timeout=timeout)


def start_launcher(*args: str, **env: str) -> subprocess.Popen:
    """A running launcher with binary, unbuffered stdout/stderr pipes."""
    return subprocess.Popen([sys.executable, "-m", "localrref.launch", *args], cwd=SCRIPTS,
                            env=launcher_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            bufsize=0)


def read_lines_until(stream, count: int, prefix: str, timeout: float) -> list[str]:
    """Read ``stream`` (binary, unbuffered) until ``count`` lines start with ``prefix``.

    Waits on the pipe with a deadline; raises AssertionError when it passes.
    """
    deadline = time.monotonic() + timeout
    buffer, found = b"", []
    fd = stream.fileno()
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while len(found) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not sel.select(remaining):
                raise AssertionError(f"only {found} after {timeout}s waiting for {count} {prefix!r} lines")
            chunk = os.read(fd, 65536)
            if not chunk:
                raise AssertionError(f"stream closed after {found}")
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            found += [line.decode() for line in lines if line.decode().startswith(prefix)]
    return found


def ready_pids(lines: list[str]) -> list[int]:
    """Pids out of ``ready <rank> <pid>`` lines."""
    return [int(line.split()[2]) for line in lines]
