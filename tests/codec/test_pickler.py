"""Payload pickling: tensors (inline, shared memory, bare), RRef side tables, failures."""

import gc
import os
import pickle
import subprocess
import sys
import weakref

import pytest
import torch

from localrref.codec.pickler import _inline_tensor, dumps, loads
from localrref.dtypes import DTYPES
from localrref.transport.shm import ShmMapper, ShmPool, new_world_id, \
    sweep_world_segments, world_segments


@pytest.fixture
def lane():
    world = new_world_id()
    pool, mapper = ShmPool(world, 0, threshold=1024), ShmMapper()
    yield pool, mapper
    pool.close()
    mapper.close()
    sweep_world_segments(world)


def round_trip(obj, lane, **kw):
    pool, mapper = lane
    encoded = dumps(obj, pool=pool, **kw)
    return encoded, loads(encoded.data, mapper=mapper, rrefs=kw.pop("rrefs", ()))[0]


def sample(dtype, n):
    if dtype == torch.bool:
        return torch.arange(n) % 3 == 0
    if dtype.is_complex:
        return torch.complex(torch.arange(n, dtype=torch.float32),
                             -torch.arange(n, dtype=torch.float32)).to(dtype)
    if dtype.is_floating_point:
        return (torch.arange(n, dtype=torch.float32) / 7).to(dtype)
    return (torch.arange(n) % 100).to(dtype)


@pytest.mark.parametrize("dtype", [d for d in DTYPES if d not in (
    torch.complex32, getattr(torch, "float8_e4m3fn", None), getattr(torch, "float8_e5m2", None))],
    ids=str)
@pytest.mark.parametrize("n", [0, 3, 4096], ids=["empty", "inline", "shared"])
@pytest.mark.parametrize("bare", [True, False], ids=["bare", "in-tuple"])
def test_tensors_round_trip_exactly(dtype, n, bare, lane):
    tensor = sample(dtype, n)
    _, back = round_trip(tensor if bare else (1, [tensor], {"k": tensor}), lane)
    got = back if bare else back[1][0]
    assert got.dtype == dtype and got.shape == tensor.shape and torch.equal(got, tensor)
    if not bare:
        assert back[2]["k"] is got  # one tensor, pickled once, comes back once


@pytest.mark.parametrize("dtype", [torch.float32, torch.int64, torch.bool, torch.bfloat16],
                         ids=str)  # the first three through numpy, bfloat16 without
def test_an_inline_tensor_arrives_in_memory_of_its_own_and_not_as_a_view(dtype):
    sent = sample(dtype, 6).reshape(2, 3)
    encoded = dumps(sent)
    back, _ = loads(encoded.data)
    assert torch.equal(back, sent) and back.dtype == dtype and back.is_contiguous()
    assert not back._is_view() and back._base is None
    assert not back.untyped_storage().resizable()  # as frombuffer's: sent whole, kept whole
    if dtype == torch.bool:
        back.logical_not_()
    else:
        back.add_(1)
    assert torch.equal(loads(encoded.data)[0], sent)  # the frame's bytes untouched
    # A frame whose bytes outnumber its shape's (forged): as before, the
    # tensor takes the leading bytes.
    data = memoryview(sent.contiguous().view(-1).view(torch.uint8).numpy().tobytes() + b"\0" * 8)
    odd = _inline_tensor(data, dtype, (2, 3), False, False)
    assert torch.equal(odd, sent)


def test_a_bare_tensor_is_not_a_pickle_and_a_parameter_keeps_its_type(lane):
    encoded, back = round_trip(torch.ones(8), lane)
    assert encoded.data[:1] == b"\x00" and torch.equal(back, torch.ones(8))
    param = torch.nn.Parameter(torch.ones(2048))
    encoded, back = round_trip(param, lane)
    assert encoded.data[:1] == b"\x80"  # Parameters go through the pickler
    assert type(back) is torch.nn.Parameter and back.requires_grad and torch.equal(back, param)


def test_views_arrive_with_their_values_and_grad_flags(lane):
    base = torch.arange(64 * 64, dtype=torch.float32).reshape(64, 64)
    for view in (base.t(), base[::2, 1::3], base[5]):
        for requires_grad in (False, True):
            sent = view.detach().clone().requires_grad_(requires_grad) if requires_grad \
                else view
            _, back = round_trip(sent, lane)
            assert torch.equal(back.detach(), view) and back.requires_grad == requires_grad


