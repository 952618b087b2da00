"""Keeps one object of --size bytes per step."""

from _common import probe, steps_arg

args = steps_arg()
kept = []
for step in range(args.steps):
    kept.append(bytearray(args.size))
    probe(step)
