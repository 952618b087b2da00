"""``python -m localrref.run``: run a program written for ``torch.distributed.rpc`` on localrref, unchanged.

::

    python -m localrref.run script.py args...                  # the script starts its workers
    python -m localrref.run -m package.module args...          # (torch.multiprocessing.spawn, ...)
    python -m localrref.run --nproc-per-node 4 script.py args  # or the runner starts them,
                                                               # as torchrun (python -m localrref.launch)

In the program and in every Python process it starts, ``torch.distributed.rpc``
is localrref's API (``as_torch_rpc.py``): ``import torch.distributed.rpc as
rpc``, ``from torch.distributed.rpc import RRef``, ``torch.distributed.rpc.init_rpc``
all reach localrref. How: this process and its children get
``LOCALRREF_AS_TORCH_RPC=1`` and a ``sitecustomize`` (``run/site/``) on
``PYTHONPATH``; it installs an import hook (``alias.py``) that swaps the
module in right after ``import torch`` finishes (torch imports its own
``torch.distributed.rpc`` while it loads, so the swap cannot come earlier).
A name the program uses that localrref does not provide raises an
``AttributeError`` naming it.
"""

from .alias import ENV, install

__all__ = ["ENV", "install"]
