"""Distributed autograd, DistributedOptimizer and RemoteModule over three real workers.

``split_model_program.py`` runs a list of scenarios (one to three hops and a
loop back to the caller, several roots, retain_graph, accumulation, tensors
that need no grad, errors, cleanup, remote/to_here, proxies,
DistributedOptimizer, RemoteModule), each checking itself against the same
computation done in one process, on localrref, on torch (the compatibility
run), and as an unchanged torch program under ``python -m localrref.run``.
"""

from __future__ import annotations

import json
import os
import socket
import sys

import pytest

from localrref.run.runner import NOTICE
from localrref.testing.programs import run_program

HERE = os.path.dirname(os.path.abspath(__file__))
SCENARIOS = os.path.join(HERE, "split_model_program.py")
pytestmark = [pytest.mark.processes, pytest.mark.timeout(240)]


def run(program: str, backend: str, out, runner: bool = False) -> str:
    """Run ``program``; its stderr."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    prefix = ["-m", "localrref.run"] if runner else []
    done = run_program([sys.executable, *prefix, program, backend, str(out)], env=env,
                       cwd=HERE, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    return done.stderr


def run_scenarios(backend: str, tmp_path, runner: bool = False) -> list[str]:
    """The modules the program's rpc, autograd, optimizer and RemoteModule came from."""
    out = tmp_path / f"scenarios-{backend}.json"
    stderr = run(SCENARIOS, backend, out, runner)
    if runner:
        assert stderr.count(NOTICE) == 1, stderr
    if backend == "localrref" or runner:  # torch prints it for its TorchScript optimizers
        assert "TorchScript" not in stderr, stderr
    seen = json.loads(out.read_text())
    results = seen["scenarios"]
    assert len(results) >= 15, sorted(results)
    failed = {name: text for name, text in results.items() if text != "ok"}
    assert not failed, "\n\n".join(f"{name}:\n{text}" for name, text in failed.items())
    return seen["modules"]


def test_split_model_scenarios_match_local_autograd_and_optimizers(tmp_path):
    assert run_scenarios("localrref", tmp_path) == [
        "localrref", "localrref.autograd", "localrref.optim", "localrref.nn"]


@pytest.mark.torch_compat
def test_torch_passes_the_same_scenarios(tmp_path):
    assert run_scenarios("torch", tmp_path) == [
        "torch.distributed.rpc", "torch.distributed.autograd",
        "torch.distributed.optim.optimizer", "torch.distributed.nn.api.remote_module"]


@pytest.mark.slow  # CI: the runner's own tests run unchanged torch programs (tests/launch)
def test_the_torch_program_runs_unchanged_on_localrref_under_the_runner(tmp_path):
    # Its torch.distributed.{rpc,autograd}, DistributedOptimizer and
    # RemoteModule are localrref's there.
    assert run_scenarios("torch", tmp_path, runner=True) == [
        "localrref.run.as_torch_rpc", "localrref.autograd", "localrref.optim", "localrref.nn"]
