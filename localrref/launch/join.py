"""Join a world through a rendezvous: ``init_rpc`` in a process no localrref launcher started.

Steps (the decisions are ``rendezvous.decide``; this module does the I/O)::

    init_rpc(name, rank=r, world_size=n)            (api.py: no WorldSpec installed)
      rendezvous = parse_init_method(init_method, os.environ)   env:// tcp:// file://
      join(rendezvous, ...):
        under <root>/rendezvous.lock:
          read <root>/<key>/world.json -> decide():
            Create  -> new world id, <key>/<id>/inbox-0..n (FIFOs), start the supervisor
                       (launch/standalone.py, its own session) without waiting for
                       it, write the record
            Reclaim -> a finished world (or a crashed run's): remove it, then Create
            Join    -> add this member to the record
            Refuse  -> RuntimeError naming the problem and the fix; a refusal that
                       leaves a rank empty (a name taken twice) first marks the
                       record and tells the supervisor (ArrivalRefused), which
                       tells every member, so their init_rpc fails too
        open every inbox; tell the supervisor: Joined(rank, pid, start time)
        the founder: Membership.confirm_supervisor() waits until the supervisor
          reads its inbox (it started meanwhile, while others joined)
      -> Membership: the WorldSpec the agent runs on, and leave()

    shutdown() / exit:  Membership.leave(graceful)
        Leaving(rank, graceful) -> supervisor (an exit that follows is no death)
        under the lock: mark this member left; if the supervisor is gone and every
        member left or died, nobody else will clean up: remove the world ourselves

The supervisor is a child of the founder only in name (a new session; the
founder reaps it if it ends first, init does otherwise): rank 0 dying is a
death like any other's, seen and reported by the supervisor.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from localrref import world
from localrref.control_messages import ArrivalRefused, Joined, Leaving
from localrref.launch import rendezvous_dir
from localrref.launch.inbox import send_control
from localrref.launch.rendezvous import (REFUSAL_LINGER_S, Arrival, Create, Join, Reclaim,
                                         Refuse, Rendezvous, Wait, WorldRecord, decide,
                                         is_local_host)
from localrref.transport.fifo import FifoInbox, fifo_path, make_fifos, open_fifos
from localrref.transport.segment import new_world_id, sweep_world_segments

__all__ = ["Membership", "join", "check_local", "remote_host", "NotThisHostError"]

_NOTIFY_TIMEOUT = 5.0
# How long a graceful leave waits for the supervisor to finish the world.
_DEPART_WAIT = 10.0
_SUPERVISOR_START_TIMEOUT = 60.0
_SUPERVISOR_EXIT_WAIT = 5.0


class NotThisHostError(RuntimeError):
    """The rendezvous names another machine: the world spans hosts."""


@dataclass(slots=True)
class Membership:
    """This process's place in a rendezvous world, from :func:`join` until :meth:`leave`."""

    rendezvous: Rendezvous
    root: str
    key_dir: str
    spec: world.WorldSpec
    started: int
    supervisor: subprocess.Popen | None = None
    _left: bool = field(default=False)
    _watcher: threading.Thread | None = None
    _stop: tuple[int, int] = (-1, -1)  # leave() wakes the watcher through this pipe
    _pidfd: int = -1  # the supervisor's, open from watch_supervisor() to the end of leave()
    _ready_fd: int = -1  # the founder's: the supervisor writes b"1" here once it reads its inbox

    def confirm_supervisor(self, timeout: float = _SUPERVISOR_START_TIMEOUT) -> None:
        """The founder's last step of :func:`join`, after the lock is released:
        wait until the supervisor it started reads its inbox (at once for
        everyone else, and once it answered).

        Raises:
            RuntimeError: it exited or did not answer within ``timeout``.
        """
        fd, self._ready_fd = self._ready_fd, -1
        if fd < 0:
            return
        try:
            readable, _, _ = select.select([fd], [], [], timeout)
            if readable and os.read(fd, 1) == b"1":
                return
        finally:
            os.close(fd)
        try:
            # Readable without its byte: it exited (the pipe's end closed with it).
            code = self.supervisor.wait(_SUPERVISOR_EXIT_WAIT if readable else 0)
        except subprocess.TimeoutExpired:
            code = None
            self.supervisor.kill()
            self.supervisor.wait()
        raise RuntimeError(
            f"the localrref supervisor of the world at {self.key_dir} did not start "
            f"({'exit code ' + str(code) if code is not None else f'no answer in {timeout:g} s'}); "
            f"its errors, if any, are on this process's stderr")

    def watch_supervisor(self, on_gone: Callable[[str], None]) -> None:
        """Call ``on_gone(reason)`` from a daemon thread if the supervisor dies before we leave.

        Without it nobody reports deaths or drives the shutdown barrier: a
        graceful shutdown must fail at once, naming the cause, rather than
        wait for a barrier that will never come.
        """
        try:
            self._pidfd = pidfd = os.pidfd_open(self.spec.supervisor_pid)
        except ProcessLookupError:
            pidfd = -1
        self._stop = stop_r, _ = os.pipe2(os.O_CLOEXEC)

        def watch() -> None:
            ready = select.select([stop_r] + ([pidfd] if pidfd >= 0 else []), [], [])[0]
            if stop_r not in ready:
                on_gone(f"the localrref supervisor of this world (pid "
                        f"{self.spec.supervisor_pid}) died: nobody reports deaths or "
                        f"drives the shutdown barrier any more; call "
                        f"shutdown(graceful=False)")

        self._watcher = threading.Thread(target=watch, name="localrref-supervisor-watch",
                                         daemon=True)
        self._watcher.start()

    def leave(self, graceful: bool, formed: bool = False) -> None:
        """Leave the world (idempotent); call once this process's agent is closed.

        ``formed``: this process's ``init_rpc`` had returned (``Leaving.formed``).
        """
        if self._left:
            return
        self._left = True
        if self._watcher is not None:
            os.write(self._stop[1], b"x")
            self._watcher.join()
            for fd in self._stop:
                os.close(fd)
        spec = self.spec
        try:
            send_control(spec.supervisor_inbox, spec.rank,
                         Leaving(rank=spec.rank, graceful=graceful, formed=formed),
                         _NOTIFY_TIMEOUT)
        finally:
            for inbox in spec.inboxes:
                inbox.close()
        doomed = False
        with rendezvous_dir.locked(self.root):
            record = rendezvous_dir.read_record(self.key_dir)
            if record is None or record.world_id != spec.world_id:
                pass  # reclaimed already: a newer world took the key
            else:
                doomed = bool(record.refused)
                record = record.leaving(spec.rank, os.getpid())
                if (record.finished(rendezvous_dir.same_process)
                        and not rendezvous_dir.same_process(record.supervisor_pid,
                                                            record.supervisor_started)):
                    # The supervisor died: nobody else will clean up.
                    _remove_locked(self.key_dir, record)
                else:
                    rendezvous_dir.write_record(self.key_dir, record)
        if self._pidfd >= 0:
            if doomed and self.supervisor is not None:
                # The supervisor of a world a refusal doomed outlives its
                # members by REFUSAL_LINGER_S (launch/standalone.py); as its
                # parent, wait and reap it, or it would be left to init.
                select.select([self._pidfd], [], [], REFUSAL_LINGER_S + _DEPART_WAIT)
            elif graceful:
                # Every member passed the shutdown barrier and is leaving too:
                # the supervisor prints the leak report, cleans up and exits at
                # once. Waiting for it means that when the program ends its
                # world is gone and the report came before the program's end.
                select.select([self._pidfd], [], [], _DEPART_WAIT)
            os.close(self._pidfd)
            self._pidfd = -1
        if self.supervisor is not None:
            self.supervisor.poll()  # reap it if it is done (else init will)


