"""One start/shutdown world of ``tools/bench.py``'s ``world_runner`` rows: an unmodified torch program.

Run by ``bench.py`` as ``python -m localrref.run tools/bench_runner_world.py PLAN``:
the workers are ``bench_workloads.start_world_entry`` with the torch backend's
code (``import torch.distributed.rpc``, ``TensorPipeRpcBackendOptions`` with a
``tcp://`` init method), started by ``torch.multiprocessing.start_processes``
as any torch program starts them; the runner makes ``torch.distributed.rpc``
localrref in every one of them. ``PLAN`` is the pickled ``WorldPlan``; the
moment just before the workers start goes to ``t_spawn.json`` in its
``outdir`` (``time.monotonic()``, which every process on the machine shares).
"""

from __future__ import annotations

import json
import os
import pickle
import sys
import time

import torch.multiprocessing as mp

import bench_workloads as wl


def main(plan_path: str) -> None:
    with open(plan_path, "rb") as fh:
        plan = pickle.load(fh)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(plan.port)
    t_spawn = time.monotonic()
    with open(os.path.join(plan.outdir, "t_spawn.json"), "w") as fh:
        json.dump({"t_spawn": t_spawn}, fh)
    mp.start_processes(wl.start_world_entry, args=(plan,), nprocs=plan.world_size, join=True,
                       start_method="spawn")


if __name__ == "__main__":
    main(sys.argv[1])
