"""Leaked RRefs: the supervisor's JSON leak report, and this process's debug counters.

The localrref supervisor writes a report when env ``LOCALRREF_LEAK_REPORT``
names a path: a JSON list with one object per RRef still registered at
shutdown, keys ``rref_id, fork_id, owner_rank, holder_rank, state,
value_type, tensor_bytes, creation_site`` (state is one of
:data:`RREF_STATES`; creation_site may be null). An empty list means no leak;
no file means we cannot tell (not a localrref program, or the supervisor
died before its leak check).

localrref is optional here: only its public API (``get_debug_info``) is
used, and only when the process has imported localrref already.
"""

from __future__ import annotations

import json
import os
import sys

from ._model import LeakKind, RRefLeak, Status, Verdict

REPORT_ENV = "LOCALRREF_LEAK_REPORT"
RREF_STATES = ("pending_user", "pending_child", "confirmed_user", "unforked_owner", "fork")
# torch's RRefContext::getDebugInfo keys that must be zero once a worker is idle.
DEBUG_COUNTERS = ("num_owner_rrefs", "num_forks", "num_pending_users", "num_pending_futures")


def read_rref_report(path: str) -> tuple[list[RRefLeak] | None, str]:
    """The leaks in the report at ``path``, or ``None`` and why it could not be read."""
    if not os.path.exists(path):
        return None, (f"no leak report was written to {path} (not a localrref program, or "
                      f"its supervisor exited before the leak check)")
    try:
        with open(path, encoding="utf-8") as f:
            payload = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        return None, f"leak report {path} is unreadable: {exc}"
    if not isinstance(payload, list):
        return None, f"leak report {path} is not a JSON list (got {type(payload).__name__})"
    leaks = []
    for i, item in enumerate(payload):
        if not isinstance(item, dict) or not {"rref_id", "fork_id", "state"} <= item.keys():
            return None, (f"leak report {path}: entry {i} lacks rref_id/fork_id/state: "
                          f"{str(item)[:120]}")
        leaks.append(RRefLeak(rref_id=item["rref_id"], fork_id=item["fork_id"],
                              owner_rank=item.get("owner_rank"),
                              holder_rank=item.get("holder_rank"), state=str(item["state"]),
                              value_type=item.get("value_type"),
                              tensor_bytes=item.get("tensor_bytes"),
                              creation_site=item.get("creation_site")))
    return leaks, ""


def rref_report_verdict(leaks: list[RRefLeak] | None, reason: str) -> Verdict:
    kind = LeakKind.LEAKED_RREF
    if leaks is None:
        return Verdict(kind=kind, status=Status.UNKNOWN, summary=f"unknown: {reason}")
    if not leaks:
        return Verdict(kind=kind, status=Status.CLEAN, summary="leak report lists no RRef")
    by_state: dict[str, int] = {}
    for leak in leaks:
        by_state[leak.state] = by_state.get(leak.state, 0) + 1
    states = ", ".join(f"{n} {s}" for s, n in sorted(by_state.items()))
    return Verdict(kind=kind, status=Status.LEAK,
                   summary=f"{len(leaks)} RRef(s) still registered at shutdown ({states})",
                   details=tuple(leak.describe() for leak in leaks))


def debug_counters() -> tuple[dict[str, int] | None, str]:
    """Non-zero-able counters of this process's RPC agent, or ``None`` and why not."""
    # Only if already imported: a process that never imported localrref runs no
    # agent, and importing it here (and torch with it) would be a side effect.
    get = getattr(sys.modules.get("localrref"), "get_debug_info", None)
    if get is None:
        return None, "localrref (with get_debug_info) is not imported in this process"
    try:
        info = get()
    except RuntimeError as exc:  # RPC not initialised here: the usual case for a test process
        return None, f"no RPC agent in this process ({exc.__class__.__name__})"
    counters = {}
    for key in DEBUG_COUNTERS:
        try:
            counters[key] = int(info[key])
        except (KeyError, TypeError, ValueError):
            continue
    return counters, ""


def debug_counters_verdict(counters: dict[str, int] | None, reason: str) -> Verdict:
    kind = LeakKind.LEAKED_RREF
    if counters is None:
        return Verdict(kind=kind, status=Status.UNKNOWN, summary=f"unknown: {reason}")
    busy = {k: v for k, v in counters.items() if v}
    if busy:
        return Verdict(kind=kind, status=Status.LEAK,
                       summary="get_debug_info() counters not zero: "
                               + ", ".join(f"{k}={v}" for k, v in busy.items()))
    return Verdict(kind=kind, status=Status.CLEAN, summary="get_debug_info() counters are zero")
