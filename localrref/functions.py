"""``localrref.functions.async_execution``: torch's decorator, re-exported.

torch marks the function with ``_wrapped_async_rpc_function``; localrref's
agent honours the same mark, so a function decorated with either module's
decorator behaves the same under both backends.
"""

from torch.distributed.rpc.functions import async_execution

__all__ = ["async_execution"]
