"""Verdicts that are not tied to one data source: orphans, merging, ordering."""

from __future__ import annotations

from collections.abc import Iterable

from ._model import LeakKind, LeftoverProcess, Status, Verdict

ORDER = tuple(LeakKind)
_RANK = {Status.LEAK: 2, Status.CLEAN: 1, Status.UNKNOWN: 0}


def orphan_verdict(leftovers: Iterable[LeftoverProcess], *, what: str = "from the run") -> Verdict:
    leftovers = list(leftovers)
    if not leftovers:
        return Verdict(kind=LeakKind.ORPHAN_PROCESS, status=Status.CLEAN,
                       summary=f"no process {what} is left")
    zombies = sum(1 for p in leftovers if p.status == "zombie")
    zpart = f" ({zombies} zombie(s) nobody waited for)" if zombies else ""
    return Verdict(kind=LeakKind.ORPHAN_PROCESS, status=Status.LEAK,
                   summary=f"{len(leftovers)} process(es) {what} still exist{zpart}",
                   details=tuple(p.describe() for p in leftovers))


def merge(a: Verdict, b: Verdict) -> Verdict:
    """Two verdicts on the same kind from two sources: a leak in either is a leak."""
    assert a.kind is b.kind
    first, second = (a, b) if _RANK[a.status] >= _RANK[b.status] else (b, a)
    summary = first.summary
    if second.status is not Status.UNKNOWN:
        summary += "; " + second.summary
    return Verdict(kind=a.kind, status=first.status, summary=summary,
                   details=first.details + second.details)


def combine(verdicts: Iterable[Verdict]) -> tuple[Verdict, ...]:
    """One verdict per kind, in the order of :class:`LeakKind`."""
    by_kind: dict[LeakKind, Verdict] = {}
    for v in verdicts:
        by_kind[v.kind] = merge(by_kind[v.kind], v) if v.kind in by_kind else v
    return tuple(by_kind[k] for k in ORDER if k in by_kind)
