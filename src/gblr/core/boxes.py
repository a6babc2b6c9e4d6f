"""GBLR structure as integer boxes: the one place for widths/locations -> boxes.

``widths`` and ``locations`` are ``(2, K)`` fractions; row :data:`INPUT_AXIS` describes
the input (column) axis, row :data:`OUTPUT_AXIS` the output (row) axis. The forward pass
rounds both to the index grid, so component ``c`` covers ``round(w * n)`` indices from
``round(l * n)`` on each axis, wrapping around the end; with sharp masks (``sigma=None``)
that is exactly its mask. A component at most one index long on either axis is off.

Also here: the sharp evaluation-mode cost read from the boxes in O(K) (no masks built),
the proximal width shrink, and the bisection that finds how far to shrink until a cost
fits — used by the GBLR layer, the budget controller, the projection search and the packer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from gblr.core.cost import box_component_cost, box_component_costs

__all__ = [
    "INPUT_AXIS",
    "OUTPUT_AXIS",
    "integer_boxes",
    "active",
    "nonempty",
    "sharp_cost",
    "sharp_costs",
    "shrink_widths",
    "bisect",
    "fit_widths",
]

#: Row of ``widths``/``locations`` that describes the input (column) axis.
INPUT_AXIS = 0
#: Row of ``widths``/``locations`` that describes the output (row) axis.
OUTPUT_AXIS = 1


@torch.no_grad()
def integer_boxes(
    widths: torch.Tensor, locations: torch.Tensor, in_features: int, out_features: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(in_len, in_start, out_len, out_start)``, ``(K,)`` long tensors on the widths'
    device, as the forward pass rounds the boxes (widths clamped to ``[0, 1]``, locations
    wrapped into ``[0, 1)``)."""
    return tuple(torch.from_numpy(b).to(widths.device)
                 for b in _host_boxes(widths, locations, in_features, out_features))


def _host_boxes(
    widths: torch.Tensor, locations: torch.Tensor, in_features, out_features
) -> tuple[np.ndarray, ...]:
    """:func:`integer_boxes` as host int64 arrays: rounded half to even in the precision
    the forward pass rounds in (float64 for float64 widths, float32 otherwise); a width or
    location that is not finite gives an arbitrary integer, as a cast in torch does. The
    axis lengths are ints, or ``(K,)`` arrays (components of several layers)."""
    dtype = torch.float64 if widths.dtype == torch.float64 else torch.float32
    w = np.clip(widths.detach().to(dtype).cpu().numpy(), 0.0, 1.0)
    loc = np.remainder(locations.detach().to(dtype).cpu().numpy(), w.dtype.type(1.0))
    n_in, n_out = np.asarray(in_features, w.dtype), np.asarray(out_features, w.dtype)
    with np.errstate(invalid="ignore"):
        return (
            np.rint(w[INPUT_AXIS] * n_in).astype(np.int64),
            np.rint(loc[INPUT_AXIS] * n_in).astype(np.int64) % np.int64(in_features),
            np.rint(w[OUTPUT_AXIS] * n_out).astype(np.int64),
            np.rint(loc[OUTPUT_AXIS] * n_out).astype(np.int64) % np.int64(out_features),
        )


@torch.no_grad()
def nonempty(widths: torch.Tensor, in_features: int, out_features: int) -> torch.Tensor:
    """Boolean ``(K,)``: components at least one index long on either axis. The others have
    width 0 on both axes after rounding, so both their masks are exactly zero, whatever the
    low-pass."""
    cols, rows = _lengths(widths, in_features, out_features)
    return (cols > 0) | (rows > 0)


@torch.no_grad()
def active(widths: torch.Tensor, in_features: int, out_features: int) -> torch.Tensor:
    """Boolean ``(K,)``: components more than one index long on both axes."""
    cols, rows = _lengths(widths, in_features, out_features)
    return (cols > 1) & (rows > 1)


