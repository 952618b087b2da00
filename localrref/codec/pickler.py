"""Payloads: Python objects to bytes and back, with RRefs and tensors taken out.

Serialisation happens in the sending thread, before anything is queued
(STYLE rule 5), so an unpicklable argument fails the call that passed it, in
the caller's thread, with a message naming the object.

Two kinds of objects never travel inside the pickle stream:

* **RRefs.** Pickling one runs the protocol's ``prepare_child_fork`` (through
  the ``fork`` hook) and stores only an index into the message's RRef table;
  the receiving core turns the table into records *before* the payload is
  unpickled, and :func:`loads` binds each index to the record it was given.
* **Tensors.** Above the shared-memory threshold a tensor becomes a
  :class:`~localrref.transport.shm.TensorHandle` (one copy into a pooled
  block; the receiver maps it without copying). Below it, its bytes are
  written inline, which is much faster than torch's own reducer for small
  tensors. Tensors of one payload on one storage share it on arrival, the
  storage sent once (:class:`_Storages`), as torch's pickler gives.

If pickling fails after RRefs were forked or tensors exported, the
``abandon`` hooks undo them: a failed call leaks nothing.
"""

from __future__ import annotations

import collections
import copyreg
import ctypes
import importlib
import io
import math
import pickle
import struct
import traceback
import types
from dataclasses import dataclass

import torch

from ..dtypes import DTYPE_CODES, DTYPES

try:
    import numpy
except ImportError:  # torch runs without numpy: inline tensors are then built by torch alone
    numpy = None

__all__ = ["Encoded", "dumps", "loads", "register_reducer", "RemoteException", "wrap_exception",
           "rebuild_exception", "describe_unpicklable"]

_PROTOCOL = pickle.HIGHEST_PROTOCOL
_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)
# A tensor's id is one bytes object: a tag, then a packed header.
_HANDLE_TAG, _PARAM_HANDLE, _INLINE_TAG, _STRIDED_TAG = b"t", b"p", b"i", b"s"
# Another tensor on the storage of an earlier tensor of the same payload:
# the tag, the header of _INLINE, that tensor's index in the payload (pickling
# order, which is unpickling order), then shape, strides and storage offset.
_VIEW_TAG = b"v"
_VIEW_INDEX = struct.Struct("<q")
# Inline: the tag, then dtype code, requires_grad, is_param, ndim; then the
# shape and the C-order bytes ("i"), or the shape, strides, storage offset
# and the storage's bytes ("s").
_INLINE = struct.Struct("<cB??B")
# torch's kMinRecopyBytes (see _tensor_pid).
_RECOPY_MIN_BYTES = 8 * 1024
# A payload that is one tensor's id (a pickle starts with b"\x80").
_BARE_TENSOR = b"\x00"
# A payload that is a plain pickle: nothing in it can be a tensor or an RRef.
_PLAIN_PICKLE = b"\x01"
# Objects of these types pickle without ever holding a tensor or an RRef
# (functions go by name). A payload made only of them, in small containers,
# skips the Pickler and Unpickler subclasses on both sides (a dispatch table
# built per payload, find_class in Python): (func, (1,), {"a": [1, 2, 3]})
# pickles in about 4.5 us instead of 5.7.
_PLAIN_TYPES = frozenset({type(None), bool, int, float, complex, str, bytes,
                          types.FunctionType, types.BuiltinFunctionType})
_PLAIN_MAX_DEPTH, _PLAIN_MAX_ITEMS = 4, 16


@dataclass(frozen=True, slots=True)
class Encoded:
    """A pickled payload and the side tables the message carries with it."""

    data: bytes
    forks: tuple          # RRefForkData, in index order
    tensor_handles: tuple  # TensorHandle objects exported (for release on failure)


# type -> reducer used only inside RPC payloads (torch's
# _internal_rpc_pickler._register_reducer): a type that plain pickle must
# refuse, as torch's RemoteModule does, still travels in an RPC.
_RPC_REDUCERS: dict[type, object] = {}


def register_reducer(cls: type, reducer) -> None:
    """Pickle instances of exactly ``cls`` in RPC payloads with ``reducer(obj)``
    (a ``__reduce__`` result), whatever plain pickle would do with them."""
    _RPC_REDUCERS[cls] = reducer