def test_a_received_shared_tensor_is_a_copy_and_frees_its_block(lane):
    pool, _ = lane
    sent = torch.ones(4096)
    encoded, back = round_trip(sent, lane)
    assert len(encoded.tensor_handles) == 1
    back.fill_(5)
    assert bool((sent == 1).all())
    assert pool.stats().blocks_in_use == 1
    del back
    assert pool.stats().blocks_in_use == 0


def test_rrefs_become_side_table_indices():
    class FakeRRef:
        pass

    forked = []
    a, b = FakeRRef(), FakeRRef()
    encoded = dumps([a, b, a], fork=lambda r: forked.append(r) or f"fork{len(forked)}",
                    rref_type=FakeRRef)
    # The same RRef twice is forked once and comes back as one object.
    assert forked == [a, b] and encoded.forks == ("fork1", "fork2")
    value, unused = loads(encoded.data, rrefs=[["x"], ["y"], ["spare"]])
    assert value == [["x"], ["y"], ["x"]] and value[0] is value[2] and unused == [2]


def test_one_tensor_twice_in_a_payload_is_exported_once_and_arrives_once(lane):
    pool, _ = lane
    big, small = torch.ones(4096), torch.zeros(3)
    encoded, back = round_trip([big, small, big, small, torch.zeros(3)], lane)
    assert len(encoded.tensor_handles) == 1
    assert back[0] is back[2] and back[1] is back[3] and back[4] is not back[1]
    assert torch.equal(back[4], small)


def test_both_ends_let_go_of_a_payload_without_the_cyclic_collector(lane):
    # RRefs and tensors of a payload must die when the caller drops them (the
    # owner is told at once): neither the pickler nor the unpickler may keep
    # them in a memo that only a gc pass would free.
    class FakeRRef:
        pass

    rref, tensor, module = FakeRRef(), torch.ones(3), torch.nn.Linear(2, 2)
    sent = [weakref.ref(rref), weakref.ref(tensor), weakref.ref(module)]
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        encoded = dumps({"r": rref, "t": tensor, "m": module}, fork=lambda r: "f",
                        rref_type=FakeRRef, pool=lane[0])
        del rref, tensor, module
        assert [ref() for ref in sent] == [None, None, None]
        value, _ = loads(encoded.data, rrefs=[FakeRRef()], mapper=lane[1])
        got = [weakref.ref(value["r"]), weakref.ref(value["t"]), weakref.ref(value["m"])]
        del value
        assert [ref() for ref in got] == [None, None, None]
    finally:
        if was_enabled:
            gc.enable()


def test_a_module_arrives_whole_and_its_ordered_dicts_keep_their_type(lane):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 4096), torch.nn.ReLU(), torch.nn.Linear(4096, 2))
    model.register_buffer("steps", torch.tensor(3))
    encoded, back = round_trip(model, lane)
    assert len(encoded.tensor_handles) == 3  # all but the last bias are over the lane's 1 KiB
    assert type(back._modules) is type(model._modules) and list(back._modules) == ["0", "1", "2"]
    x = torch.randn(5, 8)
    torch.testing.assert_close(back(x), model(x))
    assert [type(p) for p in back.parameters()] == [torch.nn.Parameter] * 4
    assert back.steps.item() == 3 and all(p.requires_grad for p in back.parameters())


@pytest.mark.parametrize("bare", [True, False], ids=["bare", "in-tuple"])
def test_a_dtype_without_a_code_travels_as_its_raw_bytes(bare, lane):
    dtype = torch.float8_e4m3fnuz  # no code in DTYPES, and numpy has no such type
    sent = torch.arange(6, dtype=torch.float32).reshape(2, 3).to(dtype)
    _, back = round_trip(sent if bare else (sent,), lane)
    back = back if bare else back[0]
    assert back.dtype == dtype and back.shape == (2, 3)
    assert torch.equal(back.view(torch.uint8), sent.view(torch.uint8))


def test_an_unpicklable_object_is_named_and_forks_are_abandoned():
    class FakeRRef:
        pass

    abandoned = []
    with pytest.raises(TypeError, match="not picklable.*lambda"):
        dumps([FakeRRef(), lambda: 1], fork=lambda r: "f", abandon=abandoned.append,
              rref_type=FakeRRef)
    assert abandoned == ["f"]


def test_nothing_is_left_in_dev_shm_after_close():
    world = new_world_id()
    pool, mapper = ShmPool(world, 0, threshold=1), ShmMapper()
    back = loads(dumps(torch.ones(10), pool=pool).data, mapper=mapper)[0]
    del back
    pool.close()
    mapper.close()
    assert world_segments(world) == []


