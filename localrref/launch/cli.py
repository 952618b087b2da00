"""Command-line parsing for ``python -m localrref.launch`` (torchrun's flags, one node).

Every option takes both spellings (``--nproc-per-node`` / ``--nproc_per_node``)
and defaults from ``PET_<DEST>`` in the environment, as torchrun's do. The
result is a validated, frozen :class:`LaunchConfig`; :mod:`launcher` runs it.

Multi-node settings (``--nnodes`` above 1, ``--node-rank`` other than 0, a
rendezvous backend or endpoint that is not this host) are rejected with an
error pointing at torchrun + ``torch.distributed.rpc``.
"""

from __future__ import annotations

import argparse
import os
import signal
import uuid
from dataclasses import dataclass
from typing import Any

from localrref.launch.stdio import Std, parse_std

__all__ = ["get_args_parser", "parse_args", "LaunchConfig", "config_from_args", "UsageError"]

SINGLE_NODE_HINT = (
    "localrref's launcher runs every worker on this one machine; for several nodes start "
    "the same script with torchrun: its workers then run on torch.distributed.rpc "
    "(localrref hands the world over, see localrref.handover)."
)
_LOCAL_HOSTS = {"", "localhost", "127.0.0.1", "::1", "[::1]", "0.0.0.0"}


class UsageError(ValueError):
    """The command line asks for something localrref cannot do; the message says why."""


class _Env(argparse.Action):
    """A value option whose default comes from ``PET_<DEST>`` (torchrun's ``env`` action)."""

    def __init__(self, dest: str, default: Any = None, required: bool = False, **kwargs: Any) -> None:
        default = os.environ.get(f"PET_{dest.upper()}", default)
        super().__init__(dest=dest, default=default, required=required and not default, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, values)


class _EnvFlag(argparse.Action):
    """A flag that is also on when ``PET_<DEST>`` is a non-zero integer (torchrun's ``check_env``)."""

    def __init__(self, dest: str, default: bool = False, **kwargs: Any) -> None:
        default = bool(int(os.environ.get(f"PET_{dest.upper()}", "1" if default else "0")))
        super().__init__(dest=dest, const=True, default=default, nargs=0, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, True)


def _spellings(name: str) -> list[str]:
    return [f"--{name}", f"--{name.replace('-', '_')}"] if "-" in name else [f"--{name}"]


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m localrref.launch",
        description="Start N localrref worker processes on this machine (torchrun's flags).",
    )

    def value(name: str, *short: str, **kwargs: Any) -> None:
        parser.add_argument(*short, *_spellings(name), action=_Env, **kwargs)

    def flag(name: str, *short: str, help: str) -> None:
        parser.add_argument(*short, *_spellings(name), action=_EnvFlag, help=help)

    value("nproc-per-node", type=str, default="1",
          help="Number of workers: an integer, or 'cpu'/'auto' for one per CPU.")
    flag("standalone", help="Accepted for torchrun compatibility (localrref is always standalone).")
    value("nnodes", type=str, default="1:1", help="Must be 1 (or 1:1): localrref is single-node.")
    value("node-rank", type=int, default=0, help="Must be 0: localrref is single-node.")
    value("rdzv-backend", type=str, default="static", help="Only static/c10d on this host are accepted.")
    value("rdzv-endpoint", type=str, default="", help="Only a local endpoint is accepted.")
    value("rdzv-id", type=str, default="none", help="Run id (names the log directory).")
    value("rdzv-conf", type=str, default="", help="Accepted and ignored.")
    value("max-restarts", type=int, default=0, help="Restart the whole worker group up to N times.")
    value("monitor-interval", type=float, default=0.1,
          help="Seconds between checks for a launcher signal (worker exits are seen at once).")
    value("start-method", type=str, default="spawn", choices=["spawn", "fork", "forkserver"],
          help="multiprocessing start method for the workers.")
    value("role", type=str, default="default", help="Worker role name (ROLE_NAME).")
    flag("module", "-m", help="Run the target as a module, like `python -m`.")
    flag("no-python", help="Exec the target directly instead of running it with Python "
                           "(such workers get no localrref world).")
    flag("run-path", help="Run the script with runpy.run_path (what localrref always does).")
    value("log-dir", type=str, default=None, help="Base directory for worker logs and error files.")
    value("redirects", "-r", type=str, default="0",
          help="Redirect worker streams to log files: 0 none, 1 stdout, 2 stderr, 3 both, "
               "or per rank like 0:3,1:1.")
    value("tee", "-t", type=str, default="0",
          help="Like --redirects, but also echo to the console with a [<role><local rank>]: prefix (torchrun's, e.g. [default0]:).")
    value("local-ranks-filter", type=str, default="",
          help="Only show console output of these ranks, e.g. 0,1.")
    value("master-addr", type=str, default="127.0.0.1", help="Exported as MASTER_ADDR.")
    value("master-port", type=int, default=None, help="Exported as MASTER_PORT (default: a free port).")
    value("signals-to-handle", type=str, default="SIGTERM,SIGINT,SIGHUP,SIGQUIT",
          help="Signals that make the launcher stop the workers (forwarding the signal).")
    value("shutdown-timeout", type=int, default=None,
          help="Seconds between the stop signal and SIGKILL (default: "
               "TORCH_ELASTIC_SHUTDOWN_TIMEOUT or 30).")
    flag("strict-leaks", help="Fail the run if any RRef leaked (also LOCALRREF_STRICT_LEAKS=1).")
    flag("record-creation-sites",
         help="Record where RRefs are created, for leak reports (also LOCALRREF_RECORD_CREATION_SITES=1).")
    parser.add_argument("training_script", type=str, help="The script (or module, or command) to run.")
    parser.add_argument("training_script_args", nargs=argparse.REMAINDER)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return get_args_parser().parse_args(argv)