class _Pickler(pickle.Pickler):
    """Tensors and RRefs leave through ``dispatch_table``, not ``persistent_id``.

    The C pickler calls a ``persistent_id`` hook for every object it meets
    (a module's state is hundreds of them: attribute names, hook dicts,
    ints), one Python call each; a dispatch table is a C dict lookup by
    exact type, so only the tensors and RRefs themselves cost Python (a
    small MLP pickles in about a third of the time). Each reduces to a call
    of a function of this module that the receiver's :class:`_Unpickler`
    binds to its own context (mapper, RRef table, grads) in ``find_class``.
    The pickler memoizes reduced objects, so a tensor or RRef met twice in
    one payload is sent (and forked, and exported) once and arrives as one
    object, as torch's pickler gives.
    """

    def __init__(self, file, *, fork, pool, rref_type, grads):
        # The C pickler reads dispatch_table when it is initialised; a table
        # of its own replaces copyreg's, so copyreg's entries (which user
        # code may extend at any time) are copied in each time.
        table = dict(copyreg.dispatch_table)
        table[collections.OrderedDict] = _reduce_ordered_dict
        table[torch.jit.ScriptFunction] = _reduce_script_function
        table.update(_RPC_REDUCERS)
        table[torch.Tensor] = table[torch.nn.Parameter] = self._reduce_tensor
        if rref_type is not None:
            table[rref_type] = self._reduce_rref
        self.dispatch_table = table
        super().__init__(file, protocol=_PROTOCOL)
        self._fork = fork
        self._pool = pool
        self._grads = grads
        self._storages = _Storages()
        self.forks: list = []
        self.handles: list = []

    def release(self) -> None:
        """Drop the memo (it holds every object pickled) and the table (its
        bound methods make a cycle through this pickler, which would keep the
        memo alive until the cyclic collector runs)."""
        self.clear_memo()
        self.dispatch_table.clear()

    def _reduce_rref(self, rref):
        self.forks.append(self._fork(rref))
        return _rref_at, (len(self.forks) - 1,)

    def _reduce_tensor(self, tensor: torch.Tensor):
        storages = self._storages
        pid = _tensor_pid(tensor, self._pool, self.handles, self._grads, storages)
        if type(pid) is bytes:
            storages.count += 1
            return _tensor_from_pid, (pid,)
        if pid is None:
            return tensor.__reduce_ex__(_PROTOCOL)  # torch's own reducer (sparse, quantized)
        return _tensor_from_bytes, pid


_EMPTY_ORDERED_DICT = (collections.OrderedDict, ())


def _reduce_ordered_dict(od):
    # OrderedDict's own __reduce__ asks copyreg._slotnames for its (C) type's
    # slots on every call, since the answer cannot be cached on the type:
    # about 2 us each, and every nn.Module holds a dozen OrderedDicts, most
    # of them empty hook tables.
    if not od and not od.__dict__:
        return _EMPTY_ORDERED_DICT
    return collections.OrderedDict, (), (vars(od) or None), None, iter(od.items())


def _reduce_script_function(function):
    # torch sends a TorchScript function by its qualified name
    # (_invoke_rpc_torchscript), and the callee finds it among the functions
    # its own imports compiled: plain pickle refuses ScriptFunctions.
    return _script_function, (torch._jit_internal._qualified_name(function),)


_TORCHSCRIPT_PREFIX = "__torch__."


def _script_function(qualified_name: str):
    """The TorchScript function ``qualified_name`` names in this process: one its
    imports compiled, else one that importing its module (from the name) compiles."""
    unit = torch.jit._state._python_cu
    found = unit.find_function(qualified_name)
    if found is not None:
        return found
    path = qualified_name[len(_TORCHSCRIPT_PREFIX):] \
        if qualified_name.startswith(_TORCHSCRIPT_PREFIX) else qualified_name
    parts = path.split(".")
    # The longest importable module prefix; a name with none (a function of
    # the main module, which TorchScript names without one) is looked up there.
    candidates = [(".".join(parts[:i]), parts[i:]) for i in range(len(parts) - 1, 0, -1)]
    candidates.append(("__main__", parts))
    for module_name, attributes in candidates:
        try:
            value = importlib.import_module(module_name)
        except ImportError:
            continue
        for attribute in attributes:
            value = getattr(value, attribute, None)
        if isinstance(value, torch.jit.ScriptFunction):
            return value
    raise pickle.UnpicklingError(
        f"the TorchScript function {qualified_name} is not known in this process: define it "
        f"with @torch.jit.script at the top level of a module that every worker can import")


