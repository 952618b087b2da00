"""Real runs through `python -m localrref.launch` with real RPC traffic."""

import os
import signal
import subprocess
import sys

import psutil
import pytest

from localrref.testing.programs import run_program
from localrref.transport.shm import world_segments

pytestmark = [pytest.mark.processes, pytest.mark.timeout(120)]

SCRIPTS = os.path.join(os.path.dirname(__file__), "scripts")


@pytest.fixture
def launch(tmp_path):
    """Run the launcher; the logs a failed run keeps land in pytest's tmp_path, not /tmp."""
    def run(*args, env=None):
        return _launch("--log-dir", str(tmp_path), *args, env=env)
    return run


def _launch(*args, env=None):
    return run_program([sys.executable, "-m", "localrref.launch", *args],
                       capture_output=True, text=True, timeout=100,
                       env={**os.environ, **(env or {})})


@pytest.fixture(scope="module", autouse=True)
def _clean(leak_free):
    yield


def test_the_main_job_trains_and_leaks_nothing(launch):
    run = launch("--nproc-per-node", "3", "--tee", "3", "-m",
                 "localrref.examples.parameter_server", "--steps", "60")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "reached target" in run.stdout and "ps: shutdown complete" in run.stdout
    assert "trainer2: step 60/60" in run.stdout
    assert "RRef leak check: no leaked RRefs" in run.stderr


def test_the_split_model_example_trains_with_distributed_autograd(launch):
    run = launch("--nproc-per-node", "3", "--tee", "3", "-m",
                 "localrref.examples.split_rnn", "--steps", "40")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "(reached target" in run.stdout and "ps: shutdown complete" in run.stdout
    assert "trainer2: step 40/40" in run.stdout
    assert "RRef leak check: no leaked RRefs" in run.stderr


def test_a_leak_is_reported_with_its_holder_and_strict_mode_fails(launch):
    script = os.path.join(SCRIPTS, "holds_rrefs.py")
    loose = launch("--nproc-per-node", "2", script,
                   env={"LOCALRREF_RECORD_CREATION_SITES": "1"})
    assert loose.returncode == 0, loose.stderr[-3000:]
    (line,) = [l for l in loose.stderr.splitlines() if l.startswith("localrref: leaked RRef")]
    assert "owner_rank=1 holder_rank=0 state=confirmed_user value_type=Tensor " \
           "tensor_bytes=1024" in line
    assert "holds_rrefs.py:12 in <module>" in line
    strict = launch("--nproc-per-node", "2", "--strict-leaks", script)
    assert strict.returncode != 0
    assert "strict leak checking is on" in strict.stderr


def test_a_context_left_open_at_shutdown_is_reported_and_released_everywhere(launch):
    run = launch("--nproc-per-node", "2", "--tee", "3", os.path.join(SCRIPTS, "open_context.py"))
    assert run.returncode == 0, run.stderr[-3000:]
    context_id = int(run.stdout.split("open context ")[1].split()[0])
    (line,) = [l for l in run.stderr.splitlines() if "leaked distributed autograd" in l]
    assert line == (f"localrref: leaked distributed autograd context context_id={context_id} "
                    f"holder_rank=0 known_workers=[1] send_functions=1 recv_tensors=1")
    assert "RRef leak check: 0 leaked RRef(s) and 1 distributed autograd context(s) left " \
           "open" in run.stderr


def test_a_worker_killed_mid_call_fails_the_caller_at_once_and_is_the_root_cause(launch):
    run = launch("--nproc-per-node", "2", "--tee", "3",
                 os.path.join(SCRIPTS, "kill_mid_call.py"))
    assert run.returncode != 0
    # rpc_timeout is 0 (no limit): only the death notice can end that call.
    assert "caller saw: WorkerGoneError: worker rank 1 ('worker1')" in run.stdout
    assert "was killed by signal SIGKILL" in run.stdout
    assert "rank      : 1" in run.stderr and "Signal 9 (SIGKILL)" in run.stderr
    assert "exitcode  : 3" in run.stderr  # rank 0 left with its own code, not SIGABRT


def test_a_worker_that_exits_without_shutdown_stops_its_threads_first(launch):
    run = launch("--nproc-per-node", "2", "--tee", "3",
                 os.path.join(SCRIPTS, "exits_without_shutdown.py"))
    assert "rank 0 agent threads before exit: ['localrref-" in run.stdout
    assert "rank 0 agent threads at exit: []" in run.stdout
    # Its own exit code, not SIGABRT from a daemon thread caught inside torch.
    assert "exitcode  : 3" in run.stderr, run.stderr[-3000:]


@pytest.mark.parametrize("served", ["calling", "blocked"])
def test_ctrl_c_stops_a_world_whose_rank_0_waits_inside_torch(tmp_path, served):
    # Rank 0 can only leave torch's wait when its call fails. "calling": rank 1's
    # close() must fail its own pending call at once so the served function
    # ends and replies. "blocked": the function never returns, so the
    # supervisor must tell rank 0 that rank 1 died even while it is stopping
    # the world. Either way, else the stop ladder sits out 30 s and SIGKILLs.
    launcher = subprocess.Popen(
        [sys.executable, "-m", "localrref.launch", "--log-dir", str(tmp_path),
         "--nproc-per-node", "2", "--tee", "1", os.path.join(SCRIPTS, "ctrl_c_in_wait_all.py"),
         served],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in launcher.stdout:
            if "waiting" in line:
                break
        launcher.send_signal(signal.SIGINT)
        _, err = launcher.communicate(timeout=100)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.communicate()
    assert launcher.returncode != 0
    assert "received SIGINT; workers stopped" in err, err[-3000:]
    assert "did not exit within" not in err, err[-3000:]


def test_a_killed_supervisors_segments_are_unlinked_by_the_resource_tracker(tmp_path):
    # Nobody is left to sweep: the workers die with their supervisor, and the
    # tracker they shared unlinks what they had registered once all are gone.
    # TMPDIR: the killed supervisor cannot remove its error-file directory.
    supervisor = subprocess.Popen(
        [sys.executable, os.path.join(SCRIPTS, "supervisor_to_be_killed.py")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "TMPDIR": str(tmp_path)})
    try:
        line = supervisor.stdout.readline()
        assert line.endswith("ready\n"), line + supervisor.stderr.read()
        world_id = line.split()[1]
        assert world_segments(world_id), "the world should hold a segment by now"
        trackers = [child for child in psutil.Process(supervisor.pid).children()
                    if "resource_tracker" in " ".join(child.cmdline())]
        assert len(trackers) == 1
    finally:
        supervisor.kill()
        _, err = supervisor.communicate()
    trackers[0].wait(60)
    assert world_segments(world_id) == []
    assert "leaked shared_memory objects" in err


def test_a_worker_that_never_reaches_shutdown_is_named(launch):
    run = launch("--nproc-per-node", "2", "--shutdown-timeout", "2",
                 os.path.join(SCRIPTS, "never_shuts_down.py"))
    assert run.returncode != 0
    assert "worker rank(s) [1] did not reach shutdown() within 2 s" in run.stderr
