"""torch's own RPC test suites, run against localrref under ``python -m localrref.run``.

    pip install -e ".[torch-suites]"          # torch's test utilities import expecttest
    python tools/torch_suites.py                              # the default suites
    python tools/torch_suites.py --suites RpcTest -k rref     # any pytest -k filter

The wheel ships the suites torch runs on each of its agents
(``torch/testing/_internal/distributed/``): written against the generic
``RpcAgentTestFixture``, each test spawns its world with
``MultiProcessTestCase`` (``multiprocessing`` spawn, ``file://`` rendezvous)
and calls ``rpc.init_rpc`` with TensorPipe options. Here each suite is mixed
with a fixture of our own, as torch's ``rpc_utils.generate_tests`` mixes in
its TensorPipe one, and pytest runs the result under the runner, so that
``torch.distributed.rpc`` in the test processes is localrref.

Some tests are torch's alone and are expected to fail: TorchScript's own
RRef type (a ``ScriptFunction`` taking an ``RRef[T]``, ``_RemoteModule``
with a module interface), CUDA and device maps, the callee's events in the
legacy profiler, the faulty agent's ``SCRIPT_*`` message types (localrref
sends builtin and TorchScript calls as ``PYTHON_*`` ones), and tests that
reach into torch's private agent and internals. The summary lists every
failure with the first line of its error, so a new one stands out.
``FaultyAgentRpcTest`` runs with torch's own faulty fixture: its
``FaultyTensorPipeRpcBackendOptions`` become localrref's faults.

Each test starts four fresh interpreters (torch's harness), so a suite takes
minutes: RpcTest, the largest, about an hour on two cores.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading

SUITES = {
    "DistOptimizerTest": "torch.testing._internal.distributed.rpc.dist_optimizer_test",
    "ParameterServerTest":
        "torch.testing._internal.distributed.rpc.examples.parameter_server_test",
    "ReinforcementLearningRpcTest":
        "torch.testing._internal.distributed.rpc.examples.reinforcement_learning_rpc_test",
    "RemoteModuleTest": "torch.testing._internal.distributed.nn.api.remote_module_test",
    "ThreeWorkersRemoteModuleTest":
        "torch.testing._internal.distributed.nn.api.remote_module_test",
    "DdpUnderDistAutogradTest": "torch.testing._internal.distributed.ddp_under_dist_autograd_test",
    "DdpComparisonTest": "torch.testing._internal.distributed.ddp_under_dist_autograd_test",
    "DistAutogradTest": "torch.testing._internal.distributed.rpc.dist_autograd_test",
    "RpcTest": "torch.testing._internal.distributed.rpc.rpc_test",
    "TensorPipeAgentRpcTest": "torch.testing._internal.distributed.rpc.rpc_test",
    # With torch's own fixture: torch's faulty agent's options, which localrref
    # takes as its FaultyRpcBackendOptions.
    "FaultyAgentRpcTest": "torch.testing._internal.distributed.rpc.faulty_agent_rpc_test",
}
DEFAULT = ("DistOptimizerTest,ParameterServerTest,ReinforcementLearningRpcTest,"
           "RemoteModuleTest,ThreeWorkersRemoteModuleTest,DdpUnderDistAutogradTest,"
           "DdpComparisonTest")

MODULE = '''\
import importlib

import torch.distributed.rpc as rpc
from torch.testing._internal.common_distributed import MultiProcessTestCase
from torch.testing._internal.common_utils import run_tests
from torch.testing._internal.distributed.rpc.rpc_agent_test_fixture import RpcAgentTestFixture


class LocalrrefFixture(RpcAgentTestFixture):
    """torch's TensorPipe fixture, without its private backend registry."""

    @property
    def rpc_backend(self):
        return rpc.BackendType.TENSORPIPE

    @property
    def rpc_backend_options(self):
        return rpc.TensorPipeRpcBackendOptions(init_method=self.init_method)

    def get_shutdown_error_regex(self):
        return ".*"

    def get_timeout_error_regex(self):
        return "RPC ran for more than"


class SpawnHelper(MultiProcessTestCase):
    def setUp(self):
        super().setUp()
        self._spawn_processes()


def _fixture(name):
    if name.startswith("Faulty"):
        from torch.testing._internal.distributed.rpc.faulty_rpc_agent_test_fixture import (
            FaultyRpcAgentTestFixture)
        return FaultyRpcAgentTestFixture
    return LocalrrefFixture


