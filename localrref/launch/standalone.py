"""The supervisor of a world met through a rendezvous: its own process, watching pids.

``launch/join.py`` starts it when the first process arrives at a rendezvous
(``python -m localrref.launch.standalone WORLD_DIR ...``, in a session of
its own, so that signals meant for the program's process group and the
death of whoever started it do not stop it). It is the supervisor of
``supervisor.py`` without the children: it did not start the workers, so it
watches them by pid (``pidfd_open``), and learns who they are from their
``Joined`` messages. Then, as there::

    member pidfd readable        -> Roster.exited(rank)    a death? PeerExited to every live
    Leaving in its inbox         -> Roster.leaving(...)    member; the shutdown barrier
                                                           learns of the departure either way
    Joined in its inbox          -> Roster.joined(...), pidfd_open(pid)
    ArrivalRefused in its inbox  -> to every member, and to any that joins later: a
                                    process refused at the rendezvous left a rank
                                    empty, so this world cannot form; the world
                                    then stays REFUSAL_LINGER_S after the last member
                                    goes, for stragglers to find the refusal
    other control messages       -> ControlDispatcher (graceful-shutdown barrier, leak reports)
    every member departed        -> sweep the world's segments, remove its inboxes and
                                    directory (and the record, if it is still this world's)

A member that leaves after a graceful shutdown is no death (``Roster``);
one that leaves without one, or vanishes, is; as the supervisor is not its
parent, the exit code of one that vanished is unknown
(``PeerExited.exitcode`` is None).

Torch-free: it starts in a few tens of milliseconds.
"""

from __future__ import annotations

import argparse
import os
import select
import sys
import time
from dataclasses import dataclass

from localrref.control_messages import ArrivalRefused, Control, Joined, Leaving, PeerExited
from localrref.launch import rendezvous_dir
from localrref.launch.control import ControlDispatcher, format_leak_line
from localrref.launch.inbox import InboxReader, send_control
from localrref.launch.rendezvous import REFUSAL_LINGER_S
from localrref.transport import wire
from localrref.transport.fifo import open_fifos
from localrref.transport.segment import sweep_world_segments

__all__ = ["Roster", "ExitVerdict", "main"]

NOTIFY_TIMEOUT = 1.0
# A founder that dies before its Joined reaches us leaves nobody to watch:
# give the world this long to show a member, then clean up.
FIRST_MEMBER_TIMEOUT = 60.0


@dataclass(frozen=True, slots=True)
class ExitVerdict:
    """What one member's exit means: tell its peers (a death)? and the dispatcher's exit code."""

    death: bool
    exitcode: int | None


class Roster:
    """The members a rendezvous supervisor watches, and what each departure means. Pure.

    A member departs once: by ``Leaving`` (its agent closed; the process may
    live on, and may even join a new world) or by its process ending. Only
    the first counts. Departing after a graceful shutdown is no death;
    leaving without one, or vanishing, is: peers that still run may have
    calls to it in flight, which must fail now, not at their timeout.
    """

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.pids: dict[int, int] = {}          # rank -> pid, of every member that joined
        self._departed: set[int] = set()

    def joined(self, message: Joined) -> bool:
        """Record a member; False if the rank is taken or out of range (then ignore it)."""
        if not 0 <= message.rank < self.world_size:
            return False
        if message.rank in self.pids:
            return self.pids[message.rank] == message.pid and message.rank not in self._departed
        self.pids[message.rank] = message.pid
        return True

    def leaving(self, message: Leaving) -> ExitVerdict | None:
        """Member ``message.rank`` left; None if it had departed already (or never joined)."""
        return self._depart(message.rank, graceful=message.graceful)

    def exited(self, rank: int) -> ExitVerdict | None:
        """Member ``rank``'s process is gone; None if it had left before."""
        return self._depart(rank, graceful=False)

    def _depart(self, rank: int, *, graceful: bool) -> ExitVerdict | None:
        if rank not in self.pids or rank in self._departed:
            return None
        self._departed.add(rank)
        return ExitVerdict(death=not graceful, exitcode=0 if graceful else None)

    def live(self) -> list[int]:
        """Members that have not departed: who gets notices."""
        return sorted(r for r in self.pids if r not in self._departed)

    @property
    def done(self) -> bool:
        """Someone joined, and every member that joined has departed."""
        return bool(self.pids) and self._departed >= self.pids.keys()