@dataclass(frozen=True, slots=True, kw_only=True)
class LaunchConfig:
    """Everything the launcher needs, validated."""

    nprocs: int
    run_id: str
    role: str
    mode: str  # "path" | "module" | "exec" (see bootstrap.RunScript)
    target: str
    target_args: tuple[str, ...]
    max_restarts: int
    monitor_interval: float
    start_method: str
    log_dir: str | None
    redirects: Std | dict[int, Std]
    tee: Std | dict[int, Std]
    local_ranks_filter: frozenset[int] | None
    master_addr: str
    master_port: int | None
    signals_to_handle: tuple[signal.Signals, ...]
    shutdown_timeout: float | None
    strict_leaks: bool | None  # None: LOCALRREF_STRICT_LEAKS decides
    record_creation_sites: bool | None  # None: LOCALRREF_RECORD_CREATION_SITES decides

    @property
    def redirects_anything(self) -> bool:
        """Some worker stream goes only to a log file (so the files must be kept)."""
        values = self.redirects.values() if isinstance(self.redirects, dict) else [self.redirects]
        return any(value != Std.NONE for value in values)


def _parse_nnodes(text: str) -> tuple[int, int]:
    parts = text.split(":")
    try:
        if len(parts) == 1:
            return int(parts[0]), int(parts[0])
        if len(parts) == 2:
            return int(parts[0]), int(parts[1])
    except ValueError:
        pass
    raise UsageError(f'--nnodes={text} is not in "N" or "MIN:MAX" format')


def _nprocs(text: str) -> int:
    if text in ("cpu", "auto"):
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        nprocs = int(text)
    except ValueError:
        raise UsageError(f"--nproc-per-node={text}: give a number of workers (or 'cpu'/'auto'); "
                         "localrref runs CPU processes, not one per GPU") from None
    if nprocs < 1:
        raise UsageError(f"--nproc-per-node must be >= 1, got {nprocs}")
    return nprocs


def _check_single_node(args: argparse.Namespace) -> None:
    _, max_nodes = _parse_nnodes(args.nnodes)
    if max_nodes != 1:
        raise UsageError(f"--nnodes={args.nnodes} asks for several nodes. {SINGLE_NODE_HINT}")
    if args.node_rank != 0:
        raise UsageError(f"--node-rank={args.node_rank} only makes sense with several nodes. "
                         f"{SINGLE_NODE_HINT}")
    if args.rdzv_backend not in ("static", "c10d"):
        raise UsageError(f"--rdzv-backend={args.rdzv_backend} is a multi-node rendezvous. "
                         f"{SINGLE_NODE_HINT}")
    host = args.rdzv_endpoint.rsplit(":", 1)[0] if args.rdzv_endpoint else ""
    if host not in _LOCAL_HOSTS:
        raise UsageError(f"--rdzv-endpoint={args.rdzv_endpoint} points at another host. "
                         f"{SINGLE_NODE_HINT}")


def _signals(text: str) -> tuple[signal.Signals, ...]:
    result = []
    for name in filter(None, (part.strip() for part in text.split(","))):
        try:
            result.append(signal.Signals[name if name.startswith("SIG") else f"SIG{name}"])
        except KeyError:
            raise UsageError(f"--signals-to-handle: unknown signal {name!r}") from None
    return tuple(result)


def config_from_args(args: argparse.Namespace) -> LaunchConfig:
    """Validate parsed arguments into a :class:`LaunchConfig`.

    Raises:
        UsageError: Multi-node settings, conflicting flags or malformed values.
    """
    _check_single_node(args)
    if args.module and args.no_python:
        raise UsageError("Don't use both the '--no-python' flag and the '--module' flag at the same time.")
    if args.max_restarts < 0:
        raise UsageError(f"--max-restarts must be >= 0, got {args.max_restarts}")
    try:
        redirects, tee = parse_std(args.redirects), parse_std(args.tee)
    except ValueError as exc:
        raise UsageError(f"--redirects/--tee: {exc}") from None
    ranks_filter = None
    if args.local_ranks_filter:
        try:
            ranks_filter = frozenset(int(r) for r in args.local_ranks_filter.split(","))
        except ValueError:
            raise UsageError("--local-ranks-filter must be a comma-separated list of integers "
                             "e.g. --local-ranks-filter=0,1,2") from None
    # None: the default (30 s for the stop ladder; no bound on waiting for
    # workers that are still running application code before shutdown()).
    if args.shutdown_timeout is not None:
        shutdown_timeout = float(args.shutdown_timeout)
    elif os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT"):
        shutdown_timeout = float(os.environ["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"])
    else:
        shutdown_timeout = None
    if args.standalone or args.rdzv_id == "none":
        run_id = str(uuid.uuid4())
    else:
        run_id = args.rdzv_id
    mode = "module" if args.module else "exec" if args.no_python and not args.run_path else "path"
    return LaunchConfig(
        nprocs=_nprocs(args.nproc_per_node),
        run_id=run_id,
        role=args.role,
        mode=mode,
        target=args.training_script,
        target_args=tuple(args.training_script_args),
        max_restarts=args.max_restarts,
        monitor_interval=args.monitor_interval,
        start_method=args.start_method,
        log_dir=args.log_dir,
        redirects=redirects,
        tee=tee,
        local_ranks_filter=ranks_filter,
        master_addr=args.master_addr,
        master_port=int(args.master_port) if args.master_port is not None else None,
        signals_to_handle=_signals(args.signals_to_handle),
        shutdown_timeout=shutdown_timeout,
        strict_leaks=args.strict_leaks or None,
        record_creation_sites=args.record_creation_sites or None,
    )
