"""Argument checks shared by constructors, projections and commands."""

from __future__ import annotations

import torch

__all__ = ["check_positive"]


def check_positive(name: str, value: int) -> int:
    """Return ``value`` as an int, or raise naming ``name`` if it is not a positive integer."""
    if isinstance(value, bool) or not isinstance(value, int | torch.SymInt):
        try:
            as_int = int(value)
        except (TypeError, ValueError):
            raise TypeError(f"{name} must be a positive integer, got {value!r}") from None
        if as_int != value:
            raise TypeError(f"{name} must be a positive integer, got {value!r}")
        value = as_int
    if value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value}")
    return int(value)
