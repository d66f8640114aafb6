"""Benchmarks and soaks: figures measured against a baseline of the same run."""