def remote_host(rendezvous: Rendezvous) -> str | None:
    """The rendezvous host if it is another machine, else None."""
    if rendezvous.host is None or is_local_host(rendezvous.host, (), ()):
        return None  # loopback: no need to look up this machine's names
    return None if is_local_host(rendezvous.host, *_this_host()) else rendezvous.host


def check_local(rendezvous: Rendezvous) -> None:
    """Raise NotThisHostError if the rendezvous is on another machine."""
    if remote_host(rendezvous) is None:
        return
    raise NotThisHostError(
        f"init_method {rendezvous.describe()} names another host: this world spans machines, "
        f"and localrref runs worlds of one machine, but LOCALRREF_BACKEND=localrref (or "
        f"init_rpc(backend='localrref')) keeps it here. Unset it and init_rpc hands the world "
        f"over to torch.distributed.rpc (TensorPipe); or set MASTER_ADDR to this machine")


def _this_host() -> tuple[set[str], set[str]]:
    names = {socket.gethostname(), socket.getfqdn()}
    addresses: set[str] = set()
    for name in names:
        with contextlib.suppress(OSError):
            for info in socket.getaddrinfo(name, None):
                addresses.add(info[4][0])
    return names, addresses


def join(rendezvous: Rendezvous, *, rank: int, world_size: int, name: str,
         shutdown_timeout: float, timeout: float = 60.0, strict_leaks: bool = False,
         record_creation_sites: bool = False) -> Membership:
    """Join (or found) the world of ``rendezvous`` on this machine.

    Args:
        timeout: how long to wait for an old world there to end (``Wait``).

    Raises:
        RuntimeError: the decision refuses (its message names the problem
            and the fix), or an old world did not end within ``timeout``;
            RendezvousDirError for an unsafe directory.
    """
    check_local(rendezvous)
    root = rendezvous_dir.runtime_root()
    key_dir = os.path.join(root, rendezvous.key)
    pid = os.getpid()
    started = rendezvous_dir.process_started(pid)
    arrival = Arrival(rank=rank, world_size=world_size, name=name, pid=pid, started=started)
    supervisor = None
    ready_fd = -1
    inboxes = None
    me = _member(arrival)
    deadline = time.monotonic() + timeout
    pause = 0.002
    while True:
        with rendezvous_dir.locked(root):
            record = rendezvous_dir.read_record(key_dir)
            decision = decide(record, arrival, rendezvous, rendezvous_dir.same_process)
            match decision:
                case Refuse(reason=reason, dooms_world=True):
                    # Later arrivals read it in the record; those who joined
                    # hear it from the supervisor, before any death it causes.
                    rendezvous_dir.write_record(key_dir, replace(record, refused=reason))
                    _tell_refused(os.path.join(key_dir, record.world_id), record.world_size,
                                  ArrivalRefused(rank=rank, pid=pid, reason=reason))
                    raise RuntimeError(reason)
                case Refuse(reason=reason):
                    raise RuntimeError(reason)
                case Wait(reason=reason):
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"init_rpc waited {timeout:g} s for the old world to "
                                           f"end: {reason}")
                case Join(record=found):
                    record = found.with_member(me)
                    rendezvous_dir.write_record(key_dir, record)
                case Create() | Reclaim():
                    if isinstance(decision, Reclaim):
                        _remove_locked(key_dir, decision.record, keep_dir=True,
                                       sweep=decision.stale)
                    record, supervisor, ready_fd, inboxes = _found(key_dir, arrival, me,
                                                                   shutdown_timeout)
        if not isinstance(decision, Wait):
            break
        # Peers leave a world within milliseconds of each other after a
        # graceful shutdown; a record has no event to wait on, so look again
        # soon, then less often.
        time.sleep(pause)
        pause = min(pause * 2, 0.05)
    world_dir = os.path.join(key_dir, record.world_id)
    if inboxes is None:
        try:
            inboxes = open_fifos(world_dir, world_size + 1)
        except BaseException:
            if ready_fd >= 0:
                os.close(ready_fd)
            raise
    try:
        spec = world.WorldSpec(world_id=record.world_id, rank=rank, world_size=world_size,
                               inboxes=tuple(inboxes), supervisor_pid=record.supervisor_pid,
                               strict_leaks=strict_leaks,
                               record_creation_sites=record_creation_sites,
                               shutdown_timeout=shutdown_timeout)
        send_control(spec.supervisor_inbox, rank, Joined(rank=rank, pid=pid, started=started),
                     _NOTIFY_TIMEOUT)
    except BaseException:
        for inbox in inboxes:
            inbox.close()
        if ready_fd >= 0:
            os.close(ready_fd)
        raise
    membership = Membership(rendezvous=rendezvous, root=root, key_dir=key_dir, spec=spec,
                            started=started, supervisor=supervisor, _ready_fd=ready_fd)
    # The founder says hello only once its supervisor reads its inbox, so no
    # init_rpc of the world returns before someone watches it.
    try:
        membership.confirm_supervisor()
    except BaseException:
        membership.leave(graceful=False)
        raise
    return membership


