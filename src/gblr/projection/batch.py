"""``gblr.project_many``: many layers at once, with a progress bar and per-layer records."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from gblr.core.progress import progress as progress_bar
from gblr.layers.base import StructuredLinear
from gblr.projection.calibration import Calibration
from gblr.projection.project import ProjectionRecord, project

__all__ = ["project_many"]


def project_many(
    weights: Mapping[str, torch.Tensor],
    budget: float | Mapping[str, float],
    *,
    structure: str = "gblr",
    calibration: Mapping[str, Calibration | torch.Tensor] | None = None,
    rank_per_component: int = 1,
    steps: int | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    **opts: Any,
) -> tuple[dict[str, StructuredLinear], list[ProjectionRecord]]:
    """Project every matrix of ``weights`` (name -> ``(out, in)``) with :func:`gblr.project`.

    ``budget`` is one fraction for all layers or a dict name -> fraction (for instance
    from :func:`gblr.allocate`); ``calibration`` optionally maps names to inputs or a
    :class:`Calibration`. Layers of equal shape are processed one after another (so
    their work and memory sizes repeat); a progress bar counts layers. Returns the layers
    by name (in the order of ``weights``) and one :class:`ProjectionRecord` per layer.
    """
    if not isinstance(weights, Mapping) or not weights:
        raise TypeError("weights must be a non-empty dict of name -> (out, in) tensor")
    names = list(weights)
    if isinstance(budget, Mapping):
        missing = [n for n in names if n not in budget]
        if missing:
            raise ValueError(f"budget has no entry for layer(s) {missing}")
        budgets = {n: budget[n] for n in names}
    else:
        budgets = dict.fromkeys(names, budget)
    if calibration is not None:
        if not isinstance(calibration, Mapping):
            raise TypeError("calibration must be None or a dict of name -> inputs/Calibration")
        unknown = sorted(set(calibration) - set(names))
        if unknown:
            raise ValueError(f"calibration names layer(s) not in weights: {unknown}")
    order = sorted(names, key=lambda n: (tuple(weights[n].shape), names.index(n)))
    bar = None
    if progress:
        bar = progress_bar(total=len(order), desc=f"projecting onto {structure}", unit="layer")
    layers: dict[str, StructuredLinear] = {}
    records: dict[str, ProjectionRecord] = {}
    for name in order:
        cal = None if calibration is None else calibration.get(name)
        layer, record = project(
            weights[name], budgets[name], structure=structure,
            rank_per_component=rank_per_component, steps=steps, calibration=cal,
            device=device, progress=False, name=name, **opts,
        )
        layers[name] = layer
        records[name] = record
        if bar is not None:
            bar.update(1)
            bar.set_postfix(layer=name[-30:], err=f"{record.error:.3f}")
    if bar is not None:
        bar.close()
    return {n: layers[n] for n in names}, [records[n] for n in names]
