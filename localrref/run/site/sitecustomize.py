"""Started under ``python -m localrref.run``: ``torch.distributed.rpc`` is localrref here too,
and a ``spawn`` child starts with the cyclic collector paused until its target runs.

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
    if sys.argv[1:2] == ["--multiprocessing-fork"]:
        # A spawn child (torch.multiprocessing.spawn's, say): it imports torch
        # again before its target runs, with the collector paused, as a
        # localrref.spawn worker does (launch/paused_gc.py).
        from localrref.launch.paused_gc import pause_until_target

        pause_until_target()
_chain()
