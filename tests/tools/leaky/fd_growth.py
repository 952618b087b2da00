"""Opens one file per step and keeps it open."""

import os

from _common import probe, steps_arg

args = steps_arg()
kept = []
for step in range(args.steps):
    kept.append(open(os.devnull, "rb"))
    probe(step)
