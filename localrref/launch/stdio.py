"""Where the launcher's workers write: torchrun's log directory, redirects and tee.

Layout (torchrun's ``DefaultLogsSpecs``)::

    <log_dir>/<run_id>_<random>/attempt_<n>/<rank>/stdout.log
                                                    stderr.log
                                                    error.json

``<run_id>_<random>`` comes from ``mkdtemp``, so runs that share a log dir
(and even a run id) never meet on the same files; every later path is
private to one run.

``-r/--redirects`` sends a worker's stream to its log file only; ``-t/--tee``
sends it to the file *and* the console, each console line prefixed with the
rank (torchrun's ``[default0]:``, or ``TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE``). A tee'd
stream is a pipe that :class:`TeePump` drains::

    worker r fd 1 ──pipe──▶ TeePump thread "lrr-tee" ──▶ <rank>/stdout.log (bytes as written)
                                                     └─▶ launcher stdout, "[default r]:" + line

The pump is the only reader of those pipes; the launcher's main thread only
starts and closes it.
"""

from __future__ import annotations

import enum
import multiprocessing.connection
import os
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from string import Template
from typing import Any, TextIO

__all__ = ["Std", "parse_std", "std_for_rank", "LogLayout", "TeeSource", "TeePump",
           "line_prefix", "DEFAULT_PREFIX_TEMPLATE"]

# torchrun's own default ("[default0]:"), so logs read the same under both;
# TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE="[rank${rank}]:" names the global rank.
DEFAULT_PREFIX_TEMPLATE = "[${role_name}${local_rank}]:"
PREFIX_TEMPLATE_ENV = "TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE"


class Std(enum.IntFlag):
    """Which standard streams a setting applies to (torchrun's encoding: 0-3)."""

    NONE = 0
    OUT = 1
    ERR = 2
    ALL = 3


_VALUE_RE = re.compile(r"^[0123]$")
_MAPPING_RE = re.compile(r"^(\d+:[0123],)*(\d+:[0123])$")


def parse_std(text: str) -> Std | dict[int, Std]:
    """``"3"`` -> ``Std.ALL``; ``"0:1,1:2"`` -> ``{0: Std.OUT, 1: Std.ERR}``.

    Raises:
        ValueError: ``text`` is neither form.
    """
    if _VALUE_RE.match(text):
        return Std(int(text))
    if _MAPPING_RE.match(text):
        return {int(rank): Std(int(value)) for rank, value in
                (item.split(":") for item in text.split(","))}
    raise ValueError(f"{text!r} must be 0-3 (none, stdout, stderr, both) or a per-rank map "
                     "like 0:3,1:1")


def std_for_rank(setting: Std | dict[int, Std], rank: int) -> Std:
    if isinstance(setting, dict):
        return setting.get(rank, Std.NONE)
    return setting


def line_prefix(rank: int, role: str, template: str | None = None) -> str:
    """The console prefix of a tee'd line from ``rank``."""
    template = template or os.environ.get(PREFIX_TEMPLATE_ENV) or DEFAULT_PREFIX_TEMPLATE
    return Template(template).safe_substitute(role_name=role, rank=rank, local_rank=rank)


@dataclass(frozen=True, slots=True)
class LogLayout:
    """The run's log directory; ``temporary`` when no ``--log-dir`` was given."""

    root: str
    run_dir: str
    temporary: bool

    @classmethod
    def create(cls, log_dir: str | None, run_id: str) -> LogLayout:
        if log_dir is None:
            root, temporary = tempfile.mkdtemp(prefix="localrref_"), True
        else:
            if os.path.isfile(log_dir):
                raise NotADirectoryError(f"--log-dir {log_dir} is a file; give a directory")
            os.makedirs(log_dir, exist_ok=True)
            root, temporary = log_dir, False
        return cls(root=root, run_dir=tempfile.mkdtemp(prefix=f"{run_id}_", dir=root),
                   temporary=temporary)

    def make_attempt(self, attempt: int, nprocs: int) -> str:
        """Create ``attempt_<n>/<rank>/`` for every rank; return the attempt directory."""
        attempt_dir = os.path.join(self.run_dir, f"attempt_{attempt}")
        shutil.rmtree(attempt_dir, ignore_errors=True)
        for rank in range(nprocs):
            os.makedirs(os.path.join(attempt_dir, str(rank)))
        return attempt_dir

    def remove(self) -> None:
        """Delete the whole tree if we made it up (no ``--log-dir``)."""
        if self.temporary:
            shutil.rmtree(self.root, ignore_errors=True)


@dataclass(frozen=True, slots=True, kw_only=True)
class TeeSource:
    """One tee'd stream: the pipe's read end, its log file, and the console to echo to."""

    conn: Any  # multiprocessing Connection (read end)
    log_path: str
    console: TextIO | None  # None when --local-ranks-filter hides this rank
    prefix: str


class _Stream:
    def __init__(self, source: TeeSource) -> None:
        self.source = source
        self.fd = source.conn.fileno()
        self.log = open(source.log_path, "wb")
        self.partial = b""

    def feed(self, data: bytes) -> None:
        self.log.write(data)
        self.log.flush()
        if self.source.console is None:
            return
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        if lines:
            self._echo(lines)

    def finish(self) -> None:
        if self.partial and self.source.console is not None:
            self._echo([self.partial])
        self.partial = b""
        self.log.close()
        self.source.conn.close()

    def _echo(self, lines: list[bytes]) -> None:
        prefix = self.source.prefix
        text = "".join(f"{prefix}{line.decode('utf-8', 'replace')}\n" for line in lines)
        self.source.console.write(text)
        self.source.console.flush()


class TeePump:
    """Copies tee'd worker pipes to their log files and to the console, line-prefixed."""

    def __init__(self, sources: list[TeeSource]) -> None:
        self._streams = {stream.fd: stream for stream in map(_Stream, sources)}
        self._wake_r, self._wake_w = os.pipe()
        self._closing_deadline: float | None = None
        self._thread = threading.Thread(target=self._run, name="lrr-tee", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self, timeout: float = 2.0) -> None:
        """Drain until every writer closed its pipe, or ``timeout`` seconds; then stop.

        Call once the workers have exited. The timeout only matters when a
        worker's own child process still holds the pipe open.
        """
        if self._thread.is_alive():
            self._closing_deadline = time.monotonic() + timeout
            os.write(self._wake_w, b"\0")
            self._thread.join()
        for stream in self._streams.values():
            stream.finish()
        self._streams.clear()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _run(self) -> None:
        open_fds = set(self._streams)
        while open_fds:
            deadline = self._closing_deadline
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready = multiprocessing.connection.wait([self._wake_r, *open_fds], timeout)
            if self._wake_r in ready:
                os.read(self._wake_r, 512)
            for fd in open_fds & set(ready):
                data = os.read(fd, 65536)
                if data:
                    self._streams[fd].feed(data)
                else:
                    open_fds.discard(fd)
            if deadline is not None and time.monotonic() >= deadline:
                return
