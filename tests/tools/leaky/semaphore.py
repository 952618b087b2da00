"""Creates a named POSIX semaphore and exits without sem_unlink()."""

import _multiprocessing
from _common import shm_name

name = shm_name("sem")
_multiprocessing.SemLock(1, 1, 1, "/" + name, False)  # kind, value, maxvalue, name, unlink
print(f"semaphore sem.{name}", flush=True)
