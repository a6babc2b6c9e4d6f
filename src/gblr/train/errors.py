"""Errors of ``gblr train`` that become a one-line message and an exit status."""

from __future__ import annotations

__all__ = ["UsageError", "one_line"]

class UsageError(ValueError):
    """A bad value on the command line, found before any work: one line, naming the key."""


def one_line(text: object) -> str:
    """``text`` as one line: its non-empty lines joined by ``; ``."""
    return "; ".join(part.strip() for part in str(text).splitlines() if part.strip())
