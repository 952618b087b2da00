"""Run a whole program for a test, and leave none of its processes behind.

``subprocess.run(..., timeout=...)`` kills only the process it started when
the time is up: the workers that process spawned live on, and so does the
world's supervisor while they do. :func:`run_program` starts the program in
a session of its own and kills every process of that session instead, then
raises ``subprocess.TimeoutExpired`` with what the program had printed.
"""

from __future__ import annotations

import os
import signal
import subprocess
from typing import Any, Sequence

__all__ = ["run_program"]

# After the kill: the time left to processes outside the session that hold
# the program's pipes (a world's supervisor, which ends once its workers are
# gone) before the output is taken as it is.
_DRAIN_S = 30.0


def run_program(args: Sequence[str], *, timeout: float, input: Any = None,
                **popen_kwargs: Any) -> subprocess.CompletedProcess:
    """``subprocess.run(args, timeout=timeout, ...)`` that kills the program's
    whole session, not only its first process, when the time is up.

    Accepts ``subprocess.run``'s arguments (``capture_output``, ``text``,
    ``env``, ``cwd``, ``check``, ...) except ``start_new_session``.
    """
    if "start_new_session" in popen_kwargs:
        raise TypeError("run_program starts the program in a new session itself; "
                        "drop start_new_session")
    check = popen_kwargs.pop("check", False)
    if popen_kwargs.pop("capture_output", False):
        popen_kwargs["stdout"] = popen_kwargs["stderr"] = subprocess.PIPE
    if input is not None:
        popen_kwargs["stdin"] = subprocess.PIPE
    with subprocess.Popen(args, start_new_session=True, **popen_kwargs) as proc:
        try:
            stdout, stderr = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired as expired:
            _kill_session(proc.pid)
            try:
                stdout, stderr = proc.communicate(timeout=_DRAIN_S)
            except subprocess.TimeoutExpired:
                stdout, stderr = expired.output, expired.stderr
            raise subprocess.TimeoutExpired(proc.args, timeout, stdout, stderr) from None
        except BaseException:
            _kill_session(proc.pid)
            raise
    done = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    if check:
        done.check_returncode()
    return done


def _kill_session(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)  # its session's process group has its pid
    except ProcessLookupError:
        pass
