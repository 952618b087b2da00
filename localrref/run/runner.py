"""``python -m localrref.run``: the command line, and the choice between running here or launching.

:func:`plan` is pure (argv and environment in, a :class:`Plan` out): without
``--nproc-per-node`` the program runs in this process and starts its own
workers (``torch.multiprocessing.spawn``, ``multiprocessing.Process``, ...);
with it, ``python -m localrref.launch`` starts that many copies, as torchrun
would. Either way :func:`main` prints one notice line, installs the alias
here and hands it to every Python process started from here on.
"""

from __future__ import annotations

import os
import runpy
import sys
from dataclasses import dataclass

from localrref.launch.cli import get_args_parser

from .alias import ENV, install

__all__ = ["Plan", "UsageError", "plan", "main", "SITE_DIR", "NOTICE"]

SITE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "site")
NOTICE = ("localrref.run: torch.distributed.rpc is localrref in this program and every "
          "Python process it starts")
# Options that mean something when the program starts its own workers.
_IN_PROCESS_OPTIONS = {"module", "run_path", "training_script", "training_script_args"}


class UsageError(ValueError):
    """The command line cannot be run as given; the message says how to fix it."""


@dataclass(frozen=True, slots=True)
class Plan:
    """Run ``target`` here (``launch_argv`` None) or hand ``launch_argv`` to the launcher."""

    target: str
    args: tuple[str, ...]
    module: bool
    launch_argv: tuple[str, ...] | None


def plan(argv: list[str], environ: dict[str, str]) -> Plan:
    """Decide how to run ``argv`` (the runner's arguments, without the program name)."""
    parser = get_args_parser()
    parser.prog = "python -m localrref.run"
    parser.description = ("Run a program written for torch.distributed.rpc on localrref, unchanged. "
                          "Without --nproc-per-node the program runs here and starts its own "
                          "workers; with it, that many copies start, as under torchrun.")
    parser.set_defaults(nproc_per_node=environ.get("PET_NPROC_PER_NODE"))  # None: not given
    args = parser.parse_args(argv)
    defaults = parser.parse_args([args.training_script])
    given = {name for name, value in vars(args).items()
             if value != getattr(defaults, name) and name not in _IN_PROCESS_OPTIONS}
    launching = args.nproc_per_node is not None
    given.discard("nproc_per_node")
    if not launching and given:
        flags = ", ".join(f"--{name.replace('_', '-')}" for name in sorted(given))
        raise UsageError(f"{flags}: these options are for the workers the runner starts; add "
                         "--nproc-per-node N to start N workers, or drop them to run the program "
                         "as it is (it then starts its own workers)")
    if args.no_python:
        raise UsageError("--no-python: the runner runs Python programs (torch.distributed.rpc "
                         "cannot be replaced in another executable)")
    return Plan(target=args.training_script, args=tuple(args.training_script_args),
                module=bool(args.module), launch_argv=tuple(argv) if launching else None)


def child_environment(environ: dict[str, str]) -> dict[str, str]:
    """What the program's children need to find the alias: the switch and our ``sitecustomize``."""
    paths = [p for p in environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != SITE_DIR]
    return {ENV: "1", "PYTHONPATH": os.pathsep.join([SITE_DIR, *paths])}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        how = plan(argv, dict(os.environ))
    except UsageError as exc:
        print(f"python -m localrref.run: error: {exc}", file=sys.stderr)
        return 2
    os.environ.update(child_environment(dict(os.environ)))
    print(NOTICE, file=sys.stderr, flush=True)
    if how.launch_argv is not None:
        from localrref.launch.launcher import main as launch

        return launch(list(how.launch_argv))
    install()
    sys.argv = [how.target, *how.args]
    if how.module:
        sys.path[0] = os.getcwd()  # as `python -m` does
        runpy.run_module(how.target, run_name="__main__", alter_sys=True)
    else:
        if not os.path.exists(how.target):
            print(f"python -m localrref.run: error: can't open file {how.target!r}", file=sys.stderr)
            return 2
        sys.path[0] = os.path.dirname(os.path.abspath(how.target))  # as `python script.py` does
        runpy.run_path(how.target, run_name="__main__")
    return 0
