"""A stand-in for a localrref program whose supervisor found leaked RRefs.

Writes the leak report the real supervisor writes when LOCALRREF_LEAK_REPORT
is set, with two leaked RRefs.
"""

import json
import os

leaks = [
    {"rref_id": [1, 7], "fork_id": [1, 8], "owner_rank": 1, "holder_rank": 0,
     "state": "confirmed_user", "value_type": "torch.Tensor", "tensor_bytes": 4096,
     "creation_site": "train.py:42 in step"},
    {"rref_id": [2, 3], "fork_id": [2, 3], "owner_rank": 2, "holder_rank": 2,
     "state": "unforked_owner", "value_type": "dict", "tensor_bytes": 0,
     "creation_site": None},
]
with open(os.environ["LOCALRREF_LEAK_REPORT"], "w") as f:
    json.dump(leaks, f)
