"""Print "ready <rank> <pid>" and block until stopped."""

import os
import threading

# One write of less than PIPE_BUF bytes: lines of different workers never interleave.
os.write(1, f"ready {os.environ['RANK']} {os.getpid()}\n".encode())
threading.Event().wait()
