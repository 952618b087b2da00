"""localrref.launch.spawn / start_processes with real worker processes (torch.mp.spawn parity)."""

from __future__ import annotations

import gc
import json
import multiprocessing
import os
import pickle
import signal
import subprocess
import sys

import psutil
import pytest
from torch.multiprocessing.spawn import ProcessExitedException, ProcessRaisedException

import lrr_launch_workers as workers
from lrr_launch_helpers import SCRIPTS, launcher_env, read_lines_until, ready_pids
from localrref import world
from localrref.errors import RRefLeakError
from localrref.launch import spawn, start_processes

pytestmark = pytest.mark.processes


def _read(path):
    with open(path) as fh:
        return json.load(fh)


@pytest.mark.timeout(60)
def test_clean_run_gives_each_worker_its_world(tmp_path):
    assert spawn(workers.report_world, args=(str(tmp_path),), nprocs=2) is None
    reports = [_read(tmp_path / f"rank{r}.json") for r in range(2)]
    assert [r["rank"] for r in reports] == [0, 1]
    assert {r["world_id"] for r in reports} == {reports[0]["world_id"]}
    for report in reports:
        assert report["world_size"] == 2
        assert report["inboxes"] == 3  # one per rank plus the supervisor's
        assert report["supervisor_pid"] == os.getpid() == report["ppid"]
        assert report["shm_prefix"] == f"lrr_{reports[0]['world_id']}_"
        assert report["shutdown_timeout"] == 30.0
    assert world.current() is None  # only workers have a world


@pytest.mark.timeout(60)
def test_spawned_workers_start_with_the_collector_paused_and_run_fn_with_it_on(tmp_path):
    spawn(workers.report_world, args=(str(tmp_path),), nprocs=1)
    report = _read(tmp_path / "rank0.json")
    # The job's module was imported paused; what startup made is frozen.
    assert report["collector_on_at_import"] is False
    assert report["frozen_objects"] > 1000
    assert report["collector_on"] is True
    assert gc.isenabled()  # the supervisor's own collector is untouched


@pytest.mark.timeout(60)
def test_the_paused_collector_can_be_turned_off(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCALRREF_PAUSE_GC_AT_START", "0")
    spawn(workers.report_world, args=(str(tmp_path),), nprocs=1)
    report = _read(tmp_path / "rank0.json")
    assert report["collector_on_at_import"] is True
    assert report["frozen_objects"] == 0


@pytest.mark.timeout(60)
def test_options_and_env_switches_reach_the_workers(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCALRREF_RECORD_CREATION_SITES", "1")
    start_processes(workers.report_world, args=(str(tmp_path),), nprocs=1, shutdown_timeout=5)
    report = _read(tmp_path / "rank0.json")
    assert report["record_creation_sites"] is True
    assert report["strict_leaks"] is False
    assert report["shutdown_timeout"] == 5


@pytest.mark.timeout(60)
def test_exception_in_rank_k_raises_process_raised_exception():
    with pytest.raises(ProcessRaisedException) as info:
        spawn(workers.raise_in_rank, args=(1,), nprocs=2)
    err = info.value
    assert err.error_index == 1
    assert str(err).startswith("\n\n-- Process 1 terminated with the following error:\nTraceback")
    assert 'raise ValueError(f"boom from rank {rank}")' in str(err)
    assert str(err).rstrip().endswith("ValueError: boom from rank 1")
    assert "bootstrap.py" not in str(err)  # the traceback starts at the user's fn
    rebuilt = pickle.loads(pickle.dumps(err))
    assert (type(rebuilt), rebuilt.error_index, rebuilt.error_pid) == (ProcessRaisedException, 1, err.error_pid)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how, exitcode, text", [
    ("sigkill", -signal.SIGKILL, "process 1 terminated with signal SIGKILL"),
    ("exit", 3, "process 1 terminated with exit code 3"),
])
def test_dead_worker_raises_and_peers_get_peer_exited(tmp_path, how, exitcode, text):
    ctx = spawn(workers.exit_in_rank, args=(1, how, str(tmp_path)), nprocs=2, join=False)
    pids = ctx.pids()
    # The grace period lets rank 0 record its inbox and exit by itself.
    with pytest.raises(ProcessExitedException) as info:
        ctx.join(grace_period=30)
    err = info.value
    assert str(err) == text
    assert (err.error_index, err.error_pid, err.exit_code) == (1, pids[1], exitcode)
    assert err.signal_name == ("SIGKILL" if how == "sigkill" else None)
    assert _read(tmp_path / "inbox0.json") == ["PeerExited", 1, pids[1], exitcode, False, False]
    assert ctx.group.exits()[0].exitcode == 0


@pytest.mark.timeout(60)
def test_worker_ignoring_sigterm_is_killed_after_shutdown_timeout():
    ignoring = multiprocessing.get_context("spawn").Event()
    ctx = start_processes(workers.ignore_sigterm_then_block, args=(1, ignoring), nprocs=2,
                          join=False, shutdown_timeout=0.5)
    with pytest.raises(ProcessExitedException, match="process 1 terminated with exit code 2"):
        while not ctx.join():
            pass
    exits = ctx.group.exits()
    assert exits[0].exitcode == -signal.SIGKILL
    assert exits[0].signalled_by_us and not exits[1].signalled_by_us


