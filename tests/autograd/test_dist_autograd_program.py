"""Distributed autograd across three real workers, checked against autograd in one process.

``dist_autograd_program.py`` runs one model split across three workers
(nested ``rpc_sync``, an ``rpc_async``, the loss on worker 0) on localrref,
and, in the compatibility run, on torch. Every worker's gradients must equal
what plain autograd computes for the same model in this process, and
``.grad`` must stay empty.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
PROGRAM = os.path.join(HERE, "dist_autograd_program.py")
pytestmark = [pytest.mark.processes, pytest.mark.timeout(240)]


def reference() -> list[list[float]]:
    w = [torch.arange(1.0, 4.0).mul(r + 1).requires_grad_() for r in range(3)]

    def stage1(x):
        h = x * w[1]
        return torch.tanh(h * w[2]) + h

    x = torch.tensor([0.5, -1.0, 2.0])
    loss = (stage1(stage1(x * w[0])) * w[0]).sum()
    return [g.tolist() for g in torch.autograd.grad(loss, w)]


def run_program(backend: str, tmp_path) -> list[dict]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / backend
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    done = subprocess.run([sys.executable, PROGRAM, backend, str(out)], env=env, cwd=HERE,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    return [json.loads(open(f"{out}.{rank}").read()) for rank in range(3)]


def check(seen: list[dict]) -> None:
    for rank, (record, expected) in enumerate(zip(seen, reference())):
        assert record["entries"] == 1 and record["dot_grad_empty"], (rank, record)
        assert record["grad"] == pytest.approx(expected, rel=1e-5), rank


def test_a_model_split_across_three_workers_gets_autograds_gradients(tmp_path):
    check(run_program("localrref", tmp_path))


@pytest.mark.torch_compat
def test_torch_computes_the_same(tmp_path):
    check(run_program("torch", tmp_path))
