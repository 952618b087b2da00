"""Inboxes that late joiners open by name: one FIFO per rank in the world's directory.

Workers that a localrref supervisor starts inherit their inboxes
(``SimpleQueue`` pipes, ``mpqueue.make_inboxes``). Processes that meet
through a rendezvous (``launch/join.py``) were started by someone else, so
they open the same kind of pipe by path: ``mkfifo`` makes it, and every
member opens every inbox ``O_RDWR``. A :class:`FifoInbox` has the two
attributes the transport reads from a queue (``_reader`` and ``_writer``,
each with ``fileno()``), so ``Endpoint``, ``bounded_send`` and
``InboxReader`` work on it unchanged, frame format and its one atomic write
per frame included (a FIFO is a pipe: ``PIPE_BUF`` writes are atomic).

Why ``O_RDWR`` for everyone: opening a FIFO for writing blocks until
someone reads it (or fails with ``ENXIO`` when non-blocking), and a reader
sees end-of-file whenever the last writer closes. With every member holding
each inbox open both ways, opens never wait for a peer that has not
arrived yet, frames written before their reader opens wait in the pipe,
and no exit of a peer looks like end-of-file. It is the same as the
inherited queues, whose both ends every process holds.
"""

from __future__ import annotations

import os
import stat

from localrref.transport.mpqueue import PIPE_CAPACITY

__all__ = ["FifoInbox", "make_fifos", "open_fifos", "fifo_path"]


def fifo_path(directory: str, index: int) -> str:
    return os.path.join(directory, f"inbox-{index}")


def make_fifos(directory: str, count: int) -> None:
    """Create ``count`` FIFOs, readable and writable by this user only."""
    for index in range(count):
        os.mkfifo(fifo_path(directory, index), 0o600)


def open_fifos(directory: str, count: int) -> list[FifoInbox]:
    """Open the world's ``count`` inboxes (raises FileNotFoundError if one is gone)."""
    opened: list[FifoInbox] = []
    try:
        for index in range(count):
            opened.append(FifoInbox(fifo_path(directory, index)))
    except BaseException:
        for inbox in opened:
            inbox.close()
        raise
    return opened


class _Fd:
    __slots__ = ("_fd",)

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def fileno(self) -> int:
        return self._fd


class FifoInbox:
    """One named inbox, opened for reading and writing (see the module docstring)."""

    def __init__(self, path: str) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            if not stat.S_ISFIFO(os.fstat(fd).st_mode):
                raise ValueError(f"{path} is not a FIFO: the world's directory was tampered with")
            try:
                import fcntl
                fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_CAPACITY)
            except (AttributeError, OSError):
                pass  # the default capacity only means senders block sooner
        except BaseException:
            os.close(fd)
            raise
        self.path = path
        self._reader = self._writer = _Fd(fd)
        self._closed = False

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self._reader.fileno())

    def __repr__(self) -> str:
        return f"FifoInbox({self.path!r}{', closed' if self._closed else ''})"
