"""``torch.distributed.rpc.api`` under ``python -m localrref.run``: the public calls, the
private helpers programs reach for (``_all_gather``, ``_barrier``,
``_get_current_rpc_agent``, ``_wait_all``, ``_wait_all_workers``), and the one
private setting torch's own test helpers write.

torch's ``dist_utils.dist_init`` sets ``api._ignore_rref_leak``; localrref
reports leaked RRefs through its own leak check at shutdown, so the flag is
kept but changes nothing. Other private names raise an ``AttributeError``
that names them.
"""

from __future__ import annotations

from localrref.api import (_all_gather, _barrier, _broadcast_to_followers,  # noqa: F401
                           _gather_to_leader, _get_current_rpc_agent, _is_current_rpc_agent_set,
                           _thread_local_var, _wait_all, _wait_all_workers, get_worker_info,
                           init_rpc, remote, rpc_async, rpc_sync, shutdown)

from .missing import refuse as _refuse

__all__ = ["init_rpc", "rpc_sync", "rpc_async", "remote", "shutdown", "get_worker_info"]

_ignore_rref_leak = True


__getattr__ = _refuse(
    "torch.distributed.rpc.api",
    "which puts localrref in place of torch.distributed.rpc. Run it without the runner (plain "
    "torch) to use it")
