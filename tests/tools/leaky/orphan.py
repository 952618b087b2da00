"""Starts a child that outlives us (it waits for a signal) and exits without waiting."""

import subprocess
import sys

child = subprocess.Popen([sys.executable, "-c", "import signal; signal.pause()"])
print(f"orphan pid {child.pid}", flush=True)
# Exit without wait(): the child is re-parented and keeps running.
