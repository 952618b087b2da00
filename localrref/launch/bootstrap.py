"""The first code a worker process runs: set up, then hand over to the user.

``worker_main`` is the ``multiprocessing.Process`` target of every worker, for
both ``localrref.spawn`` and ``python -m localrref.launch``. In order it:

1. arranges to die with the supervisor (``PR_SET_PDEATHSIG`` = SIGKILL on
   Linux, then a check that the supervisor did not die before that);
2. applies the per-rank environment (the CLI's torchrun variables);
3. points fds 1 and 2 where the launcher asked (inherit, a file, /dev/null,
   or a pipe the launcher tees), line-buffered for scripts (see below);
4. installs the :class:`~localrref.world.WorldSpec` so ``init_rpc`` finds it;
5. turns the cyclic collector back on, if the worker started with it paused
   (``spawn``; see :mod:`localrref.launch.paused_gc`);
6. runs the job: ``fn(rank, *args)`` (torch.multiprocessing.spawn semantics)
   or a script/module as ``__main__`` (torchrun semantics), recording an
   uncaught exception in the error file before exiting with code 1.

Kept to the stdlib plus ``localrref.world``/``errorfile``: every worker imports
it before any user code, so it must be cheap to import.
"""

from __future__ import annotations

import ctypes
import os
import runpy
import signal
import sys
import traceback
from dataclasses import dataclass, field
from typing import Any

from localrref import world
from localrref.launch import errorfile, paused_gc

__all__ = ["CallFunction", "RunScript", "Stream", "ChildPlan", "worker_main"]

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