# What a payload's tensors and RRefs reduce to. These names are resolved by
# _Unpickler.find_class to methods bound to the payload's context; resolved
# any other way (a plain pickle.loads), they refuse.
def _rref_at(index):
    raise pickle.UnpicklingError("an RRef in an RPC payload can only be unpickled by localrref")


def _tensor_from_pid(pid):
    raise pickle.UnpicklingError("a tensor in an RPC payload can only be unpickled by localrref")


def _tensor_from_bytes(data, dtype, shape, requires_grad, is_param):
    raise pickle.UnpicklingError("a tensor in an RPC payload can only be unpickled by localrref")


_BOUND_NAMES = frozenset({"_rref_at", "_tensor_from_pid", "_tensor_from_bytes"})


class _Storages:
    """The storages one payload carries whole, by the tensor that carried each.

    torch's pickler writes a storage once per message, so tensors sent
    together on one storage arrive on one storage (and a write through one
    shows through the other). Tensors are numbered in pickling order, the
    order the receiver rebuilds them in; a later tensor on a storage already
    carried whole becomes a view of that tensor's storage on arrival.
    Storages are known by address and size: the pickler's memo keeps every
    tensor it met alive until the payload is done, so no address is reused
    meanwhile.
    """

    __slots__ = ("count", "whole")

    def __init__(self) -> None:
        self.count = 0  # tensors with a bytes id so far: the next one's index
        self.whole: dict[tuple[int, int], int] = {}


