"""Worker error files and the failure summary, in torchelastic's formats.

A worker that dies of an exception writes one JSON file (the format of
``torch.distributed.elastic.multiprocessing.errors.ErrorHandler``)::

    {"message": {"message": "ValueError: boom",
                 "extraInfo": {"py_callstack": "<traceback>", "timestamp": "1700000000"}}}

The supervisor reads it back: ``spawn`` turns it into torch's
``ProcessRaisedException``, and the CLI prints torchrun's failure summary
(:func:`format_failure_summary`, the text of torch's ``ChildFailedError``).
Torch's own ``ProcessFailure`` can read these files too; a test holds the two
formats together.

Each file has exactly one writer (the worker, or a user's ``@record``) and is
read only after that worker has exited, so no lock is needed; the write is
still atomic (temp file + rename) so a reader never sees half a file.

Stdlib only: workers import this module before running user code.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

__all__ = [
    "write_error_file",
    "read_error_file",
    "traceback_from",
    "Failure",
    "format_failure_summary",
    "NOT_AVAILABLE",
]

NOT_AVAILABLE = "<N/A>"
_NO_TRACEBACK_HINT = "To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html"


def write_error_file(path: str, exc: BaseException, traceback_text: str) -> None:
    """Record ``exc`` at ``path`` in torchelastic's JSON layout (atomically)."""
    data = {
        "message": {
            "message": f"{type(exc).__name__}: {exc}",
            "extraInfo": {
                "py_callstack": traceback_text,
                "timestamp": str(int(time.time())),
            },
        }
    }
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=".error-", suffix=".json", dir=directory)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def read_error_file(path: str | None) -> dict[str, Any] | None:
    """The parsed error file, or None if there is none (or it is not valid JSON)."""
    if not path or not os.path.isfile(path):
        return None
    try:
        with open(path) as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and "message" in data else None


def traceback_from(data: dict[str, Any] | None) -> str | None:
    """The worker's traceback text out of a parsed error file, if it has one."""
    if data is None:
        return None
    message = data["message"]
    if isinstance(message, dict):
        return message.get("extraInfo", {}).get("py_callstack", message.get("message"))
    return str(message)


@dataclass(frozen=True, slots=True, kw_only=True)
class Failure:
    """One worker that exited with a non-zero code (torch's ``ProcessFailure``).

    Build with :meth:`observe`, which reads the error file the way torch does.
    """

    rank: int
    local_rank: int
    pid: int
    exitcode: int
    error_file: str
    message: str | dict[str, Any]
    timestamp: int

    @classmethod
    def observe(cls, *, rank: int, local_rank: int, pid: int, exitcode: int,
                error_file: str | None, exited_at: float) -> Failure:
        """Describe a failed worker; ``exited_at`` (epoch seconds) is used when no file says better."""
        data = read_error_file(error_file)
        if data is not None:
            message = data["message"]
            if isinstance(message, str):
                timestamp = int(data.get("timestamp", 0))
            else:
                timestamp = int(message["extraInfo"]["timestamp"])
            return cls(rank=rank, local_rank=local_rank, pid=pid, exitcode=exitcode,
                       error_file=str(error_file), message=message, timestamp=timestamp)
        if exitcode < 0:
            message = f"Signal {-exitcode} ({_signal_name(exitcode)}) received by PID {pid}"
        else:
            message = _NO_TRACEBACK_HINT
        return cls(rank=rank, local_rank=local_rank, pid=pid, exitcode=exitcode,
                   error_file=NOT_AVAILABLE, message=message, timestamp=int(exited_at))


def _signal_name(exitcode: int) -> str:
    if exitcode >= 0:
        return NOT_AVAILABLE
    try:
        return signal.Signals(-exitcode).name
    except ValueError:
        return NOT_AVAILABLE


def format_failure_summary(name: str, failures: list[Failure]) -> str:
    """torchrun's failure report (the text of torch's ``ChildFailedError``).

    Args:
        name: What was launched (the script or module), used in the title.
        failures: In the order they were observed. The root cause is the one
            with the smallest timestamp, the earliest observed on a tie.

    Returns:
        The multi-line report, starting and ending with a newline-framed border.
    """
    if not failures:
        raise ValueError("a failure summary needs at least one failure")
    title = f"{name} FAILED"
    root = min(failures, key=lambda f: f.timestamp)
    width = len(title)
    root_text = ""
    other_texts = []
    for idx, failure in enumerate(failures):
        text = _format_one(idx, failure)
        width = max(width, *(len(line) for line in text.split("\n")))
        if failure is root:
            root_text = text
        else:
            other_texts.append(text)
    width = min(width, 60)
    border, section = "=" * width, "-" * width
    others = "\n".join(other_texts or ["  <NO_OTHER_FAILURES>"])
    return (f"\n{border}\n{title}\n{section}\nFailures:\n{others}\n{section}\n"
            f"Root Cause (first observed failure):\n{root_text}\n{border}")


def _format_one(idx: int, failure: Failure) -> str:
    message = failure.message
    if isinstance(message, dict):
        message = (message.get("extraInfo", {})
                   .get("py_callstack", message.get("message", NOT_AVAILABLE))
                   .replace("\n", "\n  "))
    signal_name = _signal_name(failure.exitcode)
    signal_text = f" ({signal_name})" if signal_name != NOT_AVAILABLE else ""
    when = datetime.fromtimestamp(failure.timestamp).isoformat(sep="_")
    # Field layout (including the doubled space before a signal name) is torch's.
    return (f"[{idx}]:\n"
            f"  time      : {when}\n"
            f"  host      : {socket.getfqdn()}\n"
            f"  rank      : {failure.rank} (local_rank: {failure.local_rank})\n"
            f"  exitcode  : {failure.exitcode} (pid: {failure.pid}) {signal_text}\n"
            f"  error_file: {failure.error_file}\n"
            f"  traceback : {message}")
