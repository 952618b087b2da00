"""Exception types (item 5), error messages (item 6) and tensor layouts (item 7)."""

import pytest

import compat_scenarios as sc

pytestmark = [pytest.mark.processes, pytest.mark.timeout(240)]


def test_torchs_exception_types(world):
    assert world.run(sc.torchs_exception_types)


def test_proxies_look_methods_up_on_the_type(world):
    assert world.run(sc.proxies_look_methods_up_on_the_type)


def test_private_context_calls(world):
    assert world.run(sc.private_context_calls)


def test_received_tensors_are_recv_outputs(world):
    assert world.run(sc.received_tensors_are_recv_outputs)


def test_unused_received_tensors_get_zero_gradients(world):
    assert world.run(sc.unused_received_tensors_get_zero_gradients)


def test_profiled_backward(world):
    assert world.run(sc.profiled_backward)


def test_rpc_profiling_events(world):
    assert world.run(sc.rpc_profiling_events)


def test_remote_errors_keep_their_lines(world):
    assert world.run(sc.remote_errors_keep_their_lines)


def test_tensor_layouts_as_torch_delivers_them(world):
    assert world.run(sc.tensor_layouts_as_torch_delivers_them)


def test_tensors_sharing_a_storage_arrive_sharing_it(world):
    assert world.run(sc.tensors_sharing_a_storage_arrive_sharing_it)


def test_script_functions_run_by_name(world):
    assert world.run(sc.script_functions_run_by_name)