def _tensor_pid(tensor: torch.Tensor, pool, handles: list, grads: list | None = None,
                storages: _Storages | None = None):
    """A tensor's id (exported tensors' handles go to ``handles``); for a
    dtype without a code, the arguments of :func:`_tensor_from_bytes`; None
    for layouts torch's own reducer handles.

    ``grads``, if given, collects the tensors that require grad, in pickling
    order (distributed autograd's send records them; the receiver's
    :func:`loads` finds them in the same order).

    ``storages``, if given, are the storages the payload carried whole so
    far: a tensor that travels with its whole storage shares it with the
    payload's earlier tensors on that storage (see :class:`_Storages`).

    The receiver gets the layout torch's RPC delivers (``cloneSparseTensors``
    in torch's ``rpc/utils.cpp``): a view is compacted, as ``clone()`` would,
    only when its storage is at least 8 KiB and at least twice the bytes the
    view uses; otherwise the whole storage travels and the receiver's tensor
    has the sender's strides and storage offset (a transposed tensor stays
    transposed, and costs no ``.contiguous()`` copy on the way).
    """
    # Every attribute read below costs a call into torch (0.2-1 us each), and
    # small tensors are sent often: each property is read once.
    if not tensor.is_cpu:
        raise TypeError(f"localrref moves CPU tensors only; got a tensor on {tensor.device}. "
                        f"Move it with .cpu() before sending")
    if tensor.layout is not torch.strided or tensor.is_quantized:
        return None  # torch's own reducer handles the exotic layouts (sparse among them)
    # Parameter's isinstance goes through its metaclass (0.27 us); most tensors are plain.
    is_param = type(tensor) is not torch.Tensor and isinstance(tensor, torch.nn.Parameter)
    requires_grad = tensor.requires_grad
    if requires_grad and grads is not None:
        grads.append(tensor)
    dtype = tensor.dtype
    known_dtype = dtype in DTYPE_CODES
    if tensor.is_conj() or tensor.is_neg():
        # Lazy in torch: the storage's bytes are not the values. The resolved
        # copy is a storage of its own, gone before the next tensor: never
        # shared.
        tensor = tensor.detach().resolve_conj().resolve_neg()
        storages = None
    nbytes = tensor.nbytes
    storage = tensor.untyped_storage()
    storage_bytes = storage.nbytes()
    compact = storage_bytes >= _RECOPY_MIN_BYTES and storage_bytes >= 2 * nbytes
    if storages is not None and not compact and storage_bytes and known_dtype:
        key = (storage.data_ptr(), storage_bytes)
        index = storages.whole.get(key)
        if index is not None:
            ndim = tensor.dim()
            return b"".join((
                _INLINE.pack(_VIEW_TAG, DTYPE_CODES[dtype], requires_grad, is_param, ndim),
                _VIEW_INDEX.pack(index),
                struct.pack(f"<{2 * ndim + 1}q", *tensor.shape, *tensor.stride(),
                            tensor.storage_offset())))
        # This tensor carries the storage whole, whichever way it goes below.
        storages.whole[key] = storages.count
    if known_dtype and pool is not None and pool.takes(nbytes if compact else storage_bytes) \
            and nbytes:
        # export() copies the values as clone() lays them out; export_storage()
        # copies the storage as it is.
        handle = pool.export(tensor) if compact else pool.export_storage(tensor)
        handles.append(handle)
        # One bytes object: one opcode in the stream.
        return (_PARAM_HANDLE if is_param else _HANDLE_TAG) + handle.pack()
    if compact:
        flat = tensor.detach().clone()
        storage_bytes = flat.untyped_storage().nbytes()
    else:
        flat = tensor  # only read below: no detach() (0.5 us) needed
    if not known_dtype:
        flat = flat.detach().contiguous()
        return (_memory_bytes(flat.data_ptr(), flat.nbytes), flat.dtype, tuple(flat.shape),
                requires_grad, is_param)
    ndim = flat.dim()
    head = _INLINE.pack(_INLINE_TAG, DTYPE_CODES[dtype], requires_grad, is_param, ndim)
    if storage_bytes == nbytes and flat.storage_offset() == 0 and flat.is_contiguous():
        # The common case: the storage is exactly the values, in C order.
        return b"".join((head, struct.pack(f"<{ndim}q", *flat.shape),
                         _memory_bytes(flat.data_ptr(), nbytes)))
    return b"".join((_STRIDED_TAG, head[1:],
                     struct.pack(f"<{2 * ndim + 1}q", *flat.shape, *flat.stride(),
                                 flat.storage_offset()),
                     _memory_bytes(flat.untyped_storage().data_ptr(), storage_bytes)))


def _memory_bytes(address: int, nbytes: int) -> bytes:
    """A copy of ``nbytes`` of a CPU tensor's memory at ``address``: raw bytes
    whatever the dtype, half the cost of going through numpy."""
    return ctypes.string_at(address, nbytes) if nbytes else b""


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, *, rrefs, mapper, grads):
        super().__init__(file)
        self._rrefs = rrefs
        self._mapper = mapper
        self._grads = grads
        self.used = set()
        self.tensors: list[torch.Tensor] = []  # by index (see _Storages)

    def find_class(self, module, name):
        # Called once per distinct global in a payload (the pickler memoizes them).
        if module == __name__ and name in _BOUND_NAMES:
            return getattr(self, name)
        return super().find_class(module, name)

    def _rref_at(self, index):
        self.used.add(index)
        return self._rrefs[index]

    def _tensor_from_pid(self, pid):
        if pid[:1] == _VIEW_TAG:
            tensor = _view_tensor(pid, self.tensors)
        else:
            tensor = _load_tensor(pid, self._mapper)
        self.tensors.append(tensor)
        if self._grads is not None and tensor.requires_grad:
            self._grads.append(tensor)
        return tensor

    def _tensor_from_bytes(self, data, dtype, shape, requires_grad, is_param):
        tensor = _inline_tensor(data, dtype, shape, requires_grad, is_param)
        if self._grads is not None and requires_grad:
            self._grads.append(tensor)
        return tensor