class _Supervisor:
    def __init__(self, world_dir: str, world_id: str, world_size: int, key_dir: str,
                 shutdown_timeout: float, arrive_timeout: float) -> None:
        self.world_dir = world_dir
        self.world_id = world_id
        self.world_size = world_size
        self.key_dir = key_dir
        self.inboxes = open_fifos(world_dir, world_size + 1)
        self.roster = Roster(world_size)
        self.dispatcher = ControlDispatcher(world_size, self._send,
                                            phase_timeout=shutdown_timeout,
                                            arrive_timeout=arrive_timeout)
        self.dispatcher.register(Joined, self._on_joined)
        self.dispatcher.register(Leaving, self._on_leaving)
        self.dispatcher.register(ArrivalRefused, self._on_arrival_refused)
        self.refused: ArrivalRefused | None = None
        self.refused_until: float | None = None  # time.monotonic()
        self.pidfds: dict[int, int] = {}  # pidfd -> rank

    def run(self) -> None:
        reader = InboxReader(self.inboxes[self.world_size])
        first_deadline = time.monotonic() + FIRST_MEMBER_TIMEOUT
        try:
            while not self.roster.done:
                deadlines = [d for d in (self.dispatcher.deadline,
                                         None if self.roster.pids else first_deadline)
                             if d is not None]
                timeout = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
                ready = select.select([reader, *self.pidfds], [], [], timeout)[0]
                if reader in ready:
                    self._dispatch_all(reader)
                self.dispatcher.check_deadline(time.monotonic())
                for fd in [fd for fd in self.pidfds if fd in ready]:
                    self._exited(self.pidfds.pop(fd))
                    os.close(fd)
                if not self.roster.pids and time.monotonic() >= first_deadline:
                    break
            self._dispatch_all(reader)
            if self.refused_until is not None:
                # Keep the doomed world's record for the stragglers of the
                # same start (REFUSAL_LINGER_S); the founder waits for us.
                time.sleep(max(0.0, self.refused_until - time.monotonic()))
            for leak in self.dispatcher.leaks:  # the launcher's report, on the founder's stderr
                print(format_leak_line(leak), file=sys.stderr, flush=True)
        finally:
            reader.close()
            for fd in self.pidfds:
                os.close(fd)
            for inbox in self.inboxes:
                inbox.close()
            sweep_world_segments(self.world_id)
            rendezvous_dir.remove_world(self.key_dir, self.world_id)

    def _dispatch_all(self, reader: InboxReader) -> None:
        for src, frame in reader.read_available():
            try:
                control = wire.decode_control(frame)
            except ValueError as exc:
                _say(f"dropped a frame from rank {src}: {exc}")
                continue
            self.dispatcher.dispatch(src, control)

    def _on_joined(self, src: int, message: Joined) -> None:
        if not self.roster.joined(message):
            _say(f"ignored a second member for rank {message.rank} (pid {message.pid})")
            return
        if not rendezvous_dir.same_process(message.pid, message.started):
            self._exited(message.rank)  # gone before we could watch it
            return
        try:
            fd = os.pidfd_open(message.pid)
        except ProcessLookupError:
            self._exited(message.rank)
            return
        self.pidfds[fd] = message.rank
        if self.refused is not None:
            self._send(message.rank, self.refused)  # it joined before the refusal

    def _on_arrival_refused(self, src: int, message: ArrivalRefused) -> None:
        # Passed on from here, in order with the deaths it will cause: every
        # member hears why the world cannot form before it hears of them.
        self.refused = message
        self.refused_until = time.monotonic() + REFUSAL_LINGER_S
        for rank in self.roster.live():
            self._send(rank, message)

    def _on_leaving(self, src: int, message: Leaving) -> None:
        self._departed(message.rank, self.roster.leaving(message), left=True,
                       formed=message.formed)

    def _exited(self, rank: int) -> None:
        self._departed(rank, self.roster.exited(rank), left=False)

    def _departed(self, rank: int, verdict: ExitVerdict | None, *, left: bool,
                  formed: bool = False) -> None:
        if verdict is None:
            return
        if verdict.death:
            notice = PeerExited(rank=rank, pid=self.roster.pids[rank], exitcode=verdict.exitcode,
                                left=left, formed=formed)
            for peer in self.roster.live():
                self._send(peer, notice)
        self.dispatcher.on_worker_exit(rank, verdict.exitcode)

    def _send(self, rank: int, control: Control) -> None:
        if rank in self.roster.pids and rank not in self.roster.live():
            return  # departed: nobody reads its inbox any more
        if not send_control(self.inboxes[rank], self.world_size, control, NOTIFY_TIMEOUT):
            _say(f"could not send {type(control).__name__} to rank {rank}: its inbox stayed "
                 f"full for {NOTIFY_TIMEOUT:g}s")


def _say(message: str) -> None:
    print(f"localrref supervisor: {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m localrref.launch.standalone")
    parser.add_argument("key_dir")
    parser.add_argument("world_id")
    parser.add_argument("world_size", type=int)
    parser.add_argument("--shutdown-timeout", type=float, default=30.0)
    parser.add_argument("--arrive-timeout", type=float, default=0.0)
    parser.add_argument("--ready-fd", type=int, default=-1,
                        help="write one byte here once the inboxes are open")
    args = parser.parse_args(argv)
    world_dir = os.path.join(args.key_dir, args.world_id)
    supervisor = _Supervisor(world_dir, args.world_id, args.world_size, args.key_dir,
                             args.shutdown_timeout, args.arrive_timeout)
    if args.ready_fd >= 0:
        try:
            os.write(args.ready_fd, b"1")
        except BrokenPipeError:
            pass  # the founder is gone; the members it told of this world need us still
        os.close(args.ready_fd)
    # The world's end takes the rendezvous lock, and graceful members wait
    # for that end: load the lock's module now, while the world runs.
    import filelock  # noqa: F401
    supervisor.run()
    return 0


if __name__ == "__main__":
    code = main()
    # Members that shut down gracefully wait for this process to end; the
    # world is cleaned up and every report flushed, so skip the interpreter's
    # teardown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
