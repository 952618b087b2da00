"""Which engine runs a world: localrref on one machine, torch.distributed.rpc beyond it.

The rules are pure (``localrref.handover.choose``); the process tests that
run whole programs through the hand-over are in
``tests/launch/test_handover_worlds.py``.
"""

from __future__ import annotations

import pytest
from torch.distributed.rpc import BackendType

import localrref
from localrref import api
from localrref.handover import Engine, choose

TORCHRUN_2_NODES = {"GROUP_WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "WORLD_SIZE": "4",
                    "RANK": "3", "MASTER_ADDR": "node0", "MASTER_PORT": "29400"}


def engine(backend=None, environ=None, *, launcher_world=False, remote_host=None):
    return choose(backend, environ or {}, launcher_world=launcher_world,
                  remote_host=lambda: remote_host).engine


def test_one_machine_stays_on_localrref():
    assert engine() is Engine.LOCALRREF
    # torchrun --standalone: every worker is local.
    assert engine(environ={"GROUP_WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "4",
                           "WORLD_SIZE": "4"}) is Engine.LOCALRREF
    # torch programs pass torch's backend routinely: that is no request for torch.
    assert engine(BackendType.TENSORPIPE) is Engine.LOCALRREF


def test_a_world_across_machines_hands_over_and_says_why():
    choice = choose(None, TORCHRUN_2_NODES, launcher_world=False, remote_host=lambda: None)
    assert choice.engine is Engine.TORCH and "torchrun started 2 nodes" in choice.reason
    local = {"LOCAL_WORLD_SIZE": "2", "WORLD_SIZE": "6"}
    assert "2 of the 6 workers" in choose(None, local, launcher_world=False,
                                          remote_host=lambda: None).reason
    choice = choose(None, {}, launcher_world=False, remote_host=lambda: "10.1.2.3")
    assert choice.engine is Engine.TORCH and "another host (10.1.2.3)" in choice.reason


def test_asking_wins_over_what_the_world_looks_like():
    assert engine("torch") is Engine.TORCH
    assert engine("TORCH", launcher_world=True) is Engine.TORCH
    assert engine(environ={"LOCALRREF_BACKEND": "torch"}) is Engine.TORCH
    assert engine("localrref", TORCHRUN_2_NODES) is Engine.LOCALRREF
    assert engine(environ={**TORCHRUN_2_NODES, "LOCALRREF_BACKEND": "localrref"}) \
        is Engine.LOCALRREF
    # The argument beats the environment.
    assert engine("localrref", {"LOCALRREF_BACKEND": "torch"}) is Engine.LOCALRREF


def test_a_localrref_launcher_world_stays_on_localrref():
    assert engine(environ=TORCHRUN_2_NODES, launcher_world=True) is Engine.LOCALRREF


def test_the_rendezvous_host_is_looked_up_only_when_nothing_else_decided():
    def never():
        raise AssertionError("looked up")
    for backend, environ, launcher_world in (("torch", {}, False), (None, {}, True),
                                              (None, TORCHRUN_2_NODES, False)):
        choose(backend, environ, launcher_world=launcher_world, remote_host=never)


def test_unknown_backends_are_named_with_the_valid_ones():
    # torch's TypeError and words ("Argument backend must be a member of
    # BackendType"), then what localrref takes.
    with pytest.raises(TypeError, match=r"^Argument backend must be a member of BackendType, "
                                        r"got 'gloo'.*'localrref'.*'torch'"):
        engine("gloo")
    with pytest.raises(TypeError, match=r"Argument backend must be a member of BackendType, "
                                        r"got 3"):
        engine(3)
    with pytest.raises(ValueError, match=r"LOCALRREF_BACKEND='tensorpipe': set it to "
                                         r"'localrref' or 'torch'"):
        engine(environ={"LOCALRREF_BACKEND": "tensorpipe"})


def test_the_rendezvous_host_decides_only_when_it_is_another_machine(monkeypatch):
    options = localrref.RpcBackendOptions
    assert api._remote_host(options(init_method="tcp://192.0.2.7:29500")) == "192.0.2.7"
    assert api._remote_host(options(init_method="tcp://localhost:29500")) is None
    assert api._remote_host(options(init_method="file:///tmp/x")) is None
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    assert api._remote_host(None) is None
    monkeypatch.setenv("MASTER_ADDR", "192.0.2.8")
    assert api._remote_host(None) == "192.0.2.8"
    monkeypatch.delenv("MASTER_ADDR")  # reported later, in torch's words, by the local path
    assert api._remote_host(None) is None


def test_without_init_rpc_every_function_says_so():
    for call in (lambda: localrref.rpc_sync("w", max), lambda: localrref.get_worker_info(),
                 lambda: localrref.shutdown(), lambda: localrref.get_debug_info(),
                 lambda: localrref.share_tensor(None), lambda: localrref.get_rpc_timeout()):
        with pytest.raises(RuntimeError, match="RPC has not been initialized"):
            call()


def test_the_api_forwards_while_torchs_init_rpc_runs(monkeypatch, capsys):
    # torch's agent serves peers before its init_rpc returns: a function they
    # run here may call localrref's API already (seen under load: the main
    # job's trainer asked get_worker_info() inside the ps's first call).
    import torch.distributed.rpc as torch_rpc

    from localrref import handover
    seen = []

    def init_rpc(name, **kwargs):
        seen.append(handover.active())
        if name == "fails":
            raise RuntimeError("the store is gone")

    monkeypatch.setattr(torch_rpc, "init_rpc", init_rpc)
    try:
        handover.start("w0", 0, 2, None, "asked")
        assert seen == [torch_rpc] and handover.active() is torch_rpc
    finally:
        handover.stop()
    with pytest.raises(RuntimeError, match="the store is gone"):
        handover.start("fails", 0, 2, None, "asked")
    assert handover.active() is None
    assert "this world runs on torch.distributed.rpc (TensorPipe): asked" in capsys.readouterr().err


def test_a_hand_over_puts_torchs_originals_back_while_torch_runs(monkeypatch):
    # Under `python -m localrref.run`, torch's own code reaches its package
    # at every call (dist.rpc.PyRRef): while a world runs on torch, the
    # runner's swaps are undone, and done again when it stops.
    import sys
    import types

    import torch.distributed.rpc as torch_rpc

    from localrref import handover
    package = types.ModuleType("fake_torch_package")
    package.thing = "torch's thing"
    monkeypatch.setattr(handover, "_swaps", [])
    monkeypatch.setitem(sys.modules, "fake_torch_package.sub", "torch's sub")
    handover.swap_in(package, "thing", "our thing")
    handover.swap_in(sys.modules, "fake_torch_package.sub", "our sub")
    assert package.thing == "our thing" and sys.modules["fake_torch_package.sub"] == "our sub"
    assert handover.torch_original("fake_torch_package.thing") == "torch's thing"
    assert handover.torch_original("fake_torch_package.sub") == "torch's sub"
    assert handover.torch_original("torch.distributed.rpc") is torch_rpc  # never swapped here

    during = []
    monkeypatch.setattr(torch_rpc, "init_rpc", lambda name, **kwargs: during.append(
        (package.thing, sys.modules["fake_torch_package.sub"])))
    try:
        handover.start("w0", 0, 2, None, "asked")
        assert during == [("torch's thing", "torch's sub")]
        assert package.thing == "torch's thing"
    finally:
        handover.stop()
    assert package.thing == "our thing" and sys.modules["fake_torch_package.sub"] == "our sub"