def _load_tensor(pid: bytes, mapper):
    """The tensor a bytes id describes (see _tensor_pid)."""
    tag = pid[:1]
    if tag == _HANDLE_TAG or tag == _PARAM_HANDLE:
        tensor = mapper.import_packed(memoryview(pid)[1:])
        if tag == _PARAM_HANDLE:
            return torch.nn.Parameter(tensor, tensor.requires_grad)
        return tensor
    if tag == _INLINE_TAG:
        _, code, requires_grad, is_param, ndim = _INLINE.unpack_from(pid)
        shape = struct.unpack_from(f"<{ndim}q", pid, _INLINE.size)
        data = memoryview(pid)[_INLINE.size + 8 * ndim:]
        return _inline_tensor(data, DTYPES[code], shape, requires_grad, is_param)
    if tag == _STRIDED_TAG:
        _, code, requires_grad, is_param, ndim = _INLINE.unpack_from(pid)
        dims = struct.unpack_from(f"<{2 * ndim + 1}q", pid, _INLINE.size)
        data = memoryview(pid)[_INLINE.size + 8 * (2 * ndim + 1):]
        storage = torch.frombuffer(bytearray(data), dtype=torch.uint8).untyped_storage() \
            if len(data) else torch.UntypedStorage(0)
        tensor = torch.empty((0,), dtype=DTYPES[code]).set_(
            storage, dims[2 * ndim], dims[:ndim], dims[ndim:2 * ndim])
        return _as_sent(tensor, requires_grad, is_param)
    raise pickle.UnpicklingError(f"unknown tensor id {pid[:16]!r}")


def _as_sent(tensor: torch.Tensor, requires_grad: bool, is_param: bool) -> torch.Tensor:
    """A rebuilt tensor with the sender's grad flag, as a Parameter if it was one."""
    if is_param:
        return torch.nn.Parameter(tensor, requires_grad)
    return tensor.requires_grad_(requires_grad) if requires_grad else tensor


def _view_tensor(pid: bytes, tensors: list) -> torch.Tensor:
    """A tensor on the storage of ``tensors[index]``, an earlier tensor of the
    same payload, as a :data:`_VIEW_TAG` id describes it."""
    _, code, requires_grad, is_param, ndim = _INLINE.unpack_from(pid)
    (index,) = _VIEW_INDEX.unpack_from(pid, _INLINE.size)
    dims = struct.unpack_from(f"<{2 * ndim + 1}q", pid, _INLINE.size + _VIEW_INDEX.size)
    if not 0 <= index < len(tensors):
        raise pickle.UnpicklingError(f"a tensor names the storage of tensor {index} of its "
                                     f"payload, which has {len(tensors)} so far")
    tensor = torch.empty((0,), dtype=DTYPES[code]).set_(
        tensors[index].untyped_storage(), dims[2 * ndim], dims[:ndim], dims[ndim:2 * ndim])
    return _as_sent(tensor, requires_grad, is_param)


# The dtypes numpy holds as they are (see _inline_tensor).
_NUMPY_DTYPES = {} if numpy is None else {
    dtype: numpy.dtype(name) for dtype, name in (
        (torch.float32, "float32"), (torch.float64, "float64"), (torch.float16, "float16"),
        (torch.uint8, "uint8"), (torch.int8, "int8"), (torch.int16, "int16"),
        (torch.int32, "int32"), (torch.int64, "int64"), (torch.bool, "bool"),
        (torch.complex64, "complex64"), (torch.complex128, "complex128"))}


def _inline_tensor(data, dtype, shape, requires_grad: bool, is_param: bool) -> torch.Tensor:
    """A tensor of its own (writable) memory holding the bytes ``data``.

    Not a view (``set_``, not ``reshape``): a received tensor that requires
    grad inside a distributed autograd context becomes an output of an
    autograd node, and autograd forbids changing such an output in place
    when it is a view. For the dtypes numpy holds as they are, numpy makes
    the copy: the same tensor (a storage of its own, not resizable, as
    ``frombuffer``'s), in half the time (1.4 us against 2.9).
    """
    np_dtype = _NUMPY_DTYPES.get(dtype)
    if np_dtype is not None and len(data) and len(data) == math.prod(shape) * np_dtype.itemsize:
        tensor = torch.from_numpy(numpy.frombuffer(data, dtype=np_dtype).reshape(shape).copy())
    elif len(data):
        storage = torch.frombuffer(bytearray(data), dtype=torch.uint8).untyped_storage()
        tensor = torch.empty((0,), dtype=dtype).set_(storage, 0, shape)
    else:
        tensor = torch.empty(shape, dtype=dtype)
    return _as_sent(tensor, requires_grad, is_param)


