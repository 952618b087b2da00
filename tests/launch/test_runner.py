"""``python -m localrref.run``: unmodified torch RPC programs on localrref.

The program under test (``scripts/torch_rpc_program.py``) is written for
``torch.distributed.rpc`` as torch's tutorials write them: it imports
``torch.distributed.rpc``, starts its workers with
``torch.multiprocessing.spawn`` and meets through ``MASTER_ADDR``/
``MASTER_PORT``. Its rank 0 records which module and RRef class it really
used, so each test sees whether it ran on localrref or on torch.
"""

from __future__ import annotations

import json
import os
import socket
import sys

import pytest

from lrr_launch_helpers import SCRIPTS, launcher_env
from localrref.launch import rendezvous_dir
from localrref.run.runner import NOTICE, SITE_DIR, Plan, UsageError, child_environment, plan
from localrref.testing.programs import run_program

PROGRAM = os.path.join(SCRIPTS, "torch_rpc_program.py")
TIMEOUT = 120
EXPECTED = {"batches": [[6.0] * 3] * 3, "squared": [0.0, 1.0, 4.0, 9.0], "peer": "worker1"}


# -- the plan, without processes ---------------------------------------------

def test_without_nproc_the_program_runs_here():
    assert plan(["train.py", "--lr", "0.1"], {}) == Plan("train.py", ("--lr", "0.1"), False, None)
    assert plan(["-m", "pkg.train", "x"], {}) == Plan("pkg.train", ("x",), True, None)


def test_nproc_hands_the_whole_command_line_to_the_launcher():
    argv = ["--nproc-per-node", "1", "--max-restarts", "2", "train.py", "x"]
    assert plan(argv, {}).launch_argv == tuple(argv)  # 1 is a request too, not "unset"
    assert plan(["train.py"], {"PET_NPROC_PER_NODE": "3"}).launch_argv == ("train.py",)


def test_launcher_options_without_nproc_are_refused_naming_them():
    with pytest.raises(UsageError, match=r"--max-restarts, --redirects: .*--nproc-per-node N"):
        plan(["--max-restarts", "1", "--redirects", "3", "train.py"], {})


def test_no_python_is_refused():
    with pytest.raises(UsageError, match="--no-python"):
        plan(["--nproc-per-node", "2", "--no-python", "echo"], {})


def test_children_find_the_alias_first_on_their_path_once():
    env = child_environment({"PYTHONPATH": os.pathsep.join(["/a", SITE_DIR, "/b"])})
    assert env == {"LOCALRREF_AS_TORCH_RPC": "1",
                   "PYTHONPATH": os.pathsep.join([SITE_DIR, "/a", "/b"])}
    assert child_environment({})["PYTHONPATH"] == SITE_DIR


# -- real programs -------------------------------------------------------------