def _lengths(widths: torch.Tensor, in_features: int, out_features: int):
    """The box lengths on the input and output axes, rounded as the forward pass rounds
    them, in the widths' dtype on their device (no read back to the host)."""
    w = widths.detach().clamp(0.0, 1.0)
    return (torch.round(w[INPUT_AXIS] * int(in_features)),
            torch.round(w[OUTPUT_AXIS] * int(out_features)))


@torch.no_grad()
def sharp_cost(
    widths: torch.Tensor,
    locations: torch.Tensor,
    in_features: int,
    out_features: int,
    rank_per_component: int = 1,
) -> int:
    """Evaluation-mode MACs per token of the boxes with sharp masks (``sigma=None``).

    Equal to the layer's ``macs()`` with ``sigma=None``: the rounded masks are then exact
    0/1 boxes, so the boxes are costed directly (:func:`gblr.core.cost.box_component_cost`,
    O(K), no FFT).
    """
    return box_component_cost(*_host_boxes(widths, locations, in_features, out_features),
                              int(in_features), int(out_features), rank_per_component)


@torch.no_grad()
def sharp_costs(
    widths: Sequence[torch.Tensor],
    locations: Sequence[torch.Tensor],
    in_features: Sequence[int],
    out_features: Sequence[int],
    rank_per_component: Sequence[int],
) -> list[int]:
    """:func:`sharp_cost` of several layers (the i-th entry of each sequence is layer i's)
    in one pass: the same integers, at about the cost of one layer, for the budget
    controller, which measures a whole model many times per step. Layers whose widths
    differ in dtype or device are taken a group at a time."""
    groups: dict[tuple, list[int]] = {}
    for i, w in enumerate(widths):
        groups.setdefault((w.dtype, w.device), []).append(i)
    costs = [0] * len(widths)
    for members in groups.values():
        sizes = [widths[i].shape[1] for i in members]
        spread = [np.repeat(np.asarray([seq[i] for i in members], np.int64), sizes)
                  for seq in (in_features, out_features, rank_per_component)]
        w = torch.cat([widths[i] for i in members], dim=1)
        loc = torch.cat([locations[i] for i in members], dim=1)
        layer = np.repeat(np.arange(len(members)), sizes)
        got = box_component_costs(*_host_boxes(w, loc, spread[0], spread[1]), spread[0],
                                  spread[1], spread[2], layer, len(members))
        for i, c in zip(members, got.tolist(), strict=True):
            costs[i] = int(c)
    return costs


def shrink_widths(widths: torch.Tensor, amount: float | torch.Tensor) -> torch.Tensor:
    """The proximal L1 step on widths: ``clamp(clamp(w, 0, 1) - amount, 0, 1)``."""
    return (widths.clamp(0.0, 1.0) - amount).clamp(0.0, 1.0)


def bisect(
    ok: Callable[[float], bool], lo: float, hi: float, iters: int
) -> tuple[float, float]:
    """Bisection on a monotone predicate: ``ok(lo)`` holds and ``ok(hi)`` does not.

    Returns the final ``(lo, hi)`` after ``iters`` halvings (``ok`` is true at ``lo``
    and false at ``hi`` throughout).
    """
    for _ in range(int(iters)):
        mid = 0.5 * (lo + hi)
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return lo, hi


def fit_widths(
    widths: torch.Tensor,
    cost_of: Callable[[torch.Tensor], float],
    limit: float,
    iters: int = 30,
) -> torch.Tensor:
    """Widths shrunk by the smallest shared amount that brings ``cost_of(widths)`` to at most
    ``limit`` (bisection on the exact cost; ``widths`` itself when it already fits)."""
    w = widths.detach().clamp(0.0, 1.0)
    if cost_of(w) <= limit:
        return w
    _, amount = bisect(lambda t: cost_of(shrink_widths(w, t)) > limit, 0.0, float(w.max()), iters)
    return shrink_widths(w, amount)