def _tell_refused(world_dir: str, world_size: int, refused: ArrivalRefused) -> None:
    """Tell the world's supervisor, which tells every member, that the world cannot
    form (the caller holds the lock, so the world's inboxes are there, held
    open by the founder or the supervisor: a frame written into a FIFO that
    nobody else holds open is gone when this process closes it, see _found);
    best effort: a member that misses it times out."""
    try:
        inbox = FifoInbox(fifo_path(world_dir, world_size))
    except OSError:
        return
    try:
        send_control(inbox, refused.rank, refused, _NOTIFY_TIMEOUT)
    except (OSError, ValueError):
        pass
    finally:
        inbox.close()


def _member(arrival: Arrival):
    from localrref.launch.rendezvous import Member
    return Member(rank=arrival.rank, name=arrival.name, pid=arrival.pid, started=arrival.started)


def _found(key_dir: str, arrival: Arrival, me, shutdown_timeout: float):
    """Create a world (under the lock): its directory, inboxes, supervisor and record.

    Returns the record, the supervisor, the read end of its ready pipe,
    which :meth:`Membership.confirm_supervisor` reads once the lock is
    released, and the world's inboxes, opened here: others join while the
    supervisor starts, since every member holds every inbox open
    (``transport/fifo.py``), so their ``Joined`` waits in its pipe until it
    reads. Opened before the lock is released, so that no process can see
    the world while nobody holds its inboxes: a process refused at the
    rendezvous writes its refusal into the supervisor's inbox and closes it
    (_tell_refused), and a FIFO that nobody else held open would drop it.
    """
    world_id = new_world_id()
    world_dir = os.path.join(key_dir, world_id)
    with contextlib.suppress(FileExistsError):
        os.mkdir(key_dir, 0o700)
    os.mkdir(world_dir, 0o700)
    ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
    inboxes: list = []
    try:
        make_fifos(world_dir, arrival.world_size + 1)
        inboxes = open_fifos(world_dir, arrival.world_size + 1)
        supervisor = subprocess.Popen(
            [sys.executable, "-m", "localrref.launch.standalone", key_dir, world_id,
             str(arrival.world_size), "--shutdown-timeout", str(shutdown_timeout),
             "--ready-fd", str(ready_w)],
            stdin=subprocess.DEVNULL, start_new_session=True, close_fds=True,
            pass_fds=(ready_w,))
    except BaseException:
        for inbox in inboxes:
            inbox.close()
        shutil.rmtree(world_dir, ignore_errors=True)
        os.close(ready_r)
        raise
    finally:
        os.close(ready_w)
    supervisor_started = rendezvous_dir.process_started(supervisor.pid) or 0
    record = WorldRecord(world_id=world_id, world_size=arrival.world_size,
                         supervisor_pid=supervisor.pid, supervisor_started=supervisor_started,
                         members=(me,))
    rendezvous_dir.write_record(key_dir, record)
    return record, supervisor, ready_r, inboxes


def _remove_locked(key_dir: str, record: WorldRecord, *, keep_dir: bool = False,
                   sweep: bool = True) -> None:
    """Remove ``record``'s world (the caller holds the lock)."""
    shutil.rmtree(os.path.join(key_dir, record.world_id), ignore_errors=True)
    if sweep:
        sweep_world_segments(record.world_id)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(key_dir, rendezvous_dir.RECORD_NAME))
    if not keep_dir:
        with contextlib.suppress(OSError):
            os.rmdir(key_dir)
