"""Runnable examples; each is also a test of the runtime."""
