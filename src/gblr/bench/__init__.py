"""Benchmarks: each runs as ``python -m gblr.bench.<name>`` and writes results/<name>/."""
