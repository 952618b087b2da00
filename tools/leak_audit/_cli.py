"""The command line: ``python tools/leak_audit.py [options] -- <command ...>``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from ._growth import DEFAULT_BATCHES, MEMORY_TOLERANCE
from ._model import EXIT_AUDITOR_ERROR
from ._render import check_plot_available, plot_memory
from ._run import GROWTH_MODES, run_audit

EPILOG = """\
growth probes: the command may print, once per step of its workload,
  LEAK_AUDIT_STEP {"step": 7, "uss": 123456, "fds": 12, "threads": 4, "live_rrefs": 0}
(leak_audit.probe_line(step) builds it). Series are fitted per "source" (or
"pid"): after --warmup-steps points, every one of --batches batches must grow
and the least-squares slope must exceed the tolerance (default 0 per step for
counts, %d bytes per step for memory; override with --tolerance uss=4096).

exit status (bitmask):
  0 clean   1 auditor error   2 audited command failed
  4 orphan process   8 leftover /dev/shm segment or semaphore   16 fd growth
  32 thread growth   64 memory growth   128 leaked RRef
""" % MEMORY_TOLERANCE


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse exits 2, which here means "command failed"
        self.print_usage(sys.stderr)
        self.exit(EXIT_AUDITOR_ERROR, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="leak_audit.py",
                description="Run a command and report the processes, /dev/shm entries, fds, "
                            "threads, memory and RRefs it leaks.",
                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--interval", type=float, default=0.1, metavar="S",
                   help="seconds between samples of the process tree (default 0.1)")
    p.add_argument("--patience", type=float, default=5.0, metavar="S",
                   help="seconds the run's processes get to exit after the command (default 5)")
    p.add_argument("--timeout", type=float, default=None, metavar="S",
                   help="kill the command's process tree after S seconds (counts as failed)")
    p.add_argument("--kill-orphans", action=argparse.BooleanOptionalAction, default=True,
                   help="kill leftover processes after reporting them (default on)")
    p.add_argument("--unlink-shm", action=argparse.BooleanOptionalAction, default=True,
                   help="unlink leftover /dev/shm entries after reporting them (default on)")
    p.add_argument("--shm-prefix", action="append", default=[], metavar="PREFIX",
                   help="judge only /dev/shm names starting with PREFIX (repeatable)")
    p.add_argument("--growth", choices=GROWTH_MODES, default="auto",
                   help="auto: fit the probe lines the command prints; samples: also fit "
                        "each process's sampled series over time (heuristic); off")
    p.add_argument("--warmup-steps", type=int, default=10, metavar="N",
                   help="probe points dropped per series before fitting (default 10)")
    p.add_argument("--warmup-s", type=float, default=1.0, metavar="S",
                   help="seconds of samples dropped per process before fitting (default 1)")
    p.add_argument("--cooldown-s", type=float, default=1.0, metavar="S",
                   help="seconds of samples dropped at the end of each exited process, its "
                        "teardown, before fitting (default 1)")
    p.add_argument("--batches", type=int, default=DEFAULT_BATCHES, metavar="B",
                   help=f"batches that must all grow for a growth verdict (default "
                        f"{DEFAULT_BATCHES})")
    p.add_argument("--tolerance", action="append", default=[], metavar="METRIC=PER_STEP",
                   help="slope tolerance of one metric, per step (or per second with "
                        "--growth samples); repeatable")
    p.add_argument("--rref-report", metavar="PATH",
                   help="path for LOCALRREF_LEAK_REPORT (default: a temporary file)")
    p.add_argument("--json", nargs="?", const="-", metavar="PATH",
                   help="write the report as JSON to PATH, or to stdout (the command's stdout "
                        "then goes to stderr)")
    p.add_argument("--json-series", action="store_true",
                   help="include every sample of every process in the JSON")
    p.add_argument("--plot", metavar="OUT.png",
                   help="plot memory over time per process (needs matplotlib)")
    p.add_argument("command", nargs=argparse.REMAINDER,
                   help="the command to audit, after --")
    return p


def _tolerances(items: Sequence[str], parser: argparse.ArgumentParser) -> dict[str, float]:
    out = {}
    for item in items:
        metric, sep, value = item.partition("=")
        try:
            out[metric] = float(value)
        except ValueError:
            sep = ""
        if not sep or not metric:
            parser.error(f"--tolerance wants METRIC=NUMBER, e.g. uss=4096; got {item!r}")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        parser.error("no command to audit: put it after --, e.g. "
                     "leak_audit.py -- python -m localrref.launch ...")
    if args.plot:
        try:
            check_plot_available()
        except RuntimeError as exc:
            print(f"leak_audit.py: error: {exc}", file=sys.stderr)
            return EXIT_AUDITOR_ERROR
    json_to_stdout = args.json == "-"
    try:
        report = run_audit(
            command, interval=args.interval, patience=args.patience, timeout=args.timeout,
            kill_orphans=args.kill_orphans, unlink_shm=args.unlink_shm,
            shm_prefixes=tuple(args.shm_prefix), growth=args.growth,
            warmup_steps=args.warmup_steps, warmup_s=args.warmup_s,
            cooldown_s=args.cooldown_s, batches=args.batches,
            tolerance=_tolerances(args.tolerance, parser), rref_report=args.rref_report,
            forward="stderr" if json_to_stdout else "stdout")
    except ValueError as exc:
        parser.error(str(exc))
    text = report.render()
    print(text, file=sys.stderr if json_to_stdout else sys.stdout, flush=True)
    if args.json:
        payload = json.dumps(report.to_json(series=args.json_series), indent=2, default=str)
        if json_to_stdout:
            print(payload, flush=True)
        else:
            with open(args.json, "w", encoding="utf-8") as f:
                f.write(payload + "\n")
    if args.plot:
        try:
            plot_memory(report.processes, args.plot)
        except Exception as exc:  # the audit is done; a failed plot must not hide its verdict
            print(f"leak_audit.py: warning: could not write the plot {args.plot}: {exc}",
                  file=sys.stderr)
    return report.exit_code