for _name, _where in {suites!r}.items():
    _suite = getattr(importlib.import_module(_where), _name)
    _class = type("Lrr" + _name, (_suite, _fixture(_name), SpawnHelper), {{}})
    _class.__module__ = __name__  # the spawned processes find it here
    globals()["Lrr" + _name] = _class
del _suite, _class

if __name__ == "__main__":
    run_tests()
'''


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suites", default=DEFAULT,
                        help=f"comma list of {', '.join(SUITES)} (default: {DEFAULT})")
    parser.add_argument("-k", dest="keyword", default=None, help="pytest -k expression")
    parser.add_argument("--timeout", type=float, default=7200.0,
                        help="seconds for the whole run (default 7200)")
    parser.add_argument("--test-timeout", type=float, default=300.0,
                        help="seconds for one test before pytest-timeout fails it, with "
                             "every thread's stack (default 300)")
    args = parser.parse_args(argv)
    names = [name for name in args.suites.split(",") if name]
    unknown = [name for name in names if name not in SUITES]
    if unknown:
        parser.error(f"unknown suite(s) {unknown}; choose from {sorted(SUITES)}")
    with tempfile.TemporaryDirectory(prefix="localrref-torch-suites-") as where:
        path = os.path.join(where, "test_torch_suites_on_localrref.py")
        with open(path, "w") as f:
            f.write(MODULE.format(suites={name: SUITES[name] for name in names}))
        command = [sys.executable, "-m", "localrref.run", "-m", "pytest", path, "-q",
                   "-p", "no:cacheprovider", "-o", "addopts=", "-rfE",
                   f"--timeout={args.test_timeout:.0f}"]
        if args.keyword:
            command += ["-k", args.keyword]
        # pytest's output goes to stderr as it comes (a long run shows its
        # progress, and a run cut short leaves what it did) and is kept for
        # the summary.
        lines: list[str] = []
        # Its own session: at --timeout the whole group goes, the test's
        # worker processes with pytest.
        # torch's harness makes a temporary file per test for its file://
        # rendezvous and never removes it: keep them in this run's directory.
        scratch = os.path.join(where, "tmp")
        os.mkdir(scratch)
        env = dict(os.environ, TMPDIR=scratch)
        process = subprocess.Popen(command, cwd=where, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, start_new_session=True,
                                   env=env)

        def kill_group() -> None:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

        timer = threading.Timer(args.timeout, kill_group)
        timer.start()
        try:
            for line in process.stdout:
                lines.append(line)
                sys.stderr.write(line)
            returncode = process.wait()
        finally:
            timer.cancel()
            if process.poll() is None:
                kill_group()
                process.wait()
        if returncode < 0:
            print(f"torch_suites: the run was killed (signal {-returncode}; --timeout is "
                  f"{args.timeout:.0f} s)", file=sys.stderr)
    print(summary("".join(lines)))
    return returncode


_SECTION = re.compile(r"^_{3,} (\S+) _{3,}$")
_ERROR = re.compile(r"^E\s+((?:\w+\.)*\w+(?:Error|Exception)\b.*)")
_WRAPPER = re.compile(r"^RuntimeError: Process \d+ exited with error code")


def summary(output: str) -> str:
    """Pytest's totals, then each failed test with the error that failed it.

    torch's harness re-raises a worker's failure as "Process N exited with
    error code 10 and exception: <traceback>": the first worker's own error
    is the first error line of that section that is not this wrapper (the
    others' usually follow from it).
    """
    lines = output.splitlines()
    reasons: dict[str, str] = {}
    section = None
    for line in lines:
        header = _SECTION.match(line)
        if header:
            section = header.group(1)
            continue
        error = _ERROR.match(line)
        if section and error and not _WRAPPER.match(error.group(1)):
            reasons.setdefault(section, error.group(1))
    totals = next((line for line in reversed(lines) if re.search(r"\d+ (passed|failed)", line)),
                  "(no pytest summary line; its output follows)\n" + output[-4000:])
    out = [totals.strip("= ")]
    for line in lines:
        if line.startswith(("FAILED ", "ERROR ")):
            test = line.split(" - ")[0].split("::", 1)[-1]
            reason = reasons.get(test.replace("::", "."), line.partition(" - ")[2])
            out.append(textwrap.shorten(f"  {test}: {reason}", 200))
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
