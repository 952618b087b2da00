"""Run with -m: prints its __name__ and rank, and reports one leaked RRef."""

import os

from localrref import world
from localrref.control_messages import LeakReport
from localrref.transport import wire
from localrref.transport.mpqueue import Endpoint

rank = int(os.environ["RANK"])
print(f"module {__name__} rank {rank}")
spec = world.current()
Endpoint(rank, list(spec.inboxes)).send(spec.supervisor_rank, wire.encode_control(LeakReport(
    rank=rank, leaks=[{"rref_id": f"{rank}:7", "owner_rank": rank, "state": "OWNER", "value_type": "int"}])))
