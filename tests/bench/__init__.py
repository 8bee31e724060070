"""Benchmarks (`make bench`): figures from one run on this machine, never timed tests."""
