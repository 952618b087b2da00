"""Leftover POSIX shared memory: segments and named semaphores under /dev/shm.

On Linux ``shm_open(name)`` is a file ``/dev/shm/name`` and ``sem_open(name)``
is ``/dev/shm/sem.name``. A leftover is an entry that is present after the
run but was not there before (or was replaced: a different inode).

Other programs on the machine create entries too, so an entry is blamed on
the run only if no process outside the run has it open or mapped when we
look (a live segment of another program always has a holder; a leaked one
usually has none, or only leftover processes of the run). Entries of other
users are ignored. Pass ``prefixes`` (the world's shm prefix) to look only at
your own names.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Iterable

from ._model import LeakKind, ShmEntry, Status, Verdict

SHM_DIR = "/dev/shm"


def snapshot_shm(shm_dir: str = SHM_DIR) -> dict[str, int]:
    """Name -> inode of every entry of this user; empty if there is no /dev/shm."""
    out = {}
    uid = os.getuid()
    try:
        with os.scandir(shm_dir) as it:
            for entry in it:
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if st.st_uid == uid:
                    out[entry.name] = st.st_ino
    except FileNotFoundError:
        pass
    return out


def _matches(name: str, prefixes: Collection[str]) -> bool:
    if not prefixes:
        return True
    bare = name[4:] if name.startswith("sem.") else name
    return any(name.startswith(p) or bare.startswith(p.lstrip("/")) for p in prefixes)


def shm_holders(paths: Collection[str]) -> dict[str, set[int]]:
    """For each path, the pids that have it open (fd) or mapped (maps)."""
    held: dict[str, set[int]] = {p: set() for p in paths}
    if not paths:
        return held
    for pid_s in os.listdir("/proc"):
        if not pid_s.isdigit():
            continue
        pid = int(pid_s)
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if target in held:
                    held[target].add(pid)
            with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as f:
                for line in f:
                    if SHM_DIR in line:
                        path = line.rstrip("\n").split(None, 5)[-1]
                        if path in held:
                            held[path].add(pid)
        except OSError:  # gone, or not ours to read
            continue
    return held


def leftover_shm(before: dict[str, int], *, run_pids: Collection[int],
                 prefixes: Collection[str] = (), shm_dir: str = SHM_DIR) -> list[ShmEntry]:
    """Entries created since ``before`` and not held by any process outside ``run_pids``."""
    after = snapshot_shm(shm_dir)
    fresh = [n for n, ino in after.items() if before.get(n) != ino and _matches(n, prefixes)]
    paths = {os.path.join(shm_dir, n): n for n in fresh}
    holders = shm_holders(paths.keys())
    out = []
    for path, name in sorted(paths.items()):
        pids = holders.get(path, set())
        if pids - set(run_pids):
            continue  # a live entry of some other program
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            continue  # removed while we looked: not a leftover
        kind = LeakKind.SEMAPHORE if name.startswith("sem.") else LeakKind.SHM_SEGMENT
        out.append(ShmEntry(name=name, kind=kind, size=size, held_by=tuple(sorted(pids))))
    return out


def unlink_entries(entries: Iterable[ShmEntry], shm_dir: str = SHM_DIR) -> list[ShmEntry]:
    """Remove leftovers (after they were reported); returns them marked ``unlinked``."""
    out = []
    for e in entries:
        try:
            os.unlink(os.path.join(shm_dir, e.name))
            done = True
        except FileNotFoundError:
            done = True
        except OSError:
            done = False
        out.append(ShmEntry(name=e.name, kind=e.kind, size=e.size, held_by=e.held_by,
                            unlinked=done))
    return out


def shm_verdicts(entries: Iterable[ShmEntry], *, prefixes: Collection[str] = ()) -> list[Verdict]:
    entries = list(entries)
    scope = f" matching {', '.join(prefixes)}" if prefixes else ""
    out = []
    for kind, noun in ((LeakKind.SHM_SEGMENT, "segment"), (LeakKind.SEMAPHORE, "semaphore")):
        mine = [e for e in entries if e.kind is kind]
        if mine:
            out.append(Verdict(kind=kind, status=Status.LEAK,
                               summary=f"{len(mine)} {noun}(s) created during the run{scope} "
                                       "still exist; unlink what you create",
                               details=tuple(e.describe() for e in mine)))
        else:
            out.append(Verdict(kind=kind, status=Status.CLEAN,
                               summary=f"no new {noun}{scope} left in {SHM_DIR}"))
    return out
