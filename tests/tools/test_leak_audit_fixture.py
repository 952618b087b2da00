"""``with Audit()``: what a block of test code leaves behind in this process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from multiprocessing import resource_tracker, shared_memory
from pathlib import Path

import psutil
import pytest

import leak_audit
from leak_audit import Audit, LeakFound, LeakKind, Status

LEAKY = Path(__file__).parent / "leaky"
TOOLS = Path(__file__).parents[2] / "tools"
PREFIX = f"la_fix_{uuid.uuid4().hex[:8]}_"

pytestmark = pytest.mark.processes


def statuses(report) -> dict[LeakKind, Status]:
    return {v.kind: v.status for v in report.verdicts}


@pytest.mark.timeout(60)
def test_clean_block_reports_no_leak_five_times():
    for _ in range(5):
        with Audit(shm_prefixes=(PREFIX,)) as audit:
            subprocess.run([sys.executable, "-S", "-c", ""], check=True)
            t = threading.Thread(target=sum, args=([1],))
            t.start()
            t.join()
            with open(os.devnull, "rb"):
                pass
            seg = shared_memory.SharedMemory(name=PREFIX + "clean", create=True, size=4096)
            seg.close()
            seg.unlink()
        report = audit.report()
        assert report.leaks == (), report.render()
        assert report.exit_code == 0
        report.raise_if_leaking()


@pytest.mark.timeout(30)
def test_child_left_running_is_reported_and_killed():
    with Audit(patience=0.5) as audit:
        child = subprocess.Popen([sys.executable, "-c", "import signal; signal.pause()"])
    report = audit.report()
    assert statuses(report)[LeakKind.ORPHAN_PROCESS] is Status.LEAK
    (left,) = report.leftovers
    assert (left.pid, left.killed, left.reparented) == (child.pid, True, False)
    assert child.wait(timeout=10) is not None  # dead (and reaped) already
    with pytest.raises(LeakFound, match=f"pid {child.pid}"):
        report.raise_if_leaking()


@pytest.mark.timeout(30)
def test_child_never_waited_for_is_a_zombie_leftover():
    with Audit() as audit:
        child = subprocess.Popen([sys.executable, "-S", "-c", ""])
    report = audit.report()
    (left,) = report.leftovers
    assert (left.pid, left.status) == (child.pid, "zombie")
    assert "zombie" in report.verdict(LeakKind.ORPHAN_PROCESS).summary
    child.wait(timeout=10)
    assert not psutil.pid_exists(child.pid) or psutil.Process(child.pid).ppid() != os.getpid()


@pytest.mark.timeout(30)
def test_thread_left_running_is_named_with_where_it_waits():
    release = threading.Event()
    with Audit(patience=0.2) as audit:
        t = threading.Thread(target=release.wait, name="stuck-worker", daemon=True)
        t.start()
    release.set()
    t.join()
    report = audit.report()
    (info,) = report.threads
    assert info.name == "stuck-worker" and info.daemon
    assert "threading.py" in info.where and "wait" in info.where
    assert statuses(report)[LeakKind.THREAD_GROWTH] is Status.LEAK
    assert "stuck-worker" in report.render()


@pytest.mark.timeout(30)
def test_file_left_open_is_named():
    with Audit() as audit:
        f = open(os.devnull, "rb")
    f.close()
    report = audit.report()
    assert statuses(report)[LeakKind.FD_GROWTH] is Status.LEAK
    assert [target for _, target in report.fds] == [os.devnull]


@pytest.mark.timeout(30)
def test_segment_left_in_dev_shm_is_reported_and_unlinked():
    with Audit(shm_prefixes=(PREFIX,)) as audit:
        seg = shared_memory.SharedMemory(name=PREFIX + "left", create=True, size=8192)
        resource_tracker.unregister(seg._name, "shared_memory")
    seg.close()
    report = audit.report()
    assert statuses(report)[LeakKind.SHM_SEGMENT] is Status.LEAK
    assert [(e.name, e.held_by, e.unlinked) for e in report.shm] == [
        (PREFIX + "left", (os.getpid(),), True)]
    assert not os.path.exists(f"/dev/shm/{PREFIX}left")


def grandchild_reading(fd: int) -> str:
    """Code for a child that starts a grandchild blocked reading ``fd``, prints its pid, exits."""
    return ("import subprocess, sys; p = subprocess.Popen([sys.executable, '-c', "
            f"'import os; os.read({fd}, 1)'], pass_fds=({fd},), stdout=subprocess.DEVNULL, "
            "stderr=subprocess.DEVNULL); "
            "print(p.pid)")


class _ReleasedOnExit(Audit):
    """Runs ``release`` as the audit starts its checks: what it frees can only
    finish during the patience window, never inside the block."""

    def __init__(self, release, **kw):
        super().__init__(**kw)
        self._release = release

    def _finish(self):
        self._release()
        return super()._finish()


@pytest.mark.timeout(30)
def test_processes_and_threads_still_finishing_get_patience():
    r, w = os.pipe()
    go = threading.Event()

    def release():
        os.close(w)
        go.set()

    # A grandchild that blocks reading our pipe; its parent exits at once, so it is
    # re-parented and only the env marker ties it to the block.
    spawn = grandchild_reading(r)
    with _ReleasedOnExit(release, patience=10.0) as audit:
        out = subprocess.run([sys.executable, "-c", spawn], pass_fds=(r,), check=True,
                             capture_output=True, text=True).stdout
        os.close(r)
        t = threading.Thread(target=go.wait)
        t.start()
    report = audit.report()
    assert report.leaks == (), report.render()
    assert not t.is_alive()
    grandchild = int(out)
    assert not psutil.pid_exists(grandchild) or psutil.Process(grandchild).status() == "zombie"


@pytest.mark.timeout(30)
def test_grandchild_still_blocked_after_patience_is_found_by_marker_and_killed():
    r, w = os.pipe()
    spawn = grandchild_reading(r)
    try:
        with Audit(patience=0.3) as audit:
            out = subprocess.run([sys.executable, "-c", spawn], pass_fds=(r,), check=True,
                                 capture_output=True, text=True).stdout
            os.close(r)
    finally:
        os.close(w)  # lets the grandchild go if the audit failed to kill it
    (left,) = audit.report().leftovers
    assert (left.pid, left.found_by, left.reparented, left.killed) == (int(out), "marker",
                                                                      True, True)


def test_report_before_the_block_ends_is_an_error_and_env_is_restored():
    before = os.environ.get(leak_audit.MARKER_ENV)
    with Audit() as audit:
        assert os.environ[leak_audit.MARKER_ENV] == audit.run_id
        with pytest.raises(RuntimeError, match="after the block"):
            audit.report()
    assert os.environ.get(leak_audit.MARKER_ENV) == before


def test_rref_verdict_from_a_report_file_or_debug_counters(tmp_path, monkeypatch):
    path = tmp_path / "leaks.json"
    path.write_text(json.dumps([{"rref_id": 1, "fork_id": 2, "state": "pending_child"}]))
    with Audit(rref_report=str(path), check_fds=False) as audit:
        pass
    assert statuses(audit.report())[LeakKind.LEAKED_RREF] is Status.LEAK
    fake = type(sys)("localrref")
    fake.get_debug_info = lambda: {"num_owner_rrefs": "2", "num_forks": "0"}
    monkeypatch.setitem(sys.modules, "localrref", fake)
    with Audit(check_fds=False) as audit:
        pass
    verdict = audit.report().verdict(LeakKind.LEAKED_RREF)
    assert verdict.status is Status.LEAK and "num_owner_rrefs=2" in verdict.summary
    monkeypatch.setitem(sys.modules, "localrref", type(sys)("localrref"))
    with Audit(check_fds=False) as audit:
        pass
    assert statuses(audit.report())[LeakKind.LEAKED_RREF] is Status.UNKNOWN


@pytest.mark.timeout(60)
def test_multiprocessing_helpers_are_not_leaks():
    # A fresh interpreter, so the resource tracker really starts inside the block.
    code = (f"import sys; sys.path.insert(0, {str(TOOLS)!r}); import json, leak_audit\n"
            "from multiprocessing import resource_tracker\n"
            f"with leak_audit.Audit(shm_prefixes=[{PREFIX!r}]) as a:\n"
            "    resource_tracker.ensure_running()\n"
            "    pid = resource_tracker._resource_tracker._pid\n"
            "print(json.dumps([pid, a.report().to_json()['leaks']]))\n")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True, timeout=30).stdout
    tracker_pid, leaks = json.loads(out)
    assert tracker_pid is not None and leaks == []


class _MidExec:
    """A process seen inside exec(): executable known, argv and environment not yet."""

    def __init__(self, reads_before_ready: int, env: dict):
        self.pid = os.getpid()  # a live pid, so waiting on it is real (and never ends)
        self.reads = reads_before_ready
        self.env = env

    def exe(self):
        return sys.executable

    def cmdline(self):
        self.reads -= 1
        return [] if self.reads >= 0 else ["python"]

    def is_running(self):
        return True

    def environ(self):
        return self.env if self.reads < 0 else {}


def test_process_caught_mid_exec_is_reread_until_its_environment_shows():
    # Right after Popen returns, /proc/<pid>/environ often still reads empty: the
    # kernel wakes the parent before building the child's stack. The marker scan
    # must look again rather than decide "not ours".
    from leak_audit._procs import _after_exec, _execing

    proc = _MidExec(reads_before_ready=3, env={leak_audit.MARKER_ENV: "run"})
    assert _execing(proc)
    assert _after_exec([proc], time.monotonic() + 5.0) == [proc]
    assert proc.environ() == {leak_audit.MARKER_ENV: "run"}
    stuck = _MidExec(reads_before_ready=10**9, env={})
    assert _after_exec([stuck], time.monotonic() + 0.05) == []  # bounded: gives up
