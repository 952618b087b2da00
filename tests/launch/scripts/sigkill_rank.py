"""Rank 1 SIGKILLs itself; the others block until they are stopped."""

import os
import signal
import threading

if os.environ["RANK"] == "1":
    os.kill(os.getpid(), signal.SIGKILL)
threading.Event().wait()
