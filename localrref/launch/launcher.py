"""``python -m localrref.launch``: run a script in N workers, torchrun-style, on one node.

Flow of one run::

    main(argv) -> cli.config_from_args -> Launcher.run()
      for attempt in 0..max_restarts:
        LogLayout.make_attempt        <run_dir>/attempt_<n>/<rank>/
        WorkerGroup(jobs = RunScript, plans = torchrun env + streams + error file).start()
        TeePump.start()               (only for tee'd streams)
        main thread: group.wait(monitor_interval) until done / failed / launcher signalled
          failed   -> group.stop(SIGTERM, shutdown_timeout); restart if any left
          signal   -> group.stop(that signal, shutdown_timeout); exit 1
        TeePump.close(); Failure.observe(error.json) per failed rank; group.close()
      last failure -> torchrun's failure summary on stderr, exit 1

Signals: handlers for ``--signals-to-handle`` only record the signal (a second
one escalates the running stop to SIGKILL); the main thread notices within
``--monitor-interval``. Nothing is raised from a signal handler.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import sys
from dataclasses import dataclass
from types import FrameType

from localrref.launch import errorfile
from localrref.launch.bootstrap import ChildPlan, RunScript, Stream
from localrref.launch.cli import LaunchConfig, UsageError, config_from_args, get_args_parser
from localrref.launch.control import describe_leaks, format_leak_line, write_leak_report
from localrref.launch.stdio import LogLayout, Std, TeePump, TeeSource, line_prefix, std_for_rank
from localrref.launch.supervisor import RunOptions, WorkerGroup, new_world_id

__all__ = ["main", "Launcher", "AttemptResult"]

_OMP_BANNER = (
    "\n*****************************************\n"
    "Setting OMP_NUM_THREADS environment variable for each process to be "
    "1 in default, to avoid your system being overloaded, "
    "please further tune the variable for optimal performance in "
    "your application as needed. \n"
    "*****************************************"
)


def _say(message: str) -> None:
    print(f"localrref.launch: {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True, slots=True, kw_only=True)
class AttemptResult:
    """How one attempt ended: ``failures`` in observation order, ``signum`` if the launcher was signalled."""

    failures: list[errorfile.Failure]
    signum: int | None
    leaks: list[dict]


class Launcher:
    """Runs one :class:`LaunchConfig` to completion; :meth:`run` returns the exit code."""

    def __init__(self, config: LaunchConfig) -> None:
        self.config = config
        self.options = RunOptions.resolve(strict_leaks=config.strict_leaks,
                                          record_creation_sites=config.record_creation_sites,
                                          shutdown_timeout=config.shutdown_timeout)
        self._signum: int | None = None
        self._group: WorkerGroup | None = None
        self._master_port = config.master_port or _free_port(config.master_addr)

    def run(self) -> int:
        config = self.config
        if "OMP_NUM_THREADS" not in os.environ and config.nprocs > 1:
            print(_OMP_BANNER, file=sys.stderr, flush=True)
            # Inherited by spawned workers at exec time, as with torchrun.
            os.environ["OMP_NUM_THREADS"] = "1"
        if config.start_method == "forkserver":
            # Workers then fork from a server that imported localrref (and so
            # torch) once, instead of importing it ~1 s apiece. This process
            # is ours, so the global setting touches nobody else.
            multiprocessing.set_forkserver_preload(["localrref.launch.bootstrap"])
        previous = self._install_signal_handlers()
        layout = LogLayout.create(config.log_dir, config.run_id)
        keep_logs = config.redirects_anything
        try:
            for attempt in range(config.max_restarts + 1):
                result = self._run_attempt(layout, attempt)
                write_leak_report(result.leaks)
                for leak in result.leaks:
                    print(format_leak_line(leak), file=sys.stderr)
                if result.signum is not None:
                    _say(f"received {signal.Signals(result.signum).name}; workers stopped")
                    return 1
                if not result.failures:
                    if result.leaks and self.options.strict_leaks:
                        _say(f"{describe_leaks(result.leaks)} and strict leak checking is on "
                             "(--strict-leaks / LOCALRREF_STRICT_LEAKS=1); failing the run")
                        return 1
                    if result.leaks:
                        _say(f"RRef leak check: {describe_leaks(result.leaks)}, listed above "
                             "(a warning; --strict-leaks makes it an error)")
                    else:
                        _say("RRef leak check: no leaked RRefs")
                    return 0
                left = config.max_restarts - attempt
                if left > 0:
                    root = min(result.failures, key=lambda f: f.timestamp)
                    _say(f"[{config.role}] worker group FAILED (rank {root.rank}, exitcode "
                         f"{root.exitcode}). {left}/{config.max_restarts} attempts left; "
                         "will restart worker group")
                    continue
                print(errorfile.format_failure_summary(config.target, result.failures),
                      file=sys.stderr, flush=True)
                keep_logs = True  # the summary names the error files
                return 1
            raise AssertionError("unreachable: the last attempt always returns")
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            if layout.temporary and keep_logs:
                _say(f"worker logs kept in {layout.run_dir} (pass --log-dir to choose the place)")
            elif layout.temporary:
                layout.remove()

    # ------------------------------------------------------------------ one attempt

    def _run_attempt(self, layout: LogLayout, attempt: int) -> AttemptResult:
        config = self.config
        attempt_dir = layout.make_attempt(attempt, config.nprocs)
        world_id = new_world_id()
        job = RunScript(mode=config.mode, target=config.target, args=config.target_args)
        plans, tee_sources, child_ends = [], [], []
        for rank in range(config.nprocs):
            rank_dir = os.path.join(attempt_dir, str(rank))
            error_file = os.path.join(rank_dir, "error.json")
            streams = {}
            for name, bit, console in (("stdout", Std.OUT, sys.stdout), ("stderr", Std.ERR, sys.stderr)):
                streams[name], source, child_end = self._stream_for(rank, rank_dir, name, bit, console)
                if source is not None:
                    tee_sources.append(source)
                    child_ends.append(child_end)
            plans.append(ChildPlan(error_file=error_file, env=self._env(rank, attempt, error_file),
                                   line_buffered=True, **streams))
        group = WorkerGroup(jobs=[job] * config.nprocs, plans=plans, start_method=config.start_method,
                            options=self.options, world_id=world_id)
        pump = TeePump(tee_sources)
        self._group = group
        try:
            group.start()
        except BaseException:
            pump.close()
            raise
        finally:
            for conn in child_ends:  # the workers hold their own copies now
                conn.close()
        pump.start()
        try:
            while not group.wait(config.monitor_interval):
                if self._signum is not None:
                    break
            if self._signum is not None:
                group.stop(death_sig=self._signum, timeout=self.options.shutdown_timeout)
            elif group.first_failure is not None:
                group.stop(death_sig=signal.SIGTERM, timeout=self.options.shutdown_timeout)
        finally:
            if not group.done:  # an unexpected error in this thread: never leave workers behind
                group.stop(death_sig=signal.SIGKILL, timeout=self.options.shutdown_timeout)
            pump.close()
            self._group = None
        failures = [
            errorfile.Failure.observe(rank=e.rank, local_rank=e.rank, pid=e.pid, exitcode=e.exitcode,
                                      error_file=plans[e.rank].error_file, exited_at=e.exited_at)
            for e in sorted(group.exits().values(), key=lambda e: e.exited_at) if e.exitcode != 0
        ]
        group.close()
        return AttemptResult(failures=failures, signum=self._signum,
                             leaks=list(group.dispatcher.leaks))

    def _stream_for(self, rank: int, rank_dir: str, name: str, bit: Std, console):
        """(Stream for the child, TeeSource or None, the child's pipe end or None)."""
        config = self.config
        log_path = os.path.join(rank_dir, f"{name}.log")
        shown = config.local_ranks_filter is None or rank in config.local_ranks_filter
        if std_for_rank(config.tee, rank) & bit:
            read_end, write_end = multiprocessing.get_context(config.start_method).Pipe(duplex=False)
            source = TeeSource(conn=read_end, log_path=log_path, console=console if shown else None,
                               prefix=line_prefix(rank, config.role))
            return Stream(kind="pipe", conn=write_end), source, write_end
        if std_for_rank(config.redirects, rank) & bit:
            return Stream(kind="file", path=log_path), None, None
        return Stream(kind="inherit" if shown else "devnull"), None, None

    def _env(self, rank: int, attempt: int, error_file: str) -> dict[str, str]:
        config = self.config
        n = str(config.nprocs)
        env = {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": n,
            "LOCAL_WORLD_SIZE": n,
            "GROUP_RANK": "0",
            "GROUP_WORLD_SIZE": "1",
            "ROLE_RANK": str(rank),
            "ROLE_NAME": config.role,
            "ROLE_WORLD_SIZE": n,
            "MASTER_ADDR": config.master_addr,
            "MASTER_PORT": str(self._master_port),
            "TORCHELASTIC_RUN_ID": config.run_id,
            "TORCHELASTIC_RESTART_COUNT": str(attempt),
            "TORCHELASTIC_MAX_RESTARTS": str(config.max_restarts),
            "TORCHELASTIC_ERROR_FILE": error_file,
        }
        if "OMP_NUM_THREADS" in os.environ:
            env["OMP_NUM_THREADS"] = os.environ["OMP_NUM_THREADS"]
        return env

    # ---------------------------------------------------------------------- signals

    def _install_signal_handlers(self) -> dict[int, object]:
        previous = {}
        for signum in self.config.signals_to_handle:
            try:
                previous[signum] = signal.signal(signum, self._on_signal)
            except (OSError, ValueError) as exc:  # e.g. not the main thread
                _say(f"cannot handle {signum.name} ({exc}); a {signum.name} will not stop the workers")
        return previous

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self._signum is None:
            self._signum = signum
        elif self._group is not None:
            self._group.escalate()


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host.strip("[]"), 0))
        return sock.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m localrref.launch``; returns the process exit code."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
    except UsageError as exc:
        parser.error(str(exc))
    return Launcher(config).run()
