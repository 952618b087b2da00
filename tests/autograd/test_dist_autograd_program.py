"""Distributed autograd across three real workers, checked against autograd in one process.

``dist_autograd_program.py`` runs one model split across three workers
(nested ``rpc_sync``, an ``rpc_async``, the loss on worker 0) on localrref,
and, in the compatibility run, on torch. Every worker's gradients must equal
what plain autograd computes for the same model in this process, and
``.grad`` must stay empty.

``split_model_program.py`` runs a list of scenarios (hops, several roots,
retain_graph, accumulation, errors, cleanup, remote/to_here, proxies,
DistributedOptimizer, RemoteModule), each checking itself against the same
computation done locally, on either backend.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from localrref.run.runner import NOTICE

HERE = os.path.dirname(os.path.abspath(__file__))
PROGRAM = os.path.join(HERE, "dist_autograd_program.py")
SCENARIOS = os.path.join(HERE, "split_model_program.py")
pytestmark = [pytest.mark.processes, pytest.mark.timeout(240)]


def reference() -> list[list[float]]:
    w = [torch.arange(1.0, 4.0).mul(r + 1).requires_grad_() for r in range(3)]

    def stage1(x):
        h = x * w[1]
        return torch.tanh(h * w[2]) + h

    x = torch.tensor([0.5, -1.0, 2.0])
    loss = (stage1(stage1(x * w[0])) * w[0]).sum()
    return [g.tolist() for g in torch.autograd.grad(loss, w)]


def run(program: str, backend: str, out, runner: bool = False) -> str:
    """Run ``program``; its stderr."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    prefix = ["-m", "localrref.run"] if runner else []
    done = subprocess.run([sys.executable, *prefix, program, backend, str(out)], env=env,
                          cwd=HERE, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    return done.stderr


def run_program(backend: str, tmp_path) -> list[dict]:
    out = tmp_path / backend
    run(PROGRAM, backend, out)
    return [json.loads(open(f"{out}.{rank}").read()) for rank in range(3)]


def run_scenarios(backend: str, tmp_path, runner: bool = False) -> list[str]:
    """The modules the program's rpc, autograd, optimizer and RemoteModule came from."""
    out = tmp_path / f"scenarios-{backend}.json"
    stderr = run(SCENARIOS, backend, out, runner)
    if runner:
        assert stderr.count(NOTICE) == 1, stderr
    seen = json.loads(out.read_text())
    results = seen["scenarios"]
    assert len(results) >= 15, sorted(results)
    failed = {name: text for name, text in results.items() if text != "ok"}
    assert not failed, "\n\n".join(f"{name}:\n{text}" for name, text in failed.items())
    return seen["modules"]


def check(seen: list[dict]) -> None:
    for rank, (record, expected) in enumerate(zip(seen, reference())):
        assert record["entries"] == 1 and record["dot_grad_empty"], (rank, record)
        assert record["grad"] == pytest.approx(expected, rel=1e-5), rank


def test_a_model_split_across_three_workers_gets_autograds_gradients(tmp_path):
    check(run_program("localrref", tmp_path))


@pytest.mark.torch_compat
def test_torch_computes_the_same(tmp_path):
    check(run_program("torch", tmp_path))


def test_split_model_scenarios_match_local_autograd_and_optimizers(tmp_path):
    assert run_scenarios("localrref", tmp_path) == [
        "localrref", "localrref.autograd", "localrref.optim", "localrref.nn"]


@pytest.mark.torch_compat
def test_torch_passes_the_same_scenarios(tmp_path):
    assert run_scenarios("torch", tmp_path) == [
        "torch.distributed.rpc", "torch.distributed.autograd",
        "torch.distributed.optim.optimizer", "torch.distributed.nn.api.remote_module"]


def test_the_torch_program_runs_unchanged_on_localrref_under_the_runner(tmp_path):
    # Its torch.distributed.{rpc,autograd}, DistributedOptimizer and
    # RemoteModule are localrref's there.
    assert run_scenarios("torch", tmp_path, runner=True) == [
        "localrref.run.as_torch_rpc", "localrref.autograd", "localrref.optim", "localrref.nn"]
