"""Writes this worker's torchrun variables, argv and WorldSpec to <out_dir>/rank<RANK>.json."""

import json
import os
import sys

from localrref import world

NAMES = ["RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
         "ROLE_NAME", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
         "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_ERROR_FILE",
         "OMP_NUM_THREADS"]

spec = world.current()
out_dir = sys.argv[1]
report = {
    "env": {name: os.environ.get(name) for name in NAMES},
    "argv": sys.argv,
    "name": __name__,
    "spec": None if spec is None else {"rank": spec.rank, "world_size": spec.world_size,
                                       "world_id": spec.world_id, "strict_leaks": spec.strict_leaks},
}
with open(os.path.join(out_dir, f"rank{os.environ['RANK']}.json"), "w") as fh:
    json.dump(report, fh)
print(f"hello from {os.environ['RANK']}")
print(f"err from {os.environ['RANK']}", file=sys.stderr)
