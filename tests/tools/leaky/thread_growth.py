"""Starts one thread per step that never finishes its work (until we exit)."""

import threading

from _common import probe, steps_arg

args = steps_arg()
release = threading.Event()
threads = []
for step in range(args.steps):
    t = threading.Thread(target=release.wait, daemon=True)
    t.start()
    threads.append(t)
    probe(step)
release.set()
for t in threads:
    t.join()
