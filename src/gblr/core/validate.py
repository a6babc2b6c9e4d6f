"""Argument checks shared by constructors, projections and commands."""

from __future__ import annotations

import math

import torch

__all__ = ["check_positive", "check_fraction", "check_float_dtype", "check_finite"]


def check_positive(name: str, value: int) -> int:
    """Return ``value`` as an int, or raise naming ``name`` if it is not a positive integer."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a positive integer, got {value!r}")
    if not isinstance(value, int | torch.SymInt):
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


def check_fraction(name: str, value: float, what: str = "a number") -> float:
    """Return ``value`` as a float in ``(0, 1]``, or raise naming ``name`` (``what`` says
    what the fraction is of, for the message)."""
    if isinstance(value, bool | str | bytes):
        raise TypeError(f"{name} must be a number in (0, 1], got {value!r}")
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number in (0, 1], got {value!r}") from None
    if not math.isfinite(f) or f <= 0.0 or f > 1.0:
        raise ValueError(f"{name} must be {what} in (0, 1], got {value!r}")
    return f


def check_float_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    """Return ``dtype``, or raise naming ``name`` if it is not a floating-point dtype.

    Integer, boolean and complex dtypes are refused: casting a layer's factors to them
    silently rounds (mostly to zero) instead of computing the layer.
    """
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"{name} must be a torch.dtype, got {dtype!r}")
    if not dtype.is_floating_point:
        raise ValueError(
            f"{name} must be a floating-point dtype (torch.float32, torch.bfloat16, ...), "
            f"got {dtype}"
        )
    return dtype


def check_finite(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """Return ``tensor``, or raise a ``ValueError`` naming ``name`` if a floating-point
    ``tensor`` holds a NaN or an infinity (other dtypes pass unchecked)."""
    if tensor.is_floating_point() or tensor.is_complex():
        finite = torch.isfinite(tensor)
        if not bool(finite.all()):
            n_nan = int(torch.isnan(tensor).sum())
            n_inf = int((~finite).sum()) - n_nan
            what = " and ".join(
                f"{n} {kind}" for n, kind in ((n_nan, "NaN"), (n_inf, "Inf")) if n
            )
            raise ValueError(f"tensor {name} holds {what} value(s); refusing a non-finite tensor")
    return tensor