@dataclass(frozen=True, slots=True, kw_only=True)
class CallFunction:
    """Run ``fn(rank, *args)``; an exception is recorded and the worker exits with 1."""

    fn: Any
    args: tuple[Any, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class RunScript:
    """Run a program the way torchrun would.

    ``mode`` is ``"path"`` (a script file, like ``python script.py``),
    ``"module"`` (like ``python -m module``) or ``"exec"`` (``--no-python``:
    the process is replaced by the command, so it gets no WorldSpec).
    """

    mode: str
    target: str
    args: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.mode not in ("path", "module", "exec"):
            raise ValueError(f"RunScript mode must be path, module or exec, got {self.mode!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Stream:
    """Where a worker's fd 1 or 2 goes: ``inherit``, ``devnull``, ``file`` (path) or ``pipe`` (conn)."""

    kind: str = "inherit"
    path: str | None = None
    conn: Any = None  # the write end of a multiprocessing Pipe, for "pipe"

    def __post_init__(self) -> None:
        required = {"inherit": (), "devnull": (), "file": ("path",), "pipe": ("conn",)}
        if self.kind not in required:
            raise ValueError(f"Stream kind must be one of {sorted(required)}, got {self.kind!r}")
        for name in required[self.kind]:
            if getattr(self, name) is None:
                raise ValueError(f"Stream kind {self.kind!r} needs {name}")


@dataclass(frozen=True, slots=True, kw_only=True)
class ChildPlan:
    """Per-worker setup the supervisor decides and the child applies."""

    error_file: str
    env: dict[str, str] = field(default_factory=dict)
    stdout: Stream = field(default_factory=Stream)
    stderr: Stream = field(default_factory=Stream)
    line_buffered: bool = False


def worker_main(spec: world.WorldSpec, job: CallFunction | RunScript, plan: ChildPlan) -> None:
    """Process target of every worker (see the module docstring for the steps)."""
    _die_with_supervisor(spec.supervisor_pid)
    os.environ.update(plan.env)
    _redirect(1, plan.stdout)
    _redirect(2, plan.stderr)
    if plan.line_buffered:
        _line_buffer_std_streams()
    world.install(spec)
    paused_gc.resume()
    match job:
        case CallFunction(fn=fn, args=args):
            _call_function(fn, spec.rank, args, plan.error_file)
        case RunScript():
            _run_script(job, plan.error_file)


def _die_with_supervisor(supervisor_pid: int) -> None:
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        # The kernel SIGKILLs us when our parent exits, even if it is SIGKILLed
        # itself (torch's spawn asks for SIGINT, which user code can swallow).
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            err = ctypes.get_errno()
            print(f"localrref: prctl(PR_SET_PDEATHSIG) failed: {os.strerror(err)}; "
                  "this worker may outlive a killed supervisor", file=sys.stderr)
    # The supervisor may have died between fork and prctl; then no signal will
    # come. With forkserver our parent is the fork server, hence the pid check.
    if os.getppid() != supervisor_pid and not _pid_alive(supervisor_pid):
        os._exit(1)
    _release_forkserver_lifeline()


def _release_forkserver_lifeline() -> None:
    # Under forkserver our parent is the fork server, which exits only when
    # every holder of its "alive" pipe is gone, and CPython hands that pipe to
    # each child it forks. If we kept it, a SIGKILLed supervisor would leave the
    # fork server (and so us: our death signal is tied to it) running forever.
    # Dropping it makes the chain supervisor -> fork server -> workers hold.
    forkserver = sys.modules.get("multiprocessing.forkserver")
    server = getattr(forkserver, "_forkserver", None)
    fd = getattr(server, "_forkserver_alive_fd", None)
    if fd is not None:
        os.close(fd)
        server._forkserver_alive_fd = None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _redirect(fd: int, stream: Stream) -> None:
    if stream.kind == "inherit":
        return
    (sys.stdout if fd == 1 else sys.stderr).flush()
    if stream.kind == "pipe":
        os.dup2(stream.conn.fileno(), fd)
        stream.conn.close()
        return
    path = os.devnull if stream.kind == "devnull" else stream.path
    target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.dup2(target, fd)
    finally:
        os.close(target)


def _line_buffer_std_streams() -> None:
    # torchrun runs `python -u` so output is not held back; we flush at every
    # newline instead, which gives the same promptness for line-oriented
    # output and writes each line with one write(2), so lines of different
    # workers sharing a console or pipe never interleave mid-line (with -u,
    # print's text and its newline are two writes).
    for stream in (sys.stdout, sys.stderr):
        # write_through=False too: under -u or PYTHONUNBUFFERED=1 (CI runners
        # often set it) the text layer writes through, two writes per print.
        stream.reconfigure(line_buffering=True, write_through=False)


def _call_function(fn: Any, rank: int, args: tuple[Any, ...], error_file: str) -> None:
    try:
        fn(rank, *args)
    except KeyboardInterrupt:
        pass  # SIGINT: the supervisor is stopping us (torch's _wrap does the same)
    except Exception as exc:
        errorfile.write_error_file(error_file, exc, _user_traceback(exc))
        sys.exit(1)


def _run_script(job: RunScript, error_file: str) -> None:
    if job.mode == "exec":
        sys.stdout.flush()
        sys.stderr.flush()
        os.execvp(job.target, [job.target, *job.args])
    sys.argv = [job.target, *job.args]
    try:
        if job.mode == "path":
            # `python script.py` puts the script's directory first on sys.path.
            sys.path.insert(0, os.path.dirname(os.path.abspath(job.target)))
            runpy.run_path(job.target, run_name="__main__")
        else:
            sys.path.insert(0, os.getcwd())  # as `python -m` does
            runpy.run_module(job.target, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        # torch's @record treats `sys.exit(0)` as success and lets others through.
        if exc.code not in (0, None):
            raise
    except KeyboardInterrupt as exc:
        _print_traceback(exc)
        # Like CPython's main: die *of* SIGINT so the launcher sees the signal.
        sys.stdout.flush()
        sys.stderr.flush()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    except Exception as exc:
        text = _print_traceback(exc)
        # A user's own @record may already have written a more precise file.
        if not os.path.exists(error_file):
            errorfile.write_error_file(error_file, exc, text)
        sys.exit(1)


def _print_traceback(exc: BaseException) -> str:
    text = _user_traceback(exc)
    sys.stderr.write(text)
    sys.stderr.flush()
    return text


# runpy's code objects may say "<frozen runpy>" rather than runpy.__file__.
_INTERNAL_FILES = frozenset({__file__, runpy.__file__, runpy.run_path.__code__.co_filename})


def _user_traceback(exc: BaseException) -> str:
    """The traceback without our and runpy's frames, as if the user code ran directly."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename in _INTERNAL_FILES:
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb))
