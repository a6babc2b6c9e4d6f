"""``gblr bench``: the benchmark suite (see :mod:`gblr.bench.suite`)."""

from gblr.bench.suite import main

__all__ = ["main"]
