"""`python -m localrref.launch` end to end, against torchrun's behaviour."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import signal

import psutil
import pytest

from lrr_launch_helpers import read_lines_until, ready_pids, run_launcher, start_launcher

pytestmark = pytest.mark.processes


def _report(out_dir, rank):
    with open(os.path.join(out_dir, f"rank{rank}.json")) as fh:
        return json.load(fh)


def _attempt_dirs(log_dir):
    (run_dir,) = glob.glob(os.path.join(log_dir, "*"))
    return run_dir, sorted(os.listdir(run_dir))


@pytest.mark.timeout(90)
def test_clean_run_exports_torchruns_environment_and_logs(tmp_path):
    # One launch covers the environment, the log layout, --tee (stdout), --redirects
    # (stderr) and --local-ranks-filter (console shows rank 1 only; files get both).
    logs = tmp_path / "logs"
    out = run_launcher("--nproc-per-node", "2", "--master-port", "29777", "--rdzv-id", "envrun",
                       "--log-dir", str(logs), "--tee", "1", "--redirects", "2", "--local-ranks-filter", "1",
                       "report_env.py", str(tmp_path), "--flag")
    assert out.returncode == 0, out.stderr
    assert "Setting OMP_NUM_THREADS environment variable for each process to be 1" in out.stderr
    assert out.stdout.splitlines() == ["[default1]:hello from 1"]
    assert "err from" not in out.stderr  # redirected, not tee'd
    reports = [_report(tmp_path, rank) for rank in range(2)]
    run_dir, attempts = _attempt_dirs(logs)
    assert os.path.basename(run_dir).startswith("envrun_") and attempts == ["attempt_0"]
    for rank, report in enumerate(reports):
        rank_dir = os.path.join(run_dir, "attempt_0", str(rank))
        assert report["env"] == {
            "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
            "GROUP_RANK": "0", "ROLE_RANK": str(rank), "ROLE_NAME": "default", "ROLE_WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29777", "TORCHELASTIC_RUN_ID": "envrun",
            "TORCHELASTIC_RESTART_COUNT": "0", "TORCHELASTIC_MAX_RESTARTS": "0", "OMP_NUM_THREADS": "1",
            "TORCHELASTIC_ERROR_FILE": os.path.join(rank_dir, "error.json"),
        }
        assert report["argv"] == ["report_env.py", str(tmp_path), "--flag"]
        assert report["name"] == "__main__"
        assert report["spec"]["rank"] == rank and report["spec"]["world_size"] == 2
        with open(os.path.join(rank_dir, "stdout.log")) as fh:
            assert fh.read() == f"hello from {rank}\n"
        with open(os.path.join(rank_dir, "stderr.log")) as fh:
            assert fh.read() == f"err from {rank}\n"
        assert not os.path.exists(os.path.join(rank_dir, "error.json"))
    world_id = reports[0]["spec"]["world_id"]
    assert reports[1]["spec"]["world_id"] == world_id
    assert glob.glob(f"/dev/shm/lrr_{world_id}_*") == []


@pytest.mark.timeout(90)
def test_failing_rank_is_restarted_then_torchruns_summary_is_printed(tmp_path):
    out = run_launcher("--nproc-per-node", "2", "--max-restarts", "1", "--log-dir", str(tmp_path),
                       "fail_rank.py")
    assert out.returncode == 1
    err = out.stderr
    assert err.count("[default] worker group FAILED (rank 1, exitcode 1). 1/1 attempts left") == 1
    # The worker's own traceback (as `python fail_rank.py` would print it) ...
    assert err.index("Traceback (most recent call last):") < err.index("fail_rank.py FAILED")
    # ... then torchrun's report: other failures, then the root cause with the traceback from error.json.
    summary = err[err.index("fail_rank.py FAILED"):]
    assert "Root Cause (first observed failure):" in summary
    root = summary[summary.index("Root Cause (first observed failure):"):]
    assert "rank      : 1 (local_rank: 1)" in root
    assert "exitcode  : 1 (pid:" in root
    assert 'raise RuntimeError("rank 1 broke")' in root and "RuntimeError: rank 1 broke" in root
    others = summary[:summary.index("Root Cause")]
    assert "rank      : 0 (local_rank: 0)" in others and "(SIGTERM)" in others
    run_dir, attempts = _attempt_dirs(tmp_path)
    assert attempts == ["attempt_0", "attempt_1"]
    error_json = os.path.join(run_dir, "attempt_1", "1", "error.json")
    assert f"error_file: {error_json}" in root
    with open(error_json) as fh:
        data = json.load(fh)
    assert data["message"]["message"] == "RuntimeError: rank 1 broke"
    assert "RuntimeError: rank 1 broke" in data["message"]["extraInfo"]["py_callstack"]
    assert not os.path.exists(os.path.join(run_dir, "attempt_1", "0", "error.json"))


@pytest.mark.timeout(90)
def test_max_restarts_restarts_the_whole_group(tmp_path):
    # forkserver: the two attempts' workers fork from one preloaded server.
    out = run_launcher("--nproc-per-node", "2", "--max-restarts", "1", "--start-method", "forkserver",
                       "flaky.py", "1")
    assert out.returncode == 0, out.stderr
    lines = set(out.stdout.splitlines())
    # Rank 0 of attempt 0 may be stopped before it prints: rank 1's failure ends that attempt.
    assert {"attempt 0 rank 1", "attempt 1 rank 0", "attempt 1 rank 1"} <= lines
    assert lines <= {"attempt 0 rank 0", "attempt 0 rank 1", "attempt 1 rank 0", "attempt 1 rank 1"}
    assert "1/1 attempts left; will restart worker group" in out.stderr


@contextlib.contextmanager
def launched_ready_workers(*args, tmp_path):
    """Start the launcher on ready_block.py; yield it and its workers once they are ready."""
    # TMPDIR: a killed launcher cannot remove its scratch log directory.
    launcher = start_launcher("--nproc-per-node", "2", *args, "ready_block.py",
                              TMPDIR=str(tmp_path))
    try:
        yield launcher, [psutil.Process(pid) for pid in
                         ready_pids(read_lines_until(launcher.stdout, 2, "ready", timeout=60))]
    finally:
        launcher.kill()
        launcher.wait(timeout=10)
        launcher.stdout.close()
        launcher.stderr.close()


@pytest.mark.timeout(90)
def test_sigterm_to_the_launcher_stops_the_workers(tmp_path):
    with launched_ready_workers("--shutdown-timeout", "10", tmp_path=tmp_path) as (launcher, workers):
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(timeout=30) == 1
        assert "received SIGTERM; workers stopped" in launcher.stderr.read().decode()
        _, alive = psutil.wait_procs(workers, timeout=10)
        assert alive == []


@pytest.mark.timeout(90)
def test_sigkill_of_the_launcher_leaves_no_worker_alive(tmp_path):
    with launched_ready_workers(tmp_path=tmp_path) as (launcher, workers):
        launcher.kill()
        launcher.wait(timeout=10)
        _, alive = psutil.wait_procs(workers, timeout=10)
        assert alive == []


@pytest.mark.timeout(90)
def test_module_mode_and_strict_leaks():
    out = run_launcher("--nproc-per-node", "2", "--strict-leaks", "-m", "lrr_launch_pkg.mod")
    assert sorted(out.stdout.splitlines()) == ["module __main__ rank 0", "module __main__ rank 1"]
    leak_lines = sorted(line for line in out.stderr.splitlines() if line.startswith("localrref: leaked RRef"))
    assert leak_lines == [f"localrref: leaked RRef rref_id={r}:7 fork_id=? owner_rank={r} holder_rank=? "
                          "state=OWNER value_type=int tensor_bytes=? creation_site=?" for r in range(2)]
    assert "2 leaked RRef(s) and strict leak checking is on" in out.stderr
    assert out.returncode == 1


@pytest.mark.timeout(90)
def test_no_python_mode_execs_the_command():
    out = run_launcher("--nproc-per-node", "2", "--no-python", "sh", "-c", 'echo "sh rank $RANK of $WORLD_SIZE"')
    assert out.returncode == 0, out.stderr
    assert sorted(out.stdout.splitlines()) == ["sh rank 0 of 2", "sh rank 1 of 2"]
