"""The auditor on real (tiny, plain-Python) programs: each leaky one is caught and named.

Every program lives in tests/tools/leaky/. /dev/shm is judged only under a
prefix unique to this test run, so other programs on the machine cannot
turn a clean run into a false alarm; each test then checks that what the
auditor killed or unlinked is really gone.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import psutil
import pytest

import leak_audit
from leak_audit import LeakKind, Status
from localrref.testing.programs import run_program

LEAKY = Path(__file__).parent / "leaky"
TOOL = Path(__file__).parents[2] / "tools" / "leak_audit.py"
PREFIX = f"la_test_{uuid.uuid4().hex[:8]}_"

pytestmark = pytest.mark.processes


@pytest.fixture(autouse=True)
def auditor_leaves_nothing_behind():
    """The auditor audited: no child, thread, fd or /dev/shm entry of ours outlives a test."""
    with leak_audit.Audit(shm_prefixes=(PREFIX,)) as audit:
        yield
    audit.report().raise_if_leaking()


def audit(program: str, *args: str, **options) -> tuple[leak_audit.RunReport, str]:
    out = io.StringIO()
    options = {"interval": 0.05, "patience": 5.0, "forward": out,
               "env": {"LEAKY_SHM_PREFIX": PREFIX}, "shm_prefixes": (PREFIX,), **options}
    report = leak_audit.run_audit([sys.executable, str(LEAKY / program), *args], **options)
    for p in report.leftovers:  # whatever was found must be gone now
        assert p.killed and gone(report, p.pid), p
    return report, out.getvalue()


def gone(report: leak_audit.RunReport, pid: int) -> bool:
    """The process of the run with this pid is dead (exited, killed, or a zombie)."""
    ctime = next(r.create_time for r in report.processes if r.pid == pid)
    try:
        proc = psutil.Process(pid)
        return proc.create_time() != ctime or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def statuses(report) -> dict[LeakKind, Status]:
    return {v.kind: v.status for v in report.verdicts}


@pytest.mark.timeout(60)
def test_clean_program_passes_eight_times_with_every_check_made():
    for i in range(8):
        report, out = audit("clean.py", "--steps", "40")
        assert report.exit_code == 0, f"run {i}:\n{report.render()}"
        assert set(statuses(report).values()) == {Status.CLEAN}, report.render()
        assert out.count("LEAK_AUDIT_STEP") == 40  # output is forwarded untouched


@pytest.mark.timeout(30)
def test_orphan_is_caught_named_and_killed():
    report, out = audit("orphan.py", patience=0.5)  # it would never exit: no need to wait long
    pid = int(re.search(r"orphan pid (\d+)", out).group(1))
    assert statuses(report)[LeakKind.ORPHAN_PROCESS] is Status.LEAK, report.render()
    (left,) = report.leftovers
    assert left.pid == pid and "signal.pause" in " ".join(left.cmdline)
    assert left.reparented and left.killed
    assert report.exit_code == 4
    assert f"pid {pid}" in report.render()


@pytest.mark.timeout(30)
def test_orphan_born_between_samples_is_found_by_the_env_marker():
    report, out = audit("orphan.py", interval=30.0, patience=0.5)
    pid = int(re.search(r"orphan pid (\d+)", out).group(1))
    assert [(p.pid, p.found_by) for p in report.leftovers] == [(pid, "marker")]


@pytest.mark.timeout(30)
def test_child_that_exits_just_after_its_parent_is_waited_for_not_reported():
    report, out = audit("straggler.py")
    pid = int(re.search(r"straggler pid (\d+)", out).group(1))
    assert statuses(report)[LeakKind.ORPHAN_PROCESS] is Status.CLEAN, report.render()
    # Usually seen (and waited for) after its parent exited; if it was quicker than
    # the auditor's look, it was never seen at all. Either way it is not a leftover.
    assert {p.pid: p.end_state for p in report.processes}.get(pid, "exited") == "exited"


@pytest.mark.timeout(30)
def test_leftover_shm_segment_is_caught_named_and_unlinked():
    report, out = audit("shm_segment.py")
    name = re.search(r"segment (\S+)", out).group(1)
    assert statuses(report)[LeakKind.SHM_SEGMENT] is Status.LEAK
    assert statuses(report)[LeakKind.SEMAPHORE] is Status.CLEAN
    assert [(e.name, e.kind, e.size, e.unlinked) for e in report.shm] == [
        (name, LeakKind.SHM_SEGMENT, 65536, True)]
    assert not os.path.exists(f"/dev/shm/{name}")
    assert report.exit_code == 8


@pytest.mark.timeout(30)
def test_leftover_segment_is_found_without_a_prefix_filter_too():
    report, out = audit("shm_segment.py", shm_prefixes=())
    name = re.search(r"segment (\S+)", out).group(1)
    assert name in {e.name for e in report.shm}  # other programs' entries may show up too
    # Found, but not removed: without a prefix the auditor cannot be sure an
    # entry is the run's (another program's semaphore can look unheld).
    assert os.path.exists(f"/dev/shm/{name}")
    os.unlink(f"/dev/shm/{name}")


@pytest.mark.timeout(30)
def test_leftover_semaphore_is_caught_named_and_unlinked():
    report, out = audit("semaphore.py")
    name = re.search(r"semaphore (\S+)", out).group(1)
    assert statuses(report)[LeakKind.SEMAPHORE] is Status.LEAK
    assert statuses(report)[LeakKind.SHM_SEGMENT] is Status.CLEAN
    assert [e.name for e in report.shm] == [name]
    assert not os.path.exists(f"/dev/shm/{name}")
    assert report.exit_code == 8


@pytest.mark.timeout(30)
@pytest.mark.parametrize("program, kind, metric, bit", [
    ("fd_growth.py", LeakKind.FD_GROWTH, "fds", 16),
    ("thread_growth.py", LeakKind.THREAD_GROWTH, "threads", 32),
    ("memory_growth.py", LeakKind.MEMORY_GROWTH, "py_blocks", 64),
])
def test_growth_per_step_is_caught_from_probe_lines(program, kind, metric, bit):
    report, _ = audit(program, "--steps", "60", "--size", "1024")
    assert statuses(report)[kind] is Status.LEAK, report.render()
    fit = next(g for g in report.growth if g.metric == metric)
    assert fit.verdict == "leak" and fit.slope >= 1.0
    assert report.exit_code & bit
    assert metric in report.verdict(kind).details[0]


@pytest.mark.timeout(30)
def test_big_objects_show_as_uss_growth():
    report, _ = audit("memory_growth.py", "--steps", "60", "--size", "65536")
    fit = next(g for g in report.growth if g.metric == "uss")
    assert fit.verdict == "leak"
    assert fit.slope == pytest.approx(65536, rel=0.2)


@pytest.mark.timeout(30)
def test_leaked_rrefs_are_read_from_the_supervisor_report():
    report, _ = audit("rref_leak.py")
    assert statuses(report)[LeakKind.LEAKED_RREF] is Status.LEAK
    assert [(r.state, r.owner_rank, r.tensor_bytes) for r in report.rref_leaks] == [
        ("confirmed_user", 1, 4096), ("unforked_owner", 2, 0)]
    assert "train.py:42" in report.render()
    assert report.exit_code == 128


@pytest.mark.timeout(30)
def test_no_rref_report_means_unknown_not_clean():
    report, _ = audit("straggler.py")
    verdict = report.verdict(LeakKind.LEAKED_RREF)
    assert verdict.status is Status.UNKNOWN and "no leak report" in verdict.summary
    assert report.rref_leaks is None


def test_unreadable_rref_reports_say_why(tmp_path):
    path = tmp_path / "r.json"
    assert leak_audit.read_rref_report(str(path)) == (None, leak_audit.read_rref_report(
        str(path))[1])
    path.write_text("{not json")
    assert "unreadable" in leak_audit.read_rref_report(str(path))[1]
    path.write_text('{"leaks": []}')
    assert "not a JSON list" in leak_audit.read_rref_report(str(path))[1]
    path.write_text('[{"rref_id": 1}]')
    assert "entry 0 lacks" in leak_audit.read_rref_report(str(path))[1]
    path.write_text("[]")
    assert leak_audit.read_rref_report(str(path)) == ([], "")


@pytest.mark.timeout(30)
def test_failed_command_is_reported_distinctly_and_combines_with_leaks():
    only_ours = {"shm_prefixes": (PREFIX,), "interval": 0.05, "forward": None}
    failed = leak_audit.run_audit([sys.executable, "-c", "raise SystemExit(3)"], **only_ours)
    assert (failed.returncode, failed.command_failed, failed.exit_code) == (3, True, 2)
    both = leak_audit.run_audit(
        [sys.executable, "-c", "import subprocess, sys; subprocess.Popen([sys.executable, '-c',"
         " 'import signal; signal.pause()']); sys.exit(1)"], patience=0.5, **only_ours)
    assert both.exit_code == 2 | 4
    assert all(p.killed for p in both.leftovers)
    missing = leak_audit.run_audit(["/nonexistent/program"])
    assert missing.start_error and missing.exit_code == 2
    assert "did not start" in missing.render()


@pytest.mark.timeout(30)
def test_timeout_kills_the_whole_tree():
    report = leak_audit.run_audit(
        [sys.executable, "-c", "import subprocess, sys, signal; subprocess.Popen([sys.executable,"
         " '-c', 'import signal; signal.pause()']); print('up', flush=True); signal.pause()"],
        interval=0.05, timeout=2.0, forward=None, shm_prefixes=(PREFIX,))
    assert report.timed_out and report.command_failed
    assert report.returncode == -15  # SIGTERM, as Popen saw it: the auditor did not reap it
    assert report.exit_code & 2
    assert "timed out" in report.render()
    assert len(report.processes) == 2 and all(gone(report, p.pid) for p in report.processes)


@pytest.mark.timeout(60)
def test_sampled_series_mode_catches_fd_growth_without_probe_lines():
    # 3 s of growth in 3 batches of about 0.8 s: on a loaded machine either
    # process may stall for a good part of a second (the program catches
    # up after a stall), and a batch must still see files opened.
    report, _ = audit("slow_fd_growth.py", "--steps", "300", interval=0.02, growth="samples",
                      warmup_s=0.2, cooldown_s=0.2, batches=3)
    assert statuses(report)[LeakKind.FD_GROWTH] is Status.LEAK, report.render()
    fit = next(g for g in report.growth if g.metric == "fds" and g.verdict == "leak")
    assert fit.per == "s" and fit.slope > 10  # ~100 fds per second
    steady, _ = audit("slow_fd_growth.py", "--steps", "100", "--close", interval=0.02,
                      growth="samples", warmup_s=0.2, cooldown_s=0.2, batches=3)
    assert statuses(steady)[LeakKind.FD_GROWTH] is Status.CLEAN, steady.render()


def _cli(*args: str) -> subprocess.CompletedProcess:
    return run_program([sys.executable, str(TOOL), *args], capture_output=True, text=True,
                       timeout=60, env={**os.environ, "LEAKY_SHM_PREFIX": PREFIX})


@pytest.mark.timeout(60)
def test_cli_exit_status_and_json():
    leaky = _cli("--json", "--interval", "0.05", "--shm-prefix", PREFIX, "--", sys.executable,
                 str(LEAKY / "rref_leak.py"))
    assert leaky.returncode == 128, leaky.stderr
    payload = json.loads(leaky.stdout)  # stdout holds only the JSON
    assert payload["exit_code"] == 128 and payload["leaks"] == ["leaked_rref"]
    assert len(payload["rref_leaks"]) == 2
    assert "leaked RRef" in leaky.stderr  # the readable report goes to stderr
    clean = _cli("--shm-prefix", PREFIX, "--", sys.executable, str(LEAKY / "clean.py"),
                 "--steps", "20")
    assert clean.returncode == 0, clean.stdout
    assert "LEAK_AUDIT_STEP" in clean.stdout and "exit status 0 = clean" in clean.stdout


@pytest.mark.timeout(30)
def test_cli_usage_errors_are_auditor_errors():
    assert _cli().returncode == 1
    bad = _cli("--tolerance", "uss", "--", "true")
    assert bad.returncode == 1 and "METRIC=NUMBER" in bad.stderr
    assert "128  leaked RRef" in leak_audit.__doc__
    assert "128 leaked RRef" in _cli("--help").stdout


@pytest.mark.timeout(60)
def test_cli_plot_needs_matplotlib_or_writes_the_file(tmp_path):
    out = tmp_path / "mem.png"
    result = _cli("--plot", str(out), "--shm-prefix", PREFIX, "--", sys.executable, "-c", "pass")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert result.returncode == 1
        assert "needs matplotlib" in result.stderr and "pip install matplotlib" in result.stderr
        assert not out.exists()
    else:
        assert result.returncode == 0 and out.stat().st_size > 0
