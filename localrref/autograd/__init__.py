"""Distributed autograd (work in progress: the local pass engine; the API comes next)."""
