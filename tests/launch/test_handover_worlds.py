"""The hand-over to torch.distributed.rpc, with real processes.

* The main job across two torchrun "nodes" on this host (c10d rendezvous on
  127.0.0.1): every worker sees a world of two nodes and runs on torch's
  TensorPipe; the same script under torchrun ``--standalone`` runs on localrref.
* One localrref program run on both engines (``LOCALRREF_BACKEND``) sees the
  same results from every part of the API.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from lrr_launch_helpers import SCRIPTS, launcher_env
from localrref.launch import rendezvous_dir
from localrref.testing.programs import run_program

pytestmark = pytest.mark.processes
TIMEOUT = 240
NOTICE = "localrref: this world runs on torch.distributed.rpc (TensorPipe)"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def env(tmp_path):
    root = tmp_path / "rt"
    root.mkdir(mode=0o700)
    environ = launcher_env(**{rendezvous_dir.RUNTIME_DIR_ENV: str(root)})
    environ.pop("LOCALRREF_BACKEND", None)
    return environ


def torchrun(log_dir, *args: str) -> list[str]:
    # Without --log-dir torchrun leaves a torchelastic_* directory in /tmp.
    return [sys.executable, "-m", "torch.distributed.run", "--log-dir", str(log_dir), *args]


MAIN_JOB = ["-m", "localrref.examples.parameter_server", "--steps", "40"]


def finish(procs: list[subprocess.Popen]) -> list[tuple[int, str]]:
    deadline = time.monotonic() + TIMEOUT
    results = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            results.append((proc.returncode, out))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return results


@pytest.mark.slow  # CI: test_one_program_sees_the_same_api_on_both_engines hands over too
def test_the_main_job_runs_across_two_torchrun_nodes_on_torch(env, tmp_path):
    port = free_port()
    node = torchrun(tmp_path / "torchrun-logs", "--nnodes", "2", "--nproc-per-node", "2", "--rdzv-backend", "c10d",
                    "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "handover",
                    "--tee", "3", *MAIN_JOB)
    procs = [subprocess.Popen(node, cwd=SCRIPTS, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    results = finish(procs)
    for code, out in results:
        assert code == 0, out
    out = "".join(text for _, text in results)
    # Every one of the four workers handed over, saying why.
    assert out.count(f"{NOTICE}: torchrun started 2 nodes (GROUP_WORLD_SIZE=2)") == 4, out
    assert "ps: 3 trainers, 120 updates" in out and "ps: shutdown complete" in out
    for rank in (1, 2, 3):
        assert f"trainer{rank}: step 40/40" in out
    assert "RRef leak check" not in out  # torch has none: documented


def test_the_same_job_on_one_node_stays_on_localrref(env, tmp_path):
    done = run_program(torchrun(tmp_path / "torchrun-logs", "--standalone", "--nproc-per-node", "4", *MAIN_JOB),
                       cwd=SCRIPTS, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr
    out = done.stdout + done.stderr
    assert NOTICE not in out
    assert "ps: 3 trainers, 120 updates" in out and "ps: shutdown complete" in out


def run_handover_program(env, tmp_path, backend: str | None) -> dict:
    env = dict(env, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    if backend is not None:
        env["LOCALRREF_BACKEND"] = backend
    outfile = tmp_path / f"seen-{backend}.json"
    done = run_program([sys.executable, os.path.join(SCRIPTS, "handover_program.py"),
                        str(outfile)], cwd=SCRIPTS, env=env, capture_output=True, text=True,
                       timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr
    seen = json.loads(outfile.read_text())
    seen["notices"] = done.stderr.count(NOTICE)
    return seen


def test_one_program_sees_the_same_api_on_both_engines(env, tmp_path):
    on_localrref = run_handover_program(env, tmp_path, None)
    on_torch = run_handover_program(env, tmp_path, "torch")
    assert on_localrref.pop("notices") == 0 and on_torch.pop("notices") == 2  # one per worker
    assert on_localrref.pop("rref_type") == "localrref.rref.RRef"
    assert on_torch.pop("rref_type") == "torch._C._distributed_rpc.PyRRef"
    # localrref.nn / localrref.optim hand over to torch's own classes
    assert on_localrref.pop("split_classes") == ["localrref.nn", "localrref.optim"]
    assert on_torch.pop("split_classes") == ["torch.distributed.nn.api.remote_module",
                                             "torch.distributed.optim.optimizer"]
    assert on_torch == on_localrref
    assert on_torch == {
        "sync": [2.0, 2.0], "async": [3.0, 3.0], "proxy": 2, "proxy_async": 5,
        "async_execution": 9, "remote": [0.0, 0.0, 0.0], "local": [1.0], "owner": "worker1",
        "me": "worker0", "peer_id": 1, "timeout": 7.0, "shared": 6.0, "error": "ValueError: True",
        "has_torch_counters": True, "split_step": [0.5, 0.0]}
