"""A supervisor process for tests that kill it: spawn N workers that block forever."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lrr_launch_workers  # noqa: E402

from localrref.launch.supervisor import start_processes  # noqa: E402

if __name__ == "__main__":
    start_processes(lrr_launch_workers.print_ready_and_block, nprocs=int(sys.argv[2]),
                    start_method=sys.argv[1])
