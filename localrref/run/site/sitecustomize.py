"""Started under ``python -m localrref.run``: ``torch.distributed.rpc`` is localrref here too.

Python imports the first ``sitecustomize`` on ``sys.path``; this one then
imports the next one, so one the environment already had still runs.
"""

import os
import sys


def _chain() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    saved = sys.path[:]
    mine = sys.modules.pop("sitecustomize", None)
    try:
        sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
        try:
            import sitecustomize  # noqa: F401 - the environment's own, if any
        except ImportError:
            pass
    finally:
        sys.path[:] = saved
        if mine is not None:
            sys.modules["sitecustomize"] = mine


if os.environ.get("LOCALRREF_AS_TORCH_RPC") == "1":
    from localrref.run.alias import install

    install()
_chain()
