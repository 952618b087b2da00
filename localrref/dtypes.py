"""Wire codes of tensor dtypes: one byte names a dtype in a packed handle or an inline tensor.

Shared by the shared-memory lane (``transport/shm.py``) and the codec
(``codec/pickler.py``). A leaf: imports torch and nothing of ours.
"""

from __future__ import annotations

import torch

__all__ = ["DTYPES", "DTYPE_CODES", "dtype_code"]

# Append only: the index is the wire code.
DTYPES = tuple(dtype for dtype in (
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.uint8, torch.int8,
    torch.int16, torch.int32, torch.int64, torch.bool, torch.complex64, torch.complex128,
    torch.complex32, getattr(torch, "uint16", None), getattr(torch, "uint32", None),
    getattr(torch, "uint64", None), getattr(torch, "float8_e4m3fn", None),
    getattr(torch, "float8_e5m2", None)) if dtype is not None)
DTYPE_CODES = {dtype: code for code, dtype in enumerate(DTYPES)}


def dtype_code(dtype: torch.dtype) -> int:
    """The wire code of ``dtype``; ValueError if it has none."""
    try:
        return DTYPE_CODES[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} has no wire code in localrref.dtypes.DTYPES") from None
