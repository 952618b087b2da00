"""Scenarios that run on rank 0 of a compatibility world; each returns or raises.

Written once against ``compat_backend.rpc``; they must pass on torch and on
localrref alike. Workers are named worker0..worker3. The functions sent to
other workers are defined here too, so every worker can import them.
"""

from __future__ import annotations

import torch

import compat_backend as B


def me() -> str:
    return B.rpc.get_worker_info().name


def worker(i: int) -> str:
    return f"worker{i % 4}"


# ------------------------------------------------------------ remote-side functions

def my_function(a, b, c):
    return a + b + c


def my_rref_function(rref_a, rref_b):
    return rref_a.to_here() + rref_b.to_here()


def sum_nested(container):
    """Sum every RRef's value found in nested lists, tuples and dicts."""
    if isinstance(container, dict):
        return sum(sum_nested(v) for v in container.values())
    if isinstance(container, (list, tuple)):
        return sum(sum_nested(v) for v in container)
    return container.to_here()


# ------------------------------------------------------------ item 1: RRefs passed between users

def rref_args_same_owner():
    # torch's test_py_rref_args: both argument RRefs and the result on one worker.
    a = B.rpc.remote(worker(1), torch.add, args=(torch.ones(2, 2), 1))
    b = B.rpc.remote(worker(1), torch.add, args=(torch.ones(2, 2), 2))
    c = B.rpc.remote(worker(1), my_rref_function, args=(a, b))
    torch.testing.assert_close(c.to_here(), torch.ones(2, 2) * 2 + 3)
    return True


def rref_args_user_share(rounds):
    # torch's test_py_rref_args_user_share: owner worker1, user worker2.
    for i in range(rounds):
        a = B.rpc.remote(worker(1), my_function, args=(torch.ones(2, 2), 1, i))
        b = B.rpc.remote(worker(1), my_function, args=(torch.ones(2, 2), 3, 4))
        c = B.rpc.remote(worker(2), my_rref_function, args=(a, b))
        torch.testing.assert_close(c.to_here(), torch.ones(2, 2) * 2 + 8 + i)
        # The same through rpc_sync (torch's test_py_rpc_rref_args).
        torch.testing.assert_close(B.rpc.rpc_sync(worker(2), my_rref_function, args=(a, b)),
                                   torch.ones(2, 2) * 2 + 8 + i)
    return True


def rrefs_nested_in_containers():
    rrefs = [B.rpc.remote(worker(1 + i % 3), torch.mul, args=(torch.ones(3), i + 1))
             for i in range(6)]
    nested = {"list": [rrefs[0], (rrefs[1], rrefs[2])], "tuple": (rrefs[3],),
              "dict": {"deep": [rrefs[4], {"x": rrefs[5]}]}}
    expected = torch.ones(3) * sum(range(1, 7))
    for dst in (1, 2, 3):
        torch.testing.assert_close(B.rpc.rpc_sync(worker(dst), sum_nested, args=(nested,)),
                                   expected)
        torch.testing.assert_close(
            B.rpc.remote(worker(dst), sum_nested, args=(nested,)).to_here(), expected)
    futures = [B.rpc.rpc_async(worker(d), sum_nested, args=(nested,)) for d in (1, 2, 3)]
    for fut in futures:
        torch.testing.assert_close(fut.wait(), expected)
    return True


# ------------------------------------------------------------ the mesh (run_world)

def _sum_and_pass_on(rrefs, hop):
    total = sum(r.to_here() for r in rrefs)
    if hop == 0:
        return total
    nxt = (B.rpc.get_worker_info().id + 1) % 4
    return total + B.rpc.rpc_sync(worker(nxt), _sum_and_pass_on, args=(rrefs, hop - 1))


def mesh_pass_rrefs(rank, world_size):
    """Every rank passes an RRef it owns and one it was given to every other rank
    at once; each receiver fetches them and passes them on to its neighbour."""
    own = B.rpc.RRef(torch.full((2,), float(rank)))
    given = B.rpc.remote(worker(rank + 1), torch.full, args=((2,), float(10 * rank)))
    futures = [B.rpc.rpc_async(worker(dst), _sum_and_pass_on, args=([own, given], 2))
               for dst in range(world_size) if dst != rank]
    values = [fut.wait() for fut in futures]
    return [v.tolist() for v in values]
