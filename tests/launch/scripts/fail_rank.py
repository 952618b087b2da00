"""Rank 1 raises; the others block until they are stopped."""

import os
import threading


def main():
    if os.environ["RANK"] == "1":
        raise RuntimeError("rank 1 broke")
    threading.Event().wait()


main()