def dumps(obj, *, fork=None, abandon=None, pool=None, rref_type=None,
          grads: list | None = None) -> Encoded:
    """Pickle ``obj``; RRefs go through ``fork``, big tensors through ``pool``.

    ``grads``, if given, receives the tensors of ``obj`` that require grad,
    in the order :func:`loads` will find them.

    On failure every fork already made is handed to ``abandon`` and every
    exported tensor is released, then the error is re-raised as a
    ``TypeError`` naming the object that could not be pickled.
    """
    if _is_plain(obj, 0):
        try:
            return Encoded(_PLAIN_PICKLE + pickle.dumps(obj, protocol=_PROTOCOL), (), ())
        except Exception:
            pass  # a local function, say: the full path below names the culprit
    if type(obj) is torch.Tensor:
        # A bare tensor (a common return value): its id is the
        # whole payload, no pickle stream around it.
        handles: list = []
        mark = len(grads) if grads is not None else 0
        pid = _tensor_pid(obj, pool, handles, grads)
        if type(pid) is bytes:
            return Encoded(_BARE_TENSOR + pid, (), tuple(handles))
        if grads is not None:
            del grads[mark:]  # the full path below collects it again
    buffer = io.BytesIO()
    pickler = _Pickler(buffer, fork=fork, pool=pool, rref_type=rref_type, grads=grads)
    try:
        pickler.dump(obj)
    except BaseException as exc:
        for fork_data in pickler.forks:
            if abandon is not None:
                abandon(fork_data)
        for handle in pickler.handles:
            pool.release_unsent(handle)
        if isinstance(exc, (pickle.PicklingError, TypeError, AttributeError)) and not \
                getattr(exc, "_localrref_named", False):
            raise describe_unpicklable(obj, exc) from exc
        raise
    finally:
        pickler.release()
    return Encoded(buffer.getvalue(), tuple(pickler.forks), tuple(pickler.handles))


def _is_plain(obj, depth: int) -> bool:
    # Loops, not all(generator): this runs on every call's arguments, and
    # a scalar item is decided without a function call.
    kind = type(obj)
    if kind in _PLAIN_TYPES:
        return True
    if depth >= _PLAIN_MAX_DEPTH:
        return False
    plain = _PLAIN_TYPES
    if kind is tuple or kind is list:
        if len(obj) > _PLAIN_MAX_ITEMS:
            return False
        for item in obj:
            if type(item) not in plain and not _is_plain(item, depth + 1):
                return False
        return True
    if kind is dict:
        if len(obj) > _PLAIN_MAX_ITEMS:
            return False
        for key, value in obj.items():
            if type(key) not in plain and not _is_plain(key, depth + 1):
                return False
            if type(value) not in plain and not _is_plain(value, depth + 1):
                return False
        return True
    return False


def loads(data: bytes, *, rrefs=(), mapper=None, grads: list | None = None):
    """Unpickle ``data``; RRef index i becomes ``rrefs[i]``.

    ``grads``, if given, receives the tensors that arrived requiring grad,
    in the order the sender's :func:`dumps` collected them.

    Returns ``(obj, unused)``: the indices of ``rrefs`` the stream never
    referred to (their holders must release them).
    """
    prefix = data[:1]
    if prefix == _PLAIN_PICKLE:
        return pickle.loads(memoryview(data)[1:]), list(range(len(rrefs)))
    if prefix == _BARE_TENSOR:
        tensor = _load_tensor(data[1:], mapper)
        if grads is not None and tensor.requires_grad:
            grads.append(tensor)
        return tensor, list(range(len(rrefs)))
    unpickler = _Unpickler(io.BytesIO(data), rrefs=rrefs, mapper=mapper, grads=grads)
    try:
        obj = unpickler.load()
    finally:
        # The memo holds every object loaded and, through the bound methods
        # find_class gave, the unpickler itself: a cycle that would keep the
        # payload's RRefs and tensors alive until the cyclic collector runs.
        unpickler.memo.clear()
        unpickler.tensors.clear()
    unused = [i for i in range(len(rrefs)) if i not in unpickler.used]
    return obj, unused


