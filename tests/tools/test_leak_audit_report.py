"""Exit codes, rendering and the plot, on hand-made records (no processes)."""

from __future__ import annotations

import json
import sys

import pytest

import leak_audit
from leak_audit import LeakKind, ProcessRecord, Sample, Status, Verdict
from leak_audit._model import exit_code
from leak_audit._render import plot_memory, process_table


def verdict(kind, status=Status.LEAK):
    return Verdict(kind=kind, status=status, summary="x")


def test_exit_code_is_a_bitmask_with_distinct_command_failure():
    assert exit_code((verdict(LeakKind.ORPHAN_PROCESS, Status.CLEAN),), command_failed=False) == 0
    assert exit_code((verdict(LeakKind.LEAKED_RREF, Status.UNKNOWN),), command_failed=True) == 2
    code = exit_code((verdict(LeakKind.ORPHAN_PROCESS), verdict(LeakKind.FD_GROWTH)),
                     command_failed=True)
    assert code == 2 | 4 | 16
    assert leak_audit.describe_exit_code(code) == \
        "22 = audited command failed + orphan process + fd growth"
    bits = sorted(set(leak_audit.EXIT_BIT.values()))
    assert bits == [4, 8, 16, 32, 64, 128]  # never 1 (auditor error) or 2 (command failed)
    assert leak_audit.EXIT_BIT[LeakKind.SHM_SEGMENT] == leak_audit.EXIT_BIT[LeakKind.SEMAPHORE]


def records():
    samples = tuple(Sample(t=i * 0.1, rss=2**20 * (10 + i), uss=None if i == 0 else 2**20 * i,
                           fds=5, threads=2, children=1) for i in range(4))
    return (ProcessRecord(pid=10, ppid=1, name="python", cmdline=("python", "x.py"),
                          create_time=1.0, found_by="tree", samples=samples, end_state="exited"),
            ProcessRecord(pid=11, ppid=10, name="sleep", cmdline=(), create_time=2.0,
                          found_by="marker", samples=(), end_state="alive"))


def test_process_table_has_one_row_per_process():
    header, first, second = process_table(records())
    assert header.split()[:4] == ["pid", "ppid", "found", "samples"]
    assert first.split()[:8] == ["10", "1", "tree", "4", "13.0M", "3.0M", "3.0M", "5"]
    assert second.split()[:4] == ["11", "10", "marker", "0"] and "alive" in second


def test_run_report_json_is_plain_json(tmp_path):
    report = leak_audit.RunReport(
        command=("x",), run_id="r", returncode=0, timed_out=False, start_error=None,
        duration=1.0, interval=0.1, processes=records(), leftovers=(), shm=(
            leak_audit.ShmEntry(name="psm_1", kind=LeakKind.SHM_SEGMENT, size=4, held_by=(10,)),),
        rref_leaks=None, growth=(leak_audit.fit_growth([(i, i) for i in range(6)], source="s",
                                                       metric="fds"),),
        probe_errors=(), verdicts=(verdict(LeakKind.SHM_SEGMENT),))
    payload = json.loads(json.dumps(report.to_json(series=True)))
    assert payload["exit_code"] == 8 and payload["leaks"] == ["shm_segment"]
    assert payload["shm_leftovers"][0]["kind"] == "shm_segment"
    assert payload["growth"][0]["t"] > 1e300  # a perfect line: infinite t, kept finite in JSON
    assert len(payload["processes"][0]["samples"]) == 4


class _FakeAxes:
    def __init__(self):
        self.lines = []

    def plot(self, xs, ys, label):
        self.lines.append((list(xs), list(ys), label))

    def __getattr__(self, name):
        return lambda *a, **k: None


def test_plot_draws_one_line_per_sampled_process(monkeypatch, tmp_path):
    axes, saved = _FakeAxes(), []
    fig = type("Fig", (), {"savefig": lambda self, path: saved.append(path)})()
    pyplot = type(sys)("matplotlib.pyplot")
    pyplot.subplots = lambda **k: (fig, axes)
    pyplot.close = lambda f: None
    mpl = type(sys)("matplotlib")
    mpl.use = lambda backend: None
    mpl.pyplot = pyplot
    monkeypatch.setitem(sys.modules, "matplotlib", mpl)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", pyplot)
    plot_memory(records(), str(tmp_path / "m.png"))
    assert saved == [str(tmp_path / "m.png")]
    ((xs, ys, label),) = axes.lines  # the process without samples draws nothing
    assert label == "10 python" and xs == pytest.approx([0, 0.1, 0.2, 0.3])
    assert ys == [10.0, 1.0, 2.0, 3.0]  # MiB; RSS where USS was unreadable


def test_plot_without_matplotlib_says_how_to_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes the import fail
    with pytest.raises(RuntimeError, match="pip install matplotlib"):
        plot_memory(records(), "unused.png")
