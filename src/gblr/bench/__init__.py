"""Benchmarks, run as ``python -m gblr.bench.<name>``."""
