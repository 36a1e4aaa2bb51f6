"""Benchmarks: synthgen against the raw model (and, later, against peers)."""
