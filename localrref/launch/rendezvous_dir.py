"""Where rendezvous worlds live on disk, and the process facts their decisions need.

Layout (``root`` is private to the user: mode 0700, owned by them)::

    <root>/rendezvous.lock            filelock: every read-modify-write of a record
    <root>/<key>/world.json           the WorldRecord of the rendezvous (launch/rendezvous.py)
    <root>/<key>/<world_id>/inbox-N   the world's FIFO inboxes (transport/fifo.py)

``root`` is ``$LOCALRREF_RUNTIME_DIR`` if set, else ``<tmp>/localrref-<uid>``.
One lock for the user's whole root: it is held for a few file operations
per join or leave, and a single lock file means there is no per-world lock
file to race with while a world's directory is removed. The root and its
lock file stay (like ``/tmp/tmux-<uid>``); everything under ``<key>`` goes
when the world ends.

A process is named by its pid and its start time (field 22 of
``/proc/<pid>/stat``, clock ticks since boot): a pid recorded by a crashed
run may belong to a stranger by now.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator

from localrref.launch.rendezvous import WorldRecord

__all__ = ["RUNTIME_DIR_ENV", "runtime_root", "locked", "read_record", "write_record",
           "remove_world", "process_started", "same_process", "RendezvousDirError"]

RUNTIME_DIR_ENV = "LOCALRREF_RUNTIME_DIR"
RECORD_NAME = "world.json"
_LOCK_POLL_S = 0.001


class RendezvousDirError(RuntimeError):
    """The rendezvous directory cannot be used safely (someone else's, or open to others)."""


def runtime_root() -> str:
    """The user's private rendezvous root, created if missing; refuses one that is not private."""
    root = os.environ.get(RUNTIME_DIR_ENV) or os.path.join(tempfile.gettempdir(),
                                                          f"localrref-{os.getuid()}")
    with contextlib.suppress(FileExistsError):
        os.mkdir(root, 0o700)
    check_private(root)
    return root


def check_private(path: str) -> None:
    """Raise RendezvousDirError unless ``path`` is a directory of ours, closed to others."""
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode):
        raise RendezvousDirError(f"the localrref rendezvous directory {path} is not a directory; "
                                 f"remove it, or set {RUNTIME_DIR_ENV} to a private directory")
    if info.st_uid != os.getuid():
        raise RendezvousDirError(
            f"the localrref rendezvous directory {path} belongs to uid {info.st_uid}, not to you "
            f"(uid {os.getuid()}): refusing to use it (another user could read or forge your "
            f"world's messages); remove it, or set {RUNTIME_DIR_ENV} to a private directory")
    if info.st_mode & 0o077:
        raise RendezvousDirError(
            f"the localrref rendezvous directory {path} is open to other users (mode "
            f"{stat.S_IMODE(info.st_mode):o}); run `chmod 700 {path}`, or set {RUNTIME_DIR_ENV} "
            f"to a private directory")


@contextlib.contextmanager
def locked(root: str, timeout: float = 60.0) -> Iterator[None]:
    """Hold the lock of every record under ``root`` for the ``with`` block."""
    # Imported here: the supervisor locks only when its world ends, and
    # filelock's import is a fifth of its start.
    from filelock import FileLock
    lock = FileLock(os.path.join(root, "rendezvous.lock"), timeout=timeout, mode=0o600)
    # filelock retries a held lock every 50 ms by default, and the lock is
    # held for a few file operations: ranks that arrive together would each
    # wait a whole interval for a lock freed long before.
    with lock.acquire(poll_interval=_LOCK_POLL_S):
        yield


def read_record(key_dir: str) -> WorldRecord | None:
    """The record under ``key_dir``, or None (no record, or an unreadable one: a crash mid-write
    cannot leave one, as records are replaced whole, but a file of another version can)."""
    try:
        with open(os.path.join(key_dir, RECORD_NAME)) as f:
            return WorldRecord.from_json(f.read())
    except FileNotFoundError:
        return None
    except ValueError:
        return None


def write_record(key_dir: str, record: WorldRecord) -> None:
    """Replace the record whole (write a temporary file, then rename it over)."""
    path = os.path.join(key_dir, RECORD_NAME)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(record.to_json())
    os.replace(tmp, path)


def remove_world(key_dir: str, world_id: str, *, root: str | None = None) -> None:
    """Remove world ``world_id``'s inboxes, and its record and key directory if still its own.

    Takes the lock: a newer world may have taken the key meanwhile (its
    record then names another world, which stays).
    """
    root = root or os.path.dirname(key_dir)
    with locked(root):
        shutil.rmtree(os.path.join(key_dir, world_id), ignore_errors=True)
        record = read_record(key_dir)
        if record is None or record.world_id == world_id:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(key_dir, RECORD_NAME))
            with contextlib.suppress(OSError):
                os.rmdir(key_dir)  # fails while another world's files are in it


def process_started(pid: int) -> int | None:
    """The start time of process ``pid`` (clock ticks since boot); None if it is gone.

    A zombie counts as gone: it has exited, only its parent has not reaped it.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) is in parentheses and may hold spaces.
    fields = text[text.rindex(b")") + 2:].split()
    if fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])


def same_process(pid: int, started: int) -> bool:
    """Process ``pid`` still runs and is the one that started at ``started``."""
    return pid > 0 and process_started(pid) == started
