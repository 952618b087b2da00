"""Creates a shared-memory segment and exits without unlinking it."""

from multiprocessing import resource_tracker, shared_memory

from _common import shm_name

seg = shared_memory.SharedMemory(name=shm_name("seg"), create=True, size=65536)
# Without this the resource tracker would unlink it for us at exit (and warn).
resource_tracker.unregister(seg._name, "shared_memory")
seg.close()
print(f"segment {seg.name}", flush=True)
