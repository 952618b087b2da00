"""localrref: PyTorch's RPC and Remote Reference Protocol on one machine.

The protocol core (:mod:`localrref.core`) and its simulator
(:mod:`localrref.testing`) are complete; the process runtime that exposes the
``torch.distributed.rpc`` API is being built (see README.md, "Status").
"""

__version__ = "0.1.0"
