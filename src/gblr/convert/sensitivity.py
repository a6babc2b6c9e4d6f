"""End-to-end sensitivity of a model to each layer's budget, for ``allocation="sensitivity"``.

A layer's weight error says little about what its compression does to the model: in
MiniLM, query and key layers at half their cost change the sentence embeddings ten
times less than value and output layers at the same cost. Here each targeted layer is
projected alone at a grid of budgets, the model runs on a few calibration batches with
only that layer replaced, and the relative squared change of its output is recorded.
Those curves (errors of independent layers roughly add) feed the same knapsack as
:func:`gblr.allocate`, so the budget goes where the model's output needs it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from gblr.convert.calibrate import run_model
from gblr.convert.evaluate import last_hidden
from gblr.core.progress import progress as progress_bar
from gblr.core.surgery import set_submodule
from gblr.projection.allocate import split_budget

__all__ = ["SENSITIVITY_GRID", "SENSITIVITY_BATCHES", "output_error", "sensitivity_curves",
           "sensitivity_budgets"]

#: Candidate per-layer budgets whose effect on the output is measured.
SENSITIVITY_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
#: How many calibration batches each measurement runs (the first ones given).
SENSITIVITY_BATCHES = 2


def _masked_output(model: nn.Module, batch: Any) -> torch.Tensor:
    """The model's last hidden state (or logits) on ``batch``, zero at padding positions."""
    out = last_hidden(run_model(model, batch)).double()
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    if mask is not None and mask.shape == out.shape[:2]:
        out = out * mask.to(out.device, out.dtype).unsqueeze(-1)
    return out


@torch.no_grad()
def output_error(model: nn.Module, batches: Sequence[Any],
                 reference: Sequence[torch.Tensor]) -> float:
    """``sum ||f(x) - ref||^2 / sum ||ref||^2`` over ``batches`` (padding left out)."""
    num = den = 0.0
    for batch, ref in zip(batches, reference, strict=True):
        out = _masked_output(model, batch)
        num += float((out - ref).pow(2).sum())
        den += float(ref.pow(2).sum())
    return num / max(den, 1e-300)


def sensitivity_curves(
    model: nn.Module,
    names: Sequence[str],
    project: Callable[[str, float], nn.Module],
    batches: Sequence[Any],
    grid: Sequence[float] = SENSITIVITY_GRID,
    progress: bool = True,
) -> dict[str, tuple[list[float], list[float]]]:
    """``{name: (cost fractions, output errors)}``: each layer replaced alone at each budget.

    ``project(name, budget)`` returns the structured layer for ``name`` at ``budget``
    (a budget the structure cannot reach raises ``ValueError`` and is skipped). The model
    runs in evaluation mode, and every layer is put back afterwards. ``project`` runs with
    gradients enabled (an iterative projection such as GBLR's structure search needs them).
    """
    if not batches:
        raise ValueError("sensitivity needs at least one calibration batch")
    was_training = model.training
    model.eval()
    with torch.no_grad():
        reference = [_masked_output(model, b) for b in batches]
    curves: dict[str, tuple[list[float], list[float]]] = {}
    bar = progress_bar(names, desc="sensitivity", unit="layer", disable=not progress)
    try:
        for name in bar:
            original = model.get_submodule(name)
            param = next(original.parameters())
            budgets, errors = [], []
            try:
                for b in grid:
                    try:
                        new = project(name, float(b))
                    except ValueError:
                        continue  # too small a budget for this structure and shape
                    new = new.to(device=param.device, dtype=param.dtype).eval()
                    set_submodule(model, name, new)
                    budgets.append(float(new.macs()) / float(new.dense_macs()))
                    errors.append(output_error(model, batches, reference))
            finally:
                set_submodule(model, name, original)
            if not budgets:
                raise ValueError(f"layer {name!r} cannot be projected at any of the budgets {grid}")
            curves[name] = (budgets, errors)
    finally:
        model.train(was_training)
    return curves


def sensitivity_budgets(
    model: nn.Module,
    names: Sequence[str],
    sizes: Mapping[str, int],
    project: Callable[[str, float], nn.Module],
    batches: Sequence[Any],
    budget: float,
    grid: Sequence[float] = SENSITIVITY_GRID,
    progress: bool = True,
) -> dict[str, float]:
    """Per-layer budgets that fit ``budget`` of the layers' summed dense cost ``sizes``
    and minimise the summed end-to-end output error (see :func:`sensitivity_curves`)."""
    batches = list(batches)[:SENSITIVITY_BATCHES]
    curves = sensitivity_curves(model, names, project, batches, grid, progress)
    return split_budget(curves, {n: sizes[n] for n in names}, budget, "these structures")
