"""Parallelism beyond data parallelism: sequence parallelism over a group of ranks."""