@pytest.fixture
def env(tmp_path):
    root = tmp_path / "rt"
    root.mkdir(mode=0o700)
    return launcher_env(**{rendezvous_dir.RUNTIME_DIR_ENV: str(root), "MASTER_ADDR": "localhost",
                           "MASTER_PORT": "29500"})


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(args, env, cwd=SCRIPTS):
    return run_program([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                       text=True, timeout=TIMEOUT)


def assert_ran_on_localrref(done, outfile):
    assert done.returncode == 0, done.stderr
    seen = json.loads(outfile.read_text())
    assert {k: seen[k] for k in EXPECTED} == EXPECTED
    # In a process torch.multiprocessing.spawn started, not only in the runner's.
    assert seen["rpc_module"] == "localrref.run.as_torch_rpc"
    assert seen["rref_class"] == "localrref.rref.RRef" and seen["is_rref"]
    assert done.stderr.count(NOTICE) == 1


@pytest.mark.processes
def test_an_unmodified_torch_program_runs_on_localrref(env, tmp_path):
    outfile = tmp_path / "seen.json"
    done = run(["-m", "localrref.run", "torch_rpc_program.py", str(outfile)], env)
    assert_ran_on_localrref(done, outfile)
    # The world is gone when the program returns: its supervisor printed the
    # leak report (rank 0 still held the accumulator at shutdown) and left.
    assert "localrref: leaked RRef" in done.stderr and "value_type=Accumulator" in done.stderr
    assert os.listdir(env[rendezvous_dir.RUNTIME_DIR_ENV]) in ([], ["rendezvous.lock"])


@pytest.mark.processes
def test_an_unmodified_torch_program_under_the_runner_hands_over_to_torch(env, tmp_path):
    # Its workers' `rpc` is localrref's, which forwards to torch's; torch's own
    # code finds torch's package meanwhile (its pickler reaches dist.rpc.PyRRef
    # at every call, its backend imports TensorPipeRpcBackendOptions from it).
    outfile = tmp_path / "seen.json"
    done = run(["-m", "localrref.run", "torch_rpc_program.py", str(outfile)],
               dict(env, LOCALRREF_BACKEND="torch", MASTER_PORT=str(free_port())))
    assert done.returncode == 0, done.stderr
    seen = json.loads(outfile.read_text())
    assert {k: seen[k] for k in EXPECTED} == EXPECTED
    assert seen["rpc_module"] == "localrref.run.as_torch_rpc"
    assert seen["rref_class"] == "torch._C._distributed_rpc.PyRRef"
    assert done.stderr.count("localrref: this world runs on torch.distributed.rpc") == 2


FAULTY = """\
import os, sys, warnings
import torch
import torch.distributed.rpc as rpc
import torch.distributed.rpc._testing  # torch's faulty agent: a submodule torch did not load
from torch.distributed.rpc._testing import FaultyTensorPipeRpcBackendOptions
import torch.multiprocessing as mp

def square(x):
    return x * x

def run(rank):
    options = FaultyTensorPipeRpcBackendOptions(
        num_worker_threads=8, rpc_timeout=60, init_method="env://", num_fail_sends=3,
        messages_to_fail=["PYTHON_REMOTE_CALL", "SCRIPT_REMOTE_CALL",
                          "CLEANUP_AUTOGRAD_CONTEXT_REQ"],
        messages_to_delay={"PYTHON_CALL": 1.5, "SCRIPT_CALL": 1.5})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rpc.init_rpc(f"worker{rank}", rank=rank, world_size=2, rpc_backend_options=options,
                     backend=rpc.backend_registry.BackendType.FAULTY_TENSORPIPE)
    if rank == 0:
        print("warned:", [str(w.message).split(":")[0] for w in caught])
        try:  # the call waits 1.5 s before it leaves
            rpc.rpc_sync("worker1", square, args=(torch.ones(2),), timeout=0.5)
        except RuntimeError as exc:
            print("delayed:", "RPC ran for more than" in str(exc))
        try:  # a builtin operator's call is a SCRIPT_CALL
            rpc.rpc_sync("worker1", torch.add, args=(torch.ones(2), 1), timeout=0.5)
        except RuntimeError as exc:
            print("builtin delayed:", "RPC ran for more than" in str(exc))
        print("answer:", rpc.rpc_sync("worker1", square, args=(torch.ones(2) * 3,)).tolist())
        for dst, func in (("worker1", square), ("worker0", square), ("worker1", torch.neg)):
            rref = rpc.remote(dst, func, args=(torch.ones(2),))  # its send fails
            # torch says the same for worker1; its to_here() on itself
            # hangs (the OwnerRRef waits for a value no job will set).
            try:
                rref.to_here()
            except RuntimeError as exc:
                print("failed:", dst, func.__name__,
                      "RRef creation via rpc.remote() timed out" in str(exc))
            del rref
    rpc.shutdown()

if __name__ == "__main__":
    mp.spawn(run, nprocs=2)
"""


@pytest.mark.processes
def test_torchs_faulty_agent_options_inject_the_same_faults_under_the_runner(env, tmp_path):
    script = tmp_path / "faulty.py"
    script.write_text(FAULTY)
    done = run(["-m", "localrref.run", str(script)], dict(env, MASTER_PORT=str(free_port())))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "warned: ['localrref injects no faults into CLEANUP_AUTOGRAD_CONTEXT_REQ']",
        "delayed: True", "builtin delayed: True", "answer: [9.0, 9.0]",
        "failed: worker1 square True", "failed: worker0 square True", "failed: worker1 neg True"]


@pytest.mark.processes
def test_the_runner_starts_the_workers_with_nproc(env, tmp_path):
    outfile = tmp_path / "seen.json"
    done = run(["-m", "localrref.run", "--nproc-per-node", "2", "torch_rpc_program.py",
                str(outfile)], env)
    assert_ran_on_localrref(done, outfile)