def describe_unpicklable(obj, exc: BaseException) -> TypeError:
    """A TypeError naming the innermost object that would not pickle."""
    culprit = _find_unpicklable(obj)
    where = f" (the culprit: {culprit})" if culprit else ""
    error = TypeError(
        f"cannot send {_short_repr(obj)} over RPC: it is not picklable{where}: "
        f"{type(exc).__name__}: {exc}. Pass only picklable objects (module-level functions, "
        f"plain data, tensors, RRefs), or give the object a __reduce__.")
    error._localrref_named = True
    return error


def _find_unpicklable(obj, depth: int = 0):
    if depth > 4:
        return None
    children = []
    if isinstance(obj, dict):
        children = list(obj.items())
        children = [c for pair in children for c in pair]
    elif isinstance(obj, (list, tuple, set, frozenset)):
        children = list(obj)
    for child in children:
        try:
            pickle.dumps(child, protocol=_PROTOCOL)
        except Exception:
            if type(child) in _TENSOR_TYPES:
                continue
            deeper = _find_unpicklable(child, depth + 1)
            return deeper or _short_repr(child)
    return None


def _short_repr(obj) -> str:
    try:
        text = repr(obj)
    except Exception:
        text = f"<{type(obj).__name__} object>"
    return text if len(text) <= 80 else text[:77] + "..."


# ----------------------------------------------------------------- exceptions

@dataclass(frozen=True, slots=True)
class RemoteException:
    """An exception raised by a user function on another worker.

    torch's ``internal.RemoteException``: the type, and a message that starts
    ``On WorkerInfo(id=..., name=...):`` and ends with the remote traceback.
    """

    msg: str
    exception_type: type


def wrap_exception(exc: BaseException, worker_info) -> RemoteException:
    # torch's text (internal._run_function): the worker, repr(exc), the
    # traceback. torch then undoes the escapes of the whole text with
    # "unicode_escape", which also mangles non-ASCII characters; only the
    # repr is escaped, so only it is undone here, losslessly.
    text = f"On {worker_info}:\n{_unescape(repr(exc))}\n{''.join(traceback.format_exception(exc))}"
    # torch's callee runs a TorchScript function in C++, which turns its
    # error into a RuntimeError carrying the interpreter's text; the
    # torch.jit.Error Python sees is no RuntimeError, so it would escape an
    # ``except RuntimeError`` that works on torch.
    kind = RuntimeError if isinstance(exc, torch.jit.Error) else type(exc)
    return RemoteException(text, kind)


def _unescape(text: str) -> str:
    """The escapes a repr() wrote (newlines, tabs, quotes, non-printables) turned back."""
    try:
        return text.encode("latin-1", "backslashreplace").decode("unicode_escape")
    except UnicodeDecodeError:
        return text


def rebuild_exception(remote: RemoteException) -> BaseException:
    """The caller-side exception: the remote type with the remote story."""
    try:
        exc = remote.exception_type(remote.msg)
    except BaseException as exc_build:
        return RuntimeError(
            f"Failed to create original exception type {remote.exception_type.__qualname__}. "
            f"Error msg was {exc_build}. Original exception on remote side was {remote.msg}")
    return exc


def dumps_exception(remote: RemoteException) -> bytes:
    """Pickle a RemoteException; a type that cannot travel is named instead."""
    try:
        return pickle.dumps(remote, protocol=_PROTOCOL)
    except Exception:
        return pickle.dumps(RemoteException(
            f"{remote.msg}\n(the exception type {remote.exception_type.__module__}."
            f"{remote.exception_type.__qualname__} cannot be pickled, so it was replaced by "
            f"RuntimeError)", RuntimeError), protocol=_PROTOCOL)


def loads_exception(data: bytes) -> BaseException:
    try:
        remote = pickle.loads(data)
    except Exception as exc:
        return RuntimeError(f"a remote worker raised an exception that cannot be rebuilt here: "
                            f"{type(exc).__name__}: {exc}")
    return rebuild_exception(remote)
