"""The public surface is torch's: names, signatures and defaults (trio's export test)."""

import inspect

import pytest
import torch.distributed.rpc as torch_rpc

import localrref

SHARED = ["init_rpc", "rpc_sync", "rpc_async", "remote", "shutdown", "get_worker_info"]


def test_all_is_pinned():
    assert sorted(localrref.__all__) == sorted([
        "init_rpc", "rpc_sync", "rpc_async", "remote", "shutdown", "get_worker_info", "RRef",
        "WorkerInfo", "functions", "spawn", "get_debug_info", "get_rpc_timeout",
        "set_rpc_timeout", "share_tensor", "RpcBackendOptions", "TensorPipeRpcBackendOptions",
        "FaultyRpcBackendOptions", "DEFAULT_RPC_TIMEOUT_SEC", "UNSET_RPC_TIMEOUT",
        "BackendType", "is_available"])
    for name in localrref.__all__:
        assert hasattr(localrref, name), name


def test_torchs_exports_are_here_but_the_backend_registry():
    # A program whose only change is `import localrref as rpc` finds every name
    # of torch's __all__ but the machinery for registering other RPC backends.
    missing = set(torch_rpc.__all__) - set(dir(localrref))
    assert missing == {"AllGatherStates", "BackendValue", "backend_registered",
                       "construct_rpc_backend_options", "init_backend", "method_factory",
                       "new_method", "register_backend"}
    assert localrref.BackendType is torch_rpc.BackendType
    assert localrref.is_available() is True


@pytest.mark.parametrize("name", SHARED)
def test_signatures_match_torch(name):
    ours = inspect.signature(getattr(localrref, name))
    theirs = inspect.signature(getattr(torch_rpc, name))
    assert [(p.name, p.kind, p.default) for p in ours.parameters.values()] == \
        [(p.name, p.kind, p.default) for p in theirs.parameters.values()]


def test_rref_methods_match_torch():
    for method in ["to_here", "local_value", "owner", "owner_name", "is_owner",
                   "confirmed_by_owner", "rpc_sync", "rpc_async", "remote", "_get_future"]:
        assert callable(getattr(localrref.RRef, method)), method
        assert hasattr(torch_rpc.RRef, method), method
    assert inspect.signature(localrref.RRef.to_here).parameters["timeout"].default == -1.0
    public = {name for name in dir(torch_rpc.RRef) if not name.startswith("_")}
    assert public == {name for name in dir(localrref.RRef) if not name.startswith("_")}
    backward = inspect.signature(localrref.RRef.backward).parameters
    assert [(p.name, p.default) for p in list(backward.values())[1:]] == [
        ("dist_autograd_ctx_id", -1), ("retain_graph", False)]  # torch's docstring


def test_defaults_are_torchs():
    from torch.distributed.rpc import constants
    assert localrref.DEFAULT_RPC_TIMEOUT_SEC == constants.DEFAULT_RPC_TIMEOUT_SEC == 60.0
    assert localrref.UNSET_RPC_TIMEOUT == constants.UNSET_RPC_TIMEOUT
    options = localrref.RpcBackendOptions()
    assert (options.rpc_timeout, options.num_worker_threads) == (60.0, 16)
    assert localrref.WorkerInfo is torch_rpc.WorkerInfo
    assert localrref.functions.async_execution is torch_rpc.functions.async_execution


def test_spin_option_defaults_from_the_environment_and_is_checked(monkeypatch):
    monkeypatch.delenv("LOCALRREF_SPIN_US", raising=False)
    assert localrref.RpcBackendOptions().spin_us == 300.0
    monkeypatch.setenv("LOCALRREF_SPIN_US", "0")
    assert localrref.RpcBackendOptions().spin_us == 0.0
    assert localrref.RpcBackendOptions(spin_us=50).spin_us == 50
    monkeypatch.setenv("LOCALRREF_SPIN_US", "fast")
    with pytest.raises(ValueError, match="LOCALRREF_SPIN_US must be a number of microseconds"):
        localrref.RpcBackendOptions()
    with pytest.raises(ValueError, match="spin_us must be >= 0"):
        localrref.RpcBackendOptions(spin_us=-1)


