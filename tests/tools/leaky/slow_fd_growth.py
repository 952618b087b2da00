"""Opens files at 100 per second of wall time for --steps files, printing nothing.

For the auditor's time-series mode: growth must be seen from its samples.
With --close each file is closed at once (the clean twin). The count follows
the wall clock, catching up after any stall, so a busy machine does not make
the growth look irregular; the waits only pace that (they synchronise nothing).
"""

import os
import sys
import threading
import time

from _common import steps_arg

close = "--close" in sys.argv
if close:
    sys.argv.remove("--close")
args = steps_arg(default=100)
tick = threading.Event()
kept = []
opened = 0
start = time.monotonic()
while opened < args.steps:
    due = min(args.steps, int((time.monotonic() - start) * 100) + 1)
    while opened < due:
        kept.append(open(os.devnull, "rb"))
        opened += 1
        if close:
            kept.pop().close()
    tick.wait(0.005)
