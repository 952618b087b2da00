"""Rank 1 fails on every attempt before attempt <argv[1]>; then every rank succeeds."""

import os
import sys

attempt = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
print(f"attempt {attempt} rank {os.environ['RANK']}", flush=True)
if os.environ["RANK"] == "1" and attempt < int(sys.argv[1]):
    raise RuntimeError(f"flaky failure on attempt {attempt}")
