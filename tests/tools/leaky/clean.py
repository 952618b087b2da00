"""Does a little of everything the auditor watches, and cleans up after each.

Spawns and waits for a child, creates and unlinks a /dev/shm segment (which
also starts multiprocessing's resource tracker, a process that exits just
after we do) and a named semaphore, opens and closes files, starts and joins
threads, and churns the allocator with objects of random sizes. Prints probe
lines and writes an empty RRef leak report, as a clean localrref run would.
"""

import json
import os
import random
import subprocess
import sys
import threading
from multiprocessing import shared_memory

import _multiprocessing
from _common import probe, shm_name, steps_arg

args = steps_arg()
rng = random.Random(os.getpid())

subprocess.run([sys.executable, "-S", "-c", ""], check=True)
seg = shared_memory.SharedMemory(name=shm_name("seg"), create=True, size=8192)
seg.buf[:4] = b"ok!!"
seg.close()
seg.unlink()
sem_name = "/" + shm_name("sem")
_multiprocessing.SemLock(1, 1, 1, sem_name, False)
_multiprocessing.sem_unlink(sem_name)

keep = []
for step in range(args.steps):
    churn = [bytearray(rng.randint(1, 20000)) for _ in range(rng.randint(1, 30))]
    keep = churn[: rng.randint(0, 3)]  # replaced every step: bounded, not a leak
    with open(os.devnull, "rb"):
        pass
    t = threading.Thread(target=sum, args=([1, 2],))
    t.start()
    t.join()
    probe(step, live_rrefs=0)

path = os.environ.get("LOCALRREF_LEAK_REPORT")
if path:
    with open(path, "w") as f:
        json.dump([], f)
