"""Bytes of protocol bookkeeping per live RRef, measured with tracemalloc.

    python tools/core_memory.py [--rrefs 100000]

Two real cores (worker 0 a user, worker 1 the owner) run N ``remote()`` calls
to completion through the protocol's own messages; the values are ``None`` so
only bookkeeping is counted. tracemalloc then reports the growth of each side,
divided by N:

* owner: per RRef with one user fork (its OwnerRRef record, the ``owners``
  entry and a one-element ``forks`` set), and per *additional* fork entry on
  one RRef (N forks registered on a single RRef);
* user: per confirmed UserRRef (its record and its ``confirmed_users`` entry).
"""

from __future__ import annotations

import argparse
import gc
import tracemalloc

from localrref.core import effects as fx
from localrref.core.ids import GloballyUniqueId
from localrref.core.rref_context import RRefContext


def _measure(build) -> int:
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    keep = build()
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del keep
    return after - before


def remote_round_trips(n: int):
    user, owner = RRefContext(0), RRefContext(1)
    handles = []
    for _ in range(n):
        rref = user.remote(1, None, now=0.0)
        (call,) = [e for e in user.take_effects() if isinstance(e, fx.Send)]
        (job,) = [e for e in owner.handle(0, call.message, now=0.0) if isinstance(e, fx.Execute)]
        (reply,) = [e for e in owner.finish_remote(job.job_id, None) if isinstance(e, fx.Send)]
        user.handle(1, reply.message, now=0.0)
        handles.append(rref)
    assert len(owner.owners) == n and len(user.confirmed_users) == n
    return user, owner, handles


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rrefs", type=int, default=100_000)
    n = parser.parse_args().rrefs

    # Owner side alone: build the same state the messages build, without the user.
    def owner_only():
        owner = RRefContext(1)
        for i in range(n):
            rref_id = GloballyUniqueId(0, 2 * i)
            owner.get_or_create_owner_rref(rref_id, from_remote_call=True).set_value(None)
            owner.add_fork_of_owner(rref_id, GloballyUniqueId(0, 2 * i + 1))
        return owner

    def forks_on_one():
        owner = RRefContext(1)
        owner.get_or_create_owner_rref(GloballyUniqueId(0, 0), from_remote_call=True)
        for i in range(n):
            owner.add_fork_of_owner(GloballyUniqueId(0, 0), GloballyUniqueId(2, i))
        return owner

    def users_only():
        user, owner, handles = remote_round_trips(n)
        owner.owners.clear()
        owner.forks.clear()
        return user, handles

    per_owner = _measure(owner_only) / n
    per_fork = _measure(forks_on_one) / n
    user_side = _measure(users_only) / n
    print(f"{n} RRefs, tracemalloc, CPython {__import__('sys').version.split()[0]}")
    print(f"owner: {per_owner:.0f} bytes per RRef with one user fork "
          f"(OwnerRRef + owners entry + forks set)")
    print(f"owner: {per_fork:.0f} bytes per additional fork entry on one RRef")
    print(f"user:  {user_side:.0f} bytes per confirmed UserRRef (record + confirmed_users "
          f"entry + the id objects)")


if __name__ == "__main__":
    main()