def module_level_function(x):
    return x


@pytest.mark.parametrize("obj", [
    (module_level_function, (), {}),
    (len, (1, 2.5, "three", b"four", None, True, 3j), {"k": [1, 2, {"n": 3}]}),
    {(1, 2): "tuple keys", "nested": [[[]]]},
], ids=["no-args", "scalars", "tuple-keys"])
def test_plain_payloads_skip_the_tensor_hooks_and_round_trip(obj, lane):
    encoded, back = round_trip(obj, lane)
    assert encoded.data[:1] == b"\x01" and encoded.forks == () and encoded.tensor_handles == ()
    assert back == obj


@pytest.mark.parametrize("obj", [
    (module_level_function, (torch.ones(3),), {}),                 # a tensor
    [[[[[[1]]]]]],                                                  # deeper than the scan looks
    tuple(range(17)),                                               # longer than it looks
    (module_level_function, (), {"x": torch.nn.Parameter(torch.ones(2))}),
])
def test_anything_the_scan_cannot_vouch_for_takes_the_full_path(obj, lane):
    encoded, back = round_trip(obj, lane)
    assert encoded.data[:1] != b"\x01"
    assert repr(back) == repr(obj)


def test_a_plain_looking_payload_that_will_not_pickle_is_still_named():
    def local_function():
        return 1
    with pytest.raises(TypeError, match="not picklable.*local_function"):
        dumps((local_function, (), {}))


@pytest.mark.parametrize("n", [4, 4096], ids=["inline", "shared"])
def test_conjugate_and_negative_views_arrive_with_their_values(n, lane):
    # torch keeps these lazy: the memory holds the unconjugated, unnegated values.
    conj = torch.complex(torch.arange(float(n)), torch.ones(n)).conj()
    neg = torch._neg_view(torch.arange(float(n)))
    for view in (conj, neg):
        _, back = round_trip(view, lane)
        assert torch.equal(back, view)


@pytest.mark.parametrize("size", [4, 4096])  # inline, and through shared memory
def test_tensors_requiring_grad_are_found_in_the_same_order_on_both_sides(size, lane):
    # What distributed autograd's send and recv records pair up by position.
    pool, mapper = lane
    w = torch.randn(size, requires_grad=True)
    hidden = w * 2                                   # not a leaf: travels as values
    param = torch.nn.Parameter(torch.randn(size))
    plain = torch.randn(size)
    payload = {"a": [hidden, plain, (param, hidden)], "b": w, "c": torch.zeros(2)}
    sent: list = []
    encoded = dumps(payload, pool=pool, grads=sent)
    assert [id(t) for t in sent] == [id(hidden), id(param), id(w)]  # hidden once
    got: list = []
    received = loads(encoded.data, mapper=mapper, grads=got)[0]
    assert [id(t) for t in got] == [id(received["a"][0]), id(received["a"][2][0]),
                                    id(received["b"])]
    assert all(t.requires_grad and t.grad_fn is None for t in got)  # leaves on arrival
    assert received["a"][2][1] is received["a"][0]
    for mine, theirs in zip(sent, got):
        assert torch.equal(mine.detach(), theirs.detach())


def test_a_bare_tensor_requiring_grad_is_found_once(lane):
    pool, mapper = lane
    for tensor in (torch.randn(3, requires_grad=True), torch.randn(3)):
        sent, got = [], []
        encoded = dumps(tensor, pool=pool, grads=sent)
        loads(encoded.data, mapper=mapper, grads=got)
        assert len(sent) == len(got) == int(tensor.requires_grad)
    # A layout torch's own reducer carries (sparse) is seen by neither side,
    # so the positions of the others still pair up.
    sparse = torch.eye(3).to_sparse().requires_grad_()
    dense = torch.randn(3, requires_grad=True)
    sent, got = [], []
    loads(dumps([sparse, dense], pool=pool, grads=sent).data, mapper=mapper, grads=got)
    assert [id(t) for t in sent] == [id(dense)] and len(got) == 1
    assert torch.equal(got[0].detach(), dense.detach())


def _shares(a, b) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


