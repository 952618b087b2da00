"""How internal futures surface to the application (localrref/agent/futures.py), without processes."""

import gc

import pytest
import torch

from localrref.agent.futures import expose, fail, wait
from localrref.errors import RPCTimeoutError


def test_a_remote_failure_raises_its_type_from_wait_and_value_and_in_callbacks():
    internal = torch.futures.Future()
    exposed = expose(internal)
    seen = []
    exposed.add_done_callback(lambda fut: seen.append(_raised_by(fut.wait)))
    fail(internal, ValueError("remote says no"), user=True)
    assert exposed.done()
    for get in (exposed.wait, exposed.value):
        with pytest.raises(ValueError, match="remote says no"):
            get()
    assert seen == [ValueError]
    # A callback that lets it escape: torch's own rule for then().
    with pytest.raises(RuntimeError, match="(?s)ValueError.*remote says no"):
        exposed.then(lambda fut: fut.wait()).wait()
    # Completed in C++ without an error, as torch's RPC futures: a then()
    # callback that does not look runs to its value.
    assert exposed.then(lambda fut: "ran").wait() == "ran"
    with pytest.raises(ValueError):
        torch.futures.wait_all([exposed])


def test_each_raise_is_a_fresh_copy_that_keeps_nothing_alive():
    internal = torch.futures.Future()
    exposed = expose(internal)
    fail(internal, KeyError("k"), user=True)
    first = _caught(exposed.wait)
    second = _caught(exposed.wait)
    assert type(first) is KeyError and first is not second
    gc.collect()


def test_a_local_failure_fails_the_future_in_cpp_for_torchs_combinators():
    slow = torch.futures.Future()
    internal = torch.futures.Future()
    exposed = expose(internal)
    fail(internal, RPCTimeoutError("RPC ran for more than set timeout (100 ms)"))
    combined = torch.futures.collect_all([expose(slow), exposed])
    assert combined.done(), "collect_all should give up at a failure held in C++"
    with pytest.raises(RuntimeError, match="RPC ran for more than set timeout"):
        exposed.wait()
    slow.set_result(1)


def test_values_pass_through_and_internal_waits_raise_the_type_either_way():
    internal = torch.futures.Future()
    exposed = expose(internal)
    internal.set_result({"a": 1})
    assert exposed.wait() == {"a": 1} and exposed.value() == {"a": 1}
    for remote in (True, False):
        failed = torch.futures.Future()
        fail(failed, ValueError("v"), user=remote)
        with pytest.raises(ValueError):
            wait(failed)


def _caught(get):
    try:
        get()
    except BaseException as exc:  # noqa: BLE001 - the test looks at what it was
        return exc
    raise AssertionError("no exception")


def _raised_by(get):
    return type(_caught(get))


def test_a_remote_runtime_error_fails_in_cpp_and_keeps_its_type():
    internal = torch.futures.Future()
    exposed = expose(internal)
    fail(internal, RuntimeError("The size of tensor a (10) must match"), user=True)
    assert torch.futures.collect_all([expose(torch.futures.Future()), exposed]).done()
    with pytest.raises(RuntimeError, match="size of tensor"):
        exposed.wait()
