"""Annealing of the Gaudi-mask low-pass ``sigma`` from smooth to sharp masks."""

from __future__ import annotations

import math

from torch import nn

from gblr.train.groups import gblr_layers

__all__ = ["SigmaSchedule"]


class SigmaSchedule:
    """Geometric ``sigma`` from ``start`` to ``end`` over ``total`` ticks, then ``None``.

    A tick is an optimizer step or an epoch, whichever the caller counts (``by`` is only a
    label for logs and the Lightning callback). Tick ``t`` gets
    ``start * (end / start) ** (t / anneal)`` with ``anneal = round(anneal_frac * total)``;
    from tick ``anneal`` on, ``sigma`` is ``None`` (exact boxes). :meth:`apply` sets
    ``layer.sigma`` on every GBLR layer of ``model``.
    """

    def __init__(
        self,
        model: nn.Module,
        total: int,
        start: float = 1.0,
        end: float = 100.0,
        anneal_frac: float = 0.8,
        by: str = "step",
    ) -> None:
        if int(total) != total or int(total) <= 0:
            raise ValueError(f"total must be a positive integer, got {total!r}")
        if not (float(start) > 0 and float(end) > 0 and math.isfinite(start * end)):
            raise ValueError(f"start and end must be positive, got {start!r}, {end!r}")
        if not 0.0 < float(anneal_frac) <= 1.0:
            raise ValueError(f"anneal_frac must be in (0, 1], got {anneal_frac!r}")
        if by not in ("step", "epoch"):
            raise ValueError(f"by must be 'step' or 'epoch', got {by!r}")
        self.model = model
        self.total = int(total)
        self.start = float(start)
        self.end = float(end)
        self.anneal_frac = float(anneal_frac)
        self.by = by
        self.anneal = max(1, round(self.anneal_frac * self.total))

    def value(self, tick: int) -> float | None:
        """``sigma`` at ``tick`` (None once annealing is over)."""
        if tick < 0:
            raise ValueError(f"tick must be >= 0, got {tick}")
        if tick >= self.anneal:
            return None
        return self.start * (self.end / self.start) ** (tick / self.anneal)

    def apply(self, tick: int) -> float | None:
        """Set the ``sigma`` of every GBLR layer for ``tick``; return it."""
        sigma = self.value(tick)
        for _, layer in gblr_layers(self.model):
            layer.sigma = sigma
        return sigma

    def __repr__(self) -> str:
        return (
            f"SigmaSchedule(start={self.start}, end={self.end}, total={self.total}, "
            f"anneal={self.anneal}, by={self.by!r})"
        )