@pytest.mark.parametrize("size", [16, 4096], ids=["inline", "shared"])
def test_tensors_on_one_storage_arrive_on_one_storage_once(size, lane):
    pool, _ = lane
    base = torch.arange(float(size))
    as_ints = base.view(torch.int32)  # torch's RPC delivers this one as floats; not here
    grid = base.view(-1, 4).t()
    payload = [base, (grid, [as_ints]), base[1:], torch.arange(float(size))]
    encoded, back = round_trip(payload, lane)
    got_base, (got_grid, [got_ints]), got_tail, other = back
    assert len(encoded.tensor_handles) == (2 if size == 4096 else 0)  # base's, other's
    for got, sent in ((got_base, base), (got_grid, grid), (got_ints, as_ints),
                      (got_tail, base[1:])):
        assert got.dtype == sent.dtype and got.stride() == sent.stride()
        assert torch.equal(got, sent) and _shares(got, got_base)
    assert not _shares(other, got_base)
    got_base[1] = -1.0
    assert got_tail[0].item() == -1.0 and got_grid[1, 0].item() == -1.0
    # The sender's tensors are untouched, and the block is held until every
    # tensor on it is gone.
    assert base[1].item() == 1.0
    if size == 4096:
        del got_base, got_grid, got_ints, got_tail, back, got  # no cycle holds them
        assert pool.stats().blocks_in_use == 1  # other's
        del other
        assert pool.stats().blocks_in_use == 0


def test_views_torch_would_compact_arrive_on_storages_of_their_own(lane):
    base = torch.arange(4096.)
    middle = base[100:200]
    payload = [base, base[:100], middle, middle]
    _, back = round_trip(payload, lane)
    assert not _shares(back[0], back[1]) and not _shares(back[1], back[2])
    assert back[2] is back[3]
    assert back[1].untyped_storage().nbytes() == 400


def test_shared_storages_keep_grad_flags_parameters_and_autograd_order(lane):
    pool, mapper = lane
    weight = torch.nn.Parameter(torch.randn(64, 64))
    leaf = torch.randn(64, requires_grad=True)
    payload = [weight, weight.detach().t(), leaf, leaf.detach()[2:]]
    sent: list = []
    encoded = dumps(payload, pool=pool, grads=sent)
    got: list = []
    back = loads(encoded.data, mapper=mapper, grads=got)[0]
    assert type(back[0]) is torch.nn.Parameter and not back[1].requires_grad
    assert _shares(back[0], back[1]) and _shares(back[2], back[3])
    assert [id(t) for t in sent] == [id(weight), id(leaf)]
    assert [id(t) for t in got] == [id(back[0]), id(back[2])]


def test_a_view_naming_a_tensor_the_payload_does_not_have_is_refused():
    from localrref.codec import pickler
    base = torch.arange(8.)
    storages = pickler._Storages()
    storage = base.untyped_storage()
    storages.whole[(storage.data_ptr(), storage.nbytes())] = 7  # a hostile sender's claim
    pid = pickler._tensor_pid(base[1:], None, [], None, storages)
    assert pid[:1] == pickler._VIEW_TAG
    with pytest.raises(pickle.UnpicklingError, match="storage of tensor 7 of its payload"):
        pickler._view_tensor(pid, [base])


_SCRIPTED = '''
import torch

@torch.jit.script
def twice_plus(t: torch.Tensor, k: int) -> torch.Tensor:
    return t * 2 + k
'''

_RECEIVER = '''
import sys
import torch
from localrref.codec.pickler import loads
fn, args, kwargs = loads(sys.stdin.buffer.read())[0]
assert "lrr_scripted" in sys.modules, "the module was imported to find the function"
print(type(fn).__name__, fn(*args, **kwargs).tolist())
'''


def test_a_torchscript_function_travels_by_name_and_its_module_is_imported_there(
        tmp_path, monkeypatch):
    (tmp_path / "lrr_scripted.py").write_text(_SCRIPTED)
    monkeypatch.syspath_prepend(str(tmp_path))
    import lrr_scripted
    encoded = dumps((lrr_scripted.twice_plus, (torch.ones(2),), {"k": 1}))
    assert b"__torch__.lrr_scripted.twice_plus" in encoded.data
    receiver = subprocess.run(
        [sys.executable, "-c", _RECEIVER], input=encoded.data, capture_output=True,
        timeout=60, env={**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(tmp_path), os.environ.get("PYTHONPATH", "")])})
    assert receiver.returncode == 0, receiver.stderr.decode()[-2000:]
    assert receiver.stdout.decode().split() == ["ScriptFunction", "[3.0,", "3.0]"]


def test_a_torchscript_function_no_module_defines_is_refused_by_name():
    from localrref.codec import pickler
    with pytest.raises(pickle.UnpicklingError,
                       match=r"__torch__\.no_such_module\.f is not known in this process"):
        pickler._script_function("__torch__.no_such_module.f")