@pytest.mark.timeout(60)
def test_join_times_out_while_workers_run_then_succeeds():
    event = multiprocessing.get_context("spawn").Event()
    ctx = spawn(workers.wait_for_event, args=(event,), nprocs=2, join=False)
    assert ctx.join(timeout=0.05) is False
    assert all(psutil.pid_exists(pid) for pid in ctx.pids())
    event.set()
    assert ctx.join(timeout=30) is True
    assert ctx.join() is True  # idempotent, like torch's


@pytest.mark.timeout(60)
def test_keyboard_interrupt_in_join_stops_the_workers():
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    ctx = spawn(workers.print_ready_and_block, nprocs=2, join=False)
    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.2)  # lands inside join(): the workers never exit
        with pytest.raises(KeyboardInterrupt):
            ctx.join()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert {e.exitcode for e in ctx.group.exits().values()} == {-signal.SIGTERM}
    assert ctx.join() is True  # already finished


@pytest.mark.timeout(60)
def test_shutdown_barrier_releases_every_rank_twice(tmp_path):
    ctx = spawn(workers.graceful_shutdown, args=(0, str(tmp_path)), nprocs=3, join=False)
    assert ctx.join(timeout=30)
    for rank in range(3):
        assert _read(tmp_path / f"barrier{rank}.json") == [["ShutdownProceed"]] * 2
    assert sorted(ctx.group.dispatcher.shutdown_arrived) == [0, 1, 2]


@pytest.mark.timeout(60)
def test_shutdown_barrier_fails_when_a_rank_exits_instead(tmp_path):
    with pytest.raises(ProcessExitedException, match="exit code 4"):
        recorded = multiprocessing.get_context("spawn").Barrier(2)
        spawn(workers.skip_shutdown_in_rank, args=(1, str(tmp_path), recorded), nprocs=3)
    for rank in (0, 2):
        failed, notices = _read(tmp_path / f"barrier{rank}.json")
        assert failed == [
            "ShutdownFailed",
            "worker rank 1 exited with code 0 before it reached the shutdown barrier (arrive phase)"]
        assert notices in ([], [["PeerExited", 1]])  # before or after: both were sent


@pytest.mark.timeout(60)
def test_leak_reports_are_printed_and_strict_mode_fails(capfd):
    start_processes(workers.graceful_shutdown, args=(1,), nprocs=2)
    lines = [l for l in capfd.readouterr().err.splitlines() if l.startswith("localrref: leaked RRef")]
    assert sorted(lines) == sorted(
        f"localrref: leaked RRef rref_id={r}:0 fork_id={r}:100 owner_rank={r} holder_rank={(r + 1) % 2} "
        f"state=CONFIRMED value_type=Tensor tensor_bytes=64 creation_site=test.py:0" for r in range(2))
    with pytest.raises(RRefLeakError, match=r"2 leaked RRef\(s\) in world"):
        start_processes(workers.graceful_shutdown, args=(1,), nprocs=2, strict_leaks=True)


@pytest.mark.timeout(60)
def test_strict_leaks_env_switch(monkeypatch):
    monkeypatch.setenv("LOCALRREF_STRICT_LEAKS", "1")
    with pytest.raises(RRefLeakError):
        spawn(workers.graceful_shutdown, args=(1,), nprocs=1)
    spawn(workers.graceful_shutdown, args=(0,), nprocs=1)  # no leak, no error


@pytest.mark.timeout(60)
def test_world_shm_entries_are_swept():
    ctx = spawn(workers.leave_shm_entry, nprocs=2, join=False)
    prefix = f"/dev/shm/lrr_{ctx.world_id}_"
    assert ctx.join(timeout=30)
    assert not os.path.exists(prefix + "rank0") and not os.path.exists(prefix + "rank1")


@pytest.mark.timeout(60)
def test_unpicklable_fn_fails_before_any_worker_runs():
    with pytest.raises((pickle.PicklingError, AttributeError)):
        spawn(lambda rank: None, nprocs=2)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("start_method", ["spawn", "forkserver"])
def test_sigkill_of_the_supervisor_takes_the_workers_down(start_method, tmp_path):
    # TMPDIR: the killed supervisor cannot remove its error-file directory.
    supervisor = subprocess.Popen(
        [sys.executable, os.path.join(SCRIPTS, "supervise.py"), start_method, "2"],
        env=launcher_env(TMPDIR=str(tmp_path)), stdout=subprocess.PIPE, bufsize=0)
    try:
        pids = ready_pids(read_lines_until(supervisor.stdout, 2, "ready", timeout=30))
        workers_ = [psutil.Process(pid) for pid in pids]
        supervisor.kill()
        supervisor.wait(timeout=10)
        _, alive = psutil.wait_procs(workers_, timeout=10)
        assert alive == []
    finally:
        supervisor.kill()
        supervisor.wait(timeout=10)
        supervisor.stdout.close()
