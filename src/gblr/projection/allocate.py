"""``gblr.allocate``: split one overall budget among layers to minimise the summed error.

Each layer's error is measured at a set of candidate budgets (every rank for low rank,
a grid otherwise); the split then solves the multiple-choice knapsack
``min sum_l err_l(b_l)^2`` subject to ``sum_l b_l in_l out_l <= budget * sum_l in_l out_l``
by a Lagrangian sweep followed by a greedy fill of what is left.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from gblr.core.budget import check_budget, max_rank_for_budget
from gblr.core.progress import progress as show_progress
from gblr.layers.base import check_matrix
from gblr.projection.calibration import Calibration, as_calibration
from gblr.projection.project import project

__all__ = ["allocate", "error_curve", "split_budget", "DEFAULT_GRID"]

#: Candidate per-layer budgets for structures other than low rank.
DEFAULT_GRID = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6, 0.75, 0.9)


def _lowrank_curve(
    weight: torch.Tensor, cal: Calibration | None
) -> tuple[list[float], list[float]]:
    out_features, in_features = weight.shape
    w = weight.detach().double()
    if cal is not None:
        w = w @ cal.root().to(w.device)
    s2 = torch.linalg.svdvals(w).pow(2)
    total = float(s2.sum()) or 1.0
    tail = torch.flip(torch.cumsum(torch.flip(s2, [0]), 0), [0]).tolist() + [0.0]
    dense = in_features * out_features
    max_rank = max_rank_for_budget(in_features, out_features, 1.0)
    budgets, errors = [], []
    for rank in range(1, max_rank + 1):
        budgets.append(rank * (in_features + out_features) / dense)
        errors.append(max(tail[rank], 0.0) / total)
    if not budgets or budgets[-1] < 1.0:  # dense is always allowed
        budgets.append(1.0)
        errors.append(0.0)
    return budgets, errors


def error_curve(
    weight: torch.Tensor,
    structure: str = "gblr",
    calibration: Calibration | torch.Tensor | None = None,
    grid: Sequence[float] = DEFAULT_GRID,
    **project_kwargs: Any,
) -> tuple[list[float], list[float]]:
    """``(budgets, squared relative errors)`` of one layer at its candidate budgets.

    Low rank is exact at every rank (from the singular values, whitened when calibrated);
    other structures are projected at each ``grid`` budget that they can meet (GBLR with
    its candidate starts and a single search step by default, to stay cheap). Budget 1
    (the dense layer, error 0) is always a candidate. A ``ValueError`` that is not about
    the budget (the projection also fails at budget 1: a bad option, say) is raised.
    """
    budgets, errors, _ = _error_curve(weight, structure, calibration, grid, project_kwargs)
    return budgets, errors


def _error_curve(
    weight: torch.Tensor,
    structure: str,
    calibration: Calibration | torch.Tensor | None,
    grid: Sequence[float],
    project_kwargs: dict[str, Any],
) -> tuple[list[float], list[float], str | None]:
    """:func:`error_curve`, and why the smallest grid budget that failed did (or None)."""
    check_matrix(weight)
    cal = as_calibration(calibration, weight.shape[1])
    if structure == "lowrank":
        budgets, errors = _lowrank_curve(weight, cal)
        if budgets[0] < 1.0:
            return budgets, errors, None
        return budgets, errors, (f"rank 1 of a {weight.shape[0]}x{weight.shape[1]} weight "
                                 f"costs {budgets[0]:.4f} of the dense cost")
    kwargs = dict(project_kwargs)
    if structure == "gblr":
        kwargs.setdefault("steps", 1)
        kwargs.setdefault("refit_steps", 0)

    def run(b: float) -> tuple[float, float]:
        _, rec = project(weight, b, structure=structure, calibration=cal, progress=False,
                         **kwargs)
        return rec.cost / rec.dense_cost, rec.error ** 2

    budgets, errors = [], []
    failed: tuple[float, ValueError] | None = None
    for b in sorted({check_budget(x, "grid") for x in grid}):
        if b >= 1.0:
            continue
        try:
            cost, error = run(b)
        except ValueError as err:  # this budget may be too small for the structure
            failed = failed or (b, err)
            continue
        budgets.append(cost)
        errors.append(error)
    if failed is not None and not budgets:
        # no budget below dense worked: the budgets were too small, or the projection
        # fails whatever the budget (a bad option); the dense budget tells which
        run(1.0)
    budgets.append(1.0)
    errors.append(0.0)
    return budgets, errors, None if failed is None else f"at budget {failed[0]}: {failed[1]}"


def _pick(curves: dict[str, tuple[list[float], list[float]]], sizes: dict[str, int],
          lam: float) -> dict[str, int]:
    choice = {}
    for n, (bs, es) in curves.items():
        vals = [e + lam * b * sizes[n] for b, e in zip(bs, es, strict=True)]
        choice[n] = min(range(len(vals)), key=vals.__getitem__)
    return choice


def allocate(
    weights: Mapping[str, torch.Tensor],
    budget: float,
    *,
    structure: str = "gblr",
    calibration: Mapping[str, Calibration | torch.Tensor] | None = None,
    grid: Sequence[float] = DEFAULT_GRID,
    progress: bool = True,
    **project_kwargs: Any,
) -> dict[str, float]:
    """Per-layer budgets whose total cost fits ``budget`` and that minimise the summed error.

    ``weights`` maps names to ``(out, in)`` matrices; the result maps each name to a budget
    (a fraction of that layer's dense cost) such that
    ``sum_l b_l * in_l * out_l <= budget * sum_l in_l * out_l``, minimising the sum of the
    layers' squared relative (optionally data-aware) errors. Pass the result to
    :func:`gblr.project_many`. ``structure`` is any structure ``gblr.project`` accepts;
    layers that cannot be compressed enough keep what the split can afford, and every layer
    can stay dense (budget 1) when the total allows.
    """
    if not isinstance(weights, Mapping) or not weights:
        raise TypeError("weights must be a non-empty dict of name -> (out, in) tensor")
    budget = check_budget(budget)
    names = list(weights)
    sizes = {n: int(check_matrix(weights[n], f"weights[{n!r}]").numel()) for n in names}
    iterator: Any = show_progress(names, desc=f"error curves ({structure})", unit="layer",
                                  disable=not progress)
    curves = {}
    reasons: dict[str, str] = {}
    for n in iterator:
        cal = None if calibration is None else calibration.get(n)
        try:
            *curves[n], reason = _error_curve(weights[n], structure, cal, grid, project_kwargs)
        except (TypeError, ValueError) as err:
            raise type(err)(f"error curve of layer {n!r} ({structure}): {err}") from err
        if reason is not None:
            reasons[n] = reason
    try:
        return split_budget(curves, sizes, budget, repr(structure))
    except ValueError as err:
        if not reasons:
            raise
        # why the cheaper candidates were not there, from the structure itself
        why = "; ".join(f"layer {n!r}: {r}" for n, r in list(reasons.items())[:3])
        more = f" (and {len(reasons) - 3} more layers)" if len(reasons) > 3 else ""
        raise ValueError(f"{err}; smaller budgets failed: {why}{more}") from None


def split_budget(
    curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    sizes: Mapping[str, int],
    budget: float,
    what: str = "the structure",
) -> dict[str, float]:
    """Pick one candidate per layer: least summed error with total cost within ``budget``.

    ``curves`` maps each layer to ``(budgets, errors)`` at its candidate budgets (fractions
    of its dense cost ``sizes[name]``); the multiple-choice knapsack is solved by a
    Lagrangian sweep and a greedy fill of what is left. Raises a ``ValueError`` when even
    the cheapest candidates exceed the budget (``what`` names the structure in it).
    """
    budget = check_budget(budget)
    names = list(curves)
    curves = {n: (list(curves[n][0]), list(curves[n][1])) for n in names}
    limit = budget * sum(sizes[n] for n in names)

    def total(choice: dict[str, int]) -> float:
        return sum(curves[n][0][choice[n]] * sizes[n] for n in names)

    # Lagrangian sweep: the smallest multiplier whose choice fits
    lo, hi = 0.0, 1.0
    while total(_pick(curves, sizes, hi)) > limit and hi < 1e30:
        hi *= 4.0
    choice = _pick(curves, sizes, hi)
    if total(choice) > limit:
        cheapest = sum(min(curves[n][0]) * sizes[n] for n in names)
        raise ValueError(
            f"budget={budget} is below what the layers can reach with {what} "
            f"(at least {cheapest / sum(sizes[n] for n in names):.4f} of the dense cost)"
        )
    for _ in range(60):
        mid = (lo + hi) / 2
        trial = _pick(curves, sizes, mid)
        if total(trial) <= limit:
            hi, choice = mid, trial
        else:
            lo = mid
    # greedy fill: spend the remainder on the step with the best error drop per cost
    spent = total(choice)
    while True:
        best, best_gain = None, 0.0
        for n in names:
            bs, es = curves[n]
            i = choice[n]
            for j in range(len(bs)):
                extra = (bs[j] - bs[i]) * sizes[n]
                if extra <= 0 or spent + extra > limit or es[j] >= es[i]:
                    continue
                gain = (es[i] - es[j]) / extra
                if gain > best_gain:
                    best, best_gain = (n, j, extra), gain
        if best is None:
            break
        n, j, extra = best
        choice[n] = j
        spent += extra
    return {n: float(curves[n][0][choice[n]]) for n in names}
