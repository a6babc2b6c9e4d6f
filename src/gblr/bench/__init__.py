"""Benchmarks, each run as ``python -m gblr.bench.<name>``."""
