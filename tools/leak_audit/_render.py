"""Reports as text (for people), JSON (for CI) and a memory plot (matplotlib, optional)."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable

from ._model import ProcessRecord, Status, Verdict, describe_exit_code, summarize_samples


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "K", "M", "G"):
        if abs(n) < 1024 or unit == "G":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n:.1f}G"


def _cell(v) -> str:
    return "-" if v is None else str(v)


def process_table(records: Iterable[ProcessRecord]) -> list[str]:
    rows = [("pid", "ppid", "found", "samples", "rss_peak", "uss_peak", "uss_last", "fds_max",
             "thr_max", "kids_max", "end", "command")]
    for rec in sorted(records, key=lambda r: r.create_time):
        s = summarize_samples(rec.samples)
        cmd = " ".join(rec.cmdline) or rec.name
        rows.append((str(rec.pid), str(rec.ppid), rec.found_by, str(s["samples"]),
                     human_bytes(s["rss_peak"]), human_bytes(s["uss_peak"]),
                     human_bytes(s["uss_last"]), _cell(s["fds_max"]), _cell(s["threads_max"]),
                     _cell(s["children_max"]), rec.end_state,
                     cmd if len(cmd) <= 60 else cmd[:57] + "..."))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in rows]


def verdict_lines(verdicts: Iterable[Verdict]) -> list[str]:
    verdicts = list(verdicts)
    width = max((len(v.kind.value) for v in verdicts), default=0)
    out = []
    for v in verdicts:
        out.append(f"  {v.kind.value.ljust(width)}  {v.status.value.upper():7}  {v.summary}")
        out += [f"  {'':{width}}           - {d}" for d in v.details]
    return out


def render_run(report) -> str:
    cmd = " ".join(report.command)
    if report.start_error:
        status = f"did not start: {report.start_error}"
    elif report.timed_out:
        status = f"timed out and was killed after {report.duration:.2f} s"
    elif report.returncode is not None and report.returncode < 0:
        status = f"was killed by signal {-report.returncode} after {report.duration:.2f} s"
    else:
        status = f"exited {report.returncode} after {report.duration:.2f} s"
    lines = [f"leak_audit run {report.run_id[:12]}: `{cmd}` {status}",
             f"sampled every {report.interval:g} s; {len(report.processes)} process(es) seen", ""]
    if report.processes:
        lines += ["PROCESSES"] + process_table(report.processes) + [""]
    if report.growth:
        lines += ["GROWTH FITS"] + ["  " + g.describe() for g in report.growth] + [""]
    if report.probe_errors:
        lines += ["PROBE LINE ERRORS"] + ["  " + e for e in report.probe_errors] + [""]
    lines += ["VERDICTS"] + verdict_lines(report.verdicts)
    lines += ["", f"exit status {describe_exit_code(report.exit_code)}"]
    return "\n".join(lines)


def run_to_json(report, *, series: bool) -> dict:
    return {
        "command": list(report.command),
        "run_id": report.run_id,
        "returncode": report.returncode,
        "timed_out": report.timed_out,
        "start_error": report.start_error,
        "command_failed": report.command_failed,
        "duration_s": report.duration,
        "interval_s": report.interval,
        "exit_code": report.exit_code,
        "exit_code_meaning": describe_exit_code(report.exit_code),
        "verdicts": [v.to_json() for v in report.verdicts],
        "leaks": [v.kind.key for v in report.verdicts if v.status is Status.LEAK],
        "processes": [p.to_json(series=series) for p in report.processes],
        "leftover_processes": [_fields(p) for p in report.leftovers],
        "shm_leftovers": [_fields(e) for e in report.shm],
        "rref_leaks": (None if report.rref_leaks is None
                       else [_fields(r) for r in report.rref_leaks]),
        "growth": [g.to_json() for g in report.growth],
        "probe_errors": list(report.probe_errors),
    }


def _fields(obj) -> dict:
    out = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if isinstance(v, enum.Enum):
            v = v.name.lower()
        out[f.name] = list(v) if isinstance(v, tuple) else v
    return out


def check_plot_available() -> None:
    """Raise before the run, not after it, when --plot cannot work."""
    try:
        import matplotlib  # noqa: F401  (imported here only: it is optional and slow)
    except ImportError as exc:
        raise RuntimeError("--plot needs matplotlib, which is not installed. It is optional "
                           "(the audit itself does not use it): pip install matplotlib, or "
                           "drop --plot.") from exc


def plot_memory(records: Iterable[ProcessRecord], path: str) -> None:
    """USS (RSS where USS was unreadable) over time, one line per process, to ``path``.

    Raises:
        RuntimeError: matplotlib is not installed.
    """
    check_plot_available()
    import matplotlib

    matplotlib.use("Agg")  # no display needed: we only write a file
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5))
    for rec in records:
        if not rec.samples:
            continue
        ts = [s.t for s in rec.samples]
        ys = [(s.uss if s.uss is not None else s.rss) / 2**20 for s in rec.samples]
        ax.plot(ts, ys, label=f"{rec.pid} {rec.name}")
    ax.set_xlabel("seconds since start")
    ax.set_ylabel("USS (MiB)")
    ax.set_title("memory per process")
    ax.legend(loc="best", fontsize="small")
    fig.savefig(path)
    plt.close(fig)
