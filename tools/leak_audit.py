"""leak_audit: find what a program or a test leaves behind.

Usage::

    python tools/leak_audit.py [options] -- <command ...>
    python tools/leak_audit.py --json --interval 0.05 -- python -m localrref.launch ...

The auditor runs the command, samples its whole process tree every
``--interval`` seconds (RSS, USS, open fds, threads, children per process),
and afterwards reports, per leak kind:

  orphan process              a process of the run still alive (re-parented
                              or not) or a zombie nobody waited for
  leftover /dev/shm segment   created during the run and still there
  leftover semaphore          /dev/shm/sem.* created during the run and still there
  fd growth, thread growth,   a steady rise per step, fitted from the
  memory growth               ``LEAK_AUDIT_STEP {json}`` lines the command
                              prints (see probe_line), or with
                              ``--growth samples`` from the sampled series
  leaked RRef                 the localrref supervisor's leak report (the
                              auditor sets ``LOCALRREF_LEAK_REPORT``), and any
                              probe metric named like ``live_rrefs``

A process belongs to the run if it was seen in the tree or carries
``LEAK_AUDIT_RUN_ID=<run id>`` (set by the auditor, inherited by children).
Processes of the run get ``--patience`` seconds to exit after the command
did. Leftover processes are killed after they are reported
(``--no-kill-orphans`` keeps them) and leftover /dev/shm entries under a --shm-prefix unlinked
(``--no-unlink-shm``). A /dev/shm entry is blamed on the run if it appeared
during it and no other process holds it; on a machine where other programs
use /dev/shm at the same time, pass ``--shm-prefix`` (the world's prefix).

Exit status (a bitmask, so CI can tell leaks apart)::

    0    clean: the command exited 0 and nothing leaked
    1    auditor error (bad usage, internal failure); never combined with others
    2    the audited command failed (non-zero exit, signal, timeout, not started)
    4    orphan process
    8    leftover /dev/shm segment or semaphore
    16   fd growth
    32   thread growth
    64   memory growth
    128  leaked RRef

    e.g. 6 = command failed + orphan process; 136 = leaked RRef + shm leftover.

The same machinery is importable (``pythonpath = ["tools"]`` in pytest)::

    import leak_audit
    report = leak_audit.run_audit([sys.executable, "prog.py"], interval=0.05)
    with leak_audit.Audit() as audit: ...          # a fixture: children, threads, fds, /dev/shm
    audit.report().raise_if_leaking()
    leak_audit.measure_growth(step, warmup=10, times=50).raise_if_leaking()

Imports only psutil, the standard library, localrref's public API (lazily,
when present) and matplotlib (lazily, for ``--plot``).

Layout: this file is the public face. The implementation lives in
``tools/leak_audit/*.py``; setting ``__path__`` below makes that folder this
module's submodules (``leak_audit._growth``...), so ``import leak_audit`` and
``python tools/leak_audit.py`` both work without a package install. The
folder must have no ``__init__.py``: with one, it would shadow this file.
"""

from __future__ import annotations

import os
import sys

__path__ = [os.path.join(os.path.dirname(os.path.abspath(__file__)), "leak_audit")]

from leak_audit._audit import Audit, AuditReport, ThreadInfo, is_infrastructure  # noqa: E402
from leak_audit._cli import main  # noqa: E402
from leak_audit._growth import (  # noqa: E402
    MEMORY_TOLERANCE, PROBE_PREFIX, GrowthReport, ProbePoint, debug_info_probes, fit_growth,
    measure_growth, parse_probe_line, probe_line, process_probes)
from leak_audit._model import (  # noqa: E402
    EXIT_AUDITOR_ERROR, EXIT_BIT, EXIT_CLEAN, EXIT_COMMAND_FAILED, LeakFound, LeakKind,
    LeftoverProcess, MetricGrowth, ProcessRecord, RRefLeak, Sample, ShmEntry, Status, Verdict,
    describe_exit_code)
from leak_audit._procs import MARKER_ENV, kill_processes, wait_for_exit  # noqa: E402
from leak_audit._render import plot_memory  # noqa: E402
from leak_audit._rref import REPORT_ENV, RREF_STATES, read_rref_report  # noqa: E402
from leak_audit._run import RunOptions, RunReport, run_audit  # noqa: E402
from leak_audit._shm import snapshot_shm  # noqa: E402

__all__ = [
    "Audit", "AuditReport", "EXIT_AUDITOR_ERROR", "EXIT_BIT", "EXIT_CLEAN",
    "EXIT_COMMAND_FAILED", "GrowthReport", "LeakFound", "LeakKind", "LeftoverProcess",
    "MARKER_ENV", "MEMORY_TOLERANCE", "MetricGrowth", "PROBE_PREFIX", "ProbePoint",
    "ProcessRecord", "REPORT_ENV", "RREF_STATES", "RRefLeak", "RunOptions", "RunReport",
    "Sample", "ShmEntry", "Status", "ThreadInfo", "Verdict", "debug_info_probes",
    "describe_exit_code", "fit_growth", "is_infrastructure", "kill_processes", "main",
    "measure_growth", "parse_probe_line", "plot_memory", "probe_line", "process_probes",
    "read_rref_report", "run_audit", "snapshot_shm", "wait_for_exit",
]

if __name__ == "__main__":
    sys.exit(main())
