"""Starts a child that exits only after we do (it waits for EOF on a pipe from us).

Not a leak: the auditor must wait for it (patience) instead of reporting it.
"""

import subprocess
import sys

# After EOF it still works a little (its own cleanup), so it usually outlives our exit
# long enough for the auditor to see it.
child = subprocess.Popen(
    [sys.executable, "-c", "import sys; sys.stdin.read(); sum(range(10**6))"],
    stdin=subprocess.PIPE)
print(f"straggler pid {child.pid}", flush=True)
# Our end of its stdin closes when we exit; then it reads EOF and exits.