def test_spawn_signature_mirrors_torch():
    import torch.multiprocessing as tmp
    ours = inspect.signature(localrref.spawn)
    theirs = inspect.signature(tmp.spawn)
    assert list(ours.parameters)[:len(theirs.parameters)] == list(theirs.parameters)


def test_calls_before_init_rpc_say_what_to_do():
    # torch's words first (programs match them, anchored), then the fix;
    # torch has one text for its Python API's guard and one for the rest.
    for call in (lambda: localrref.rpc_sync("w1", print),
                 lambda: localrref.rpc_async("w1", print),
                 lambda: localrref.remote(1, print),
                 lambda: localrref.get_worker_info(),
                 lambda: localrref.shutdown()):
        with pytest.raises(RuntimeError, match=r"^RPC has not been initialized. Call "
                                               r"torch.distributed.rpc.init_rpc first..*call "
                                               r"localrref.init_rpc first."):
            call()
    for call in (lambda: localrref.RRef(1),
                 lambda: localrref.get_rpc_timeout()):
        with pytest.raises(RuntimeError, match=r"^Current RPC agent is not set! Did you "
                                               r"initialize the RPC framework.*call "
                                               r"localrref.init_rpc first."):
            call()


def test_init_rpc_outside_a_localrref_world_says_how_to_meet(monkeypatch):
    # As torch: env:// needs MASTER_ADDR and MASTER_PORT; the message says so
    # in torch's words, and how else to start a world.
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(ValueError, match="environment variable MASTER_ADDR expected, but not "
                                         "set.*localrref.spawn"):
        localrref.init_rpc("lonely", rank=0, world_size=2)


def test_rref_is_generic_as_torchs_is():
    # Annotations such as RRef[torch.Tensor] appear in users' code and in
    # torch's own RemoteModule template.
    import typing

    import torch
    alias = localrref.RRef[torch.Tensor]
    assert typing.get_origin(alias) is localrref.RRef
    assert typing.get_args(alias) == typing.get_args(torch_rpc.RRef[torch.Tensor])


def test_options_refuse_what_torchs_refuse_in_torchs_words():
    from datetime import timedelta

    from localrref.api import _options
    with pytest.raises(TypeError, match="incompatible constructor arguments: rpc_timeout must "
                                        "be a number.*timedelta.total_seconds"):
        localrref.TensorPipeRpcBackendOptions(rpc_timeout=timedelta(seconds=3))
    with pytest.raises(TypeError, match="num_worker_threads must be a number"):
        localrref.RpcBackendOptions(num_worker_threads="8")

    class FooBackendOptions(localrref.RpcBackendOptions):  # as torch's rpc_test has it
        pass

    # torch's own name is a class, as torch's is, and is localrref's options.
    tensorpipe = localrref.TensorPipeRpcBackendOptions(rpc_timeout=5, _transports=["uv"])
    assert isinstance(tensorpipe, localrref.TensorPipeRpcBackendOptions)
    assert isinstance(tensorpipe, localrref.RpcBackendOptions) and tensorpipe.rpc_timeout == 5
    assert _options(tensorpipe, torch_rpc.BackendType.TENSORPIPE) is tensorpipe

    own = FooBackendOptions()
    with pytest.raises(TypeError, match="`rpc_backend_options` must be a "
                                        "`TensorPipeRpcBackendOptions`"):
        _options(own, torch_rpc.BackendType.TENSORPIPE)
    with pytest.raises(TypeError, match="Could not infer backend for options"):
        _options(own, None)
    assert _options(own, "localrref") is own  # a backend of its own: the program's to choose