@pytest.mark.processes
def test_the_same_program_with_only_its_import_changed_runs_without_the_runner(env, tmp_path):
    source = open(PROGRAM).read()
    assert source.count("import torch.distributed.rpc as rpc\n") == 1
    changed = tmp_path / "program.py"
    changed.write_text(source.replace("import torch.distributed.rpc as rpc\n",
                                      "import localrref as rpc\n")
                             .replace("from torch.distributed.rpc import RRef\n",
                                      "from localrref import RRef\n"))
    outfile = tmp_path / "seen.json"
    done = run([str(changed), str(outfile)], env, cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr
    seen = json.loads(outfile.read_text())
    assert {k: seen[k] for k in EXPECTED} == EXPECTED
    assert seen["rpc_module"] == "localrref" and seen["rref_class"] == "localrref.rref.RRef"


@pytest.mark.processes
@pytest.mark.torch_compat
def test_the_program_is_a_torch_program(env, tmp_path):
    outfile = tmp_path / "seen.json"
    env["MASTER_PORT"] = "29631"
    done = run([PROGRAM, str(outfile)], env)
    assert done.returncode == 0, done.stderr
    seen = json.loads(outfile.read_text())
    assert {k: seen[k] for k in EXPECTED} == EXPECTED
    assert seen["rpc_module"] == "torch.distributed.rpc" and not seen["is_rref"]


MISSING = """\
import sys
import torch
import torch.distributed.autograd as dist_autograd
import torch.distributed.rpc as rpc
assert not dist_autograd.is_available()  # what torch.jit probes
try:
    getattr(rpc, sys.argv[1])
except AttributeError as exc:
    print(exc)
import localrref.autograd
assert dist_autograd.context is localrref.autograd.context  # localrref's own
assert dist_autograd._retrieve_context is localrref.autograd._retrieve_context
try:
    dist_autograd._init(0)
except AttributeError as exc:
    print(exc)
from torch.distributed.optim import DistributedOptimizer
from torch.distributed.optim.optimizer import DistributedOptimizer as DefinedOptimizer
from torch.distributed.nn import RemoteModule
from torch.distributed.nn.api.remote_module import RemoteModule as Defined
import localrref.nn, localrref.optim
assert DistributedOptimizer is DefinedOptimizer is localrref.optim.DistributedOptimizer
assert RemoteModule is Defined is localrref.nn.RemoteModule
# What torch's own test helpers (torch.testing._internal.dist_utils) reach.
from torch.distributed.rpc import _rref_context_get_debug_info
import torch.distributed.rpc.api as api
api._ignore_rref_leak = False
assert api.rpc_sync is rpc.rpc_sync
assert api._all_gather is rpc.api._all_gather  # a private helper programs use
# torch's _wait_all block, however it is imported, collects localrref's futures.
from torch.distributed.rpc.api import _thread_local_var, _wait_all
assert _wait_all is api._wait_all and _thread_local_var is api._thread_local_var
try:
    api._delete_all_user_and_unforked_owner_rrefs
except AttributeError as exc:
    print(exc)
"""


@pytest.mark.processes
def test_what_localrref_lacks_fails_naming_it_and_the_rest_is_localrrefs(env, tmp_path):
    script = tmp_path / "missing.py"
    script.write_text(MISSING)
    done = run(["-m", "localrref.run", str(script), "_init_rpc_backend"], env)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [line.split(" is not provided by localrref")[0] for line in lines] == [
        "torch.distributed.rpc._init_rpc_backend", "torch.distributed.autograd._init",
        "torch.distributed.rpc.api._delete_all_user_and_unforked_owner_rrefs"]


SITE = """\
import os, subprocess, sys
import torch.distributed.rpc as rpc
child = ("import sys, torch.distributed.rpc as rpc; "
         "print(rpc.__name__, getattr(sys, 'own_site_ran', 'no'))")
print(rpc.__name__, getattr(sys, "own_site_ran", "no"))
print(subprocess.run([sys.executable, "-c", child], capture_output=True, text=True,
                     check=True).stdout.strip())
"""


@pytest.mark.processes
def test_every_python_child_gets_the_alias_and_the_environments_own_sitecustomize(env, tmp_path):
    own = tmp_path / "own_site"
    own.mkdir()
    (own / "sitecustomize.py").write_text("import sys\nsys.own_site_ran = 'yes'\n")
    env["PYTHONPATH"] = os.pathsep.join([str(own), env["PYTHONPATH"]])
    script = tmp_path / "site_check.py"
    script.write_text(SITE)
    done = run(["-m", "localrref.run", str(script)], env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["localrref.run.as_torch_rpc", "yes"] * 2


def test_a_missing_script_is_an_error(env):
    done = run(["-m", "localrref.run", "no_such_program.py"], env)
    assert done.returncode == 2 and "can't open file 'no_such_program.py'" in done.stderr


GC_AT_START = """\
import gc, json, multiprocessing, sys
AT_IMPORT = gc.isenabled()  # run again in the spawn child, as __mp_main__


def target(queue):
    queue.put({"at_import": AT_IMPORT, "in_target": gc.isenabled(),
               "frozen": gc.get_freeze_count() > 0})


if __name__ == "__main__":
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.SimpleQueue()
    child = ctx.Process(target=target, args=(queue,))
    child.start()
    seen = queue.get()
    child.join()
    seen["parent"] = gc.isenabled()
    print(json.dumps(seen))
"""


@pytest.mark.processes
@pytest.mark.parametrize("runner, switch, paused", [
    (True, "", True), (True, "0", False), (False, "", False)])
def test_spawn_children_under_the_runner_import_with_the_collector_paused(env, tmp_path, runner,
                                                                           switch, paused):
    script = tmp_path / "gc_at_start.py"
    script.write_text(GC_AT_START)
    env["LOCALRREF_PAUSE_GC_AT_START"] = switch
    done = run([*(["-m", "localrref.run"] if runner else []), str(script)], env)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.splitlines()[-1])
    # Paused until the target runs, which finds it on again with startup frozen.
    assert seen == {"at_import": not paused, "in_target": True, "frozen": paused,
                    "parent": True}
