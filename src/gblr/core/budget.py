"""What a budget is, and the arithmetic on it (the one place).

A **budget** is always a fraction in ``(0, 1]`` of the dense cost of the layers it covers:
after compression ``sum(cost) <= budget * sum(in * out)``. Which layers it covers is part
of its name where it could be ambiguous:

- ``budget`` of a structure's constructor or ``from_dense``: that one layer;
- ``target`` of :class:`gblr.BudgetController`: the GBLR layers it steers;
- ``budget`` of :class:`gblr.CompressionConfig` / ``gblr.compress``: the selected layers
  together (``allocation`` says how it is split among them: each layer at the budget,
  or pooled and re-split);
- ``init_fraction`` of ``GBLRLinear(init="lowrank")``: not a budget but the share of the
  dense cost the initial full-width components take (nothing enforces it later).

Costs are compared with the relative tolerance :data:`RTOL`, so a float budget that a
structure meets exactly is not refused by rounding.
"""

from __future__ import annotations

import math

from gblr.core.cost import dense_cost
from gblr.core.validate import check_fraction

__all__ = [
    "RTOL",
    "check_budget",
    "budget_to_macs",
    "max_rank_for_budget",
    "within_budget",
    "check_within_budget",
    "units_within_budget",
    "fits",
]

#: Relative tolerance of every "cost fits the budget" comparison.
RTOL = 1e-9


def fits(cost: float, limit: float) -> bool:
    """Whether ``cost`` is at most ``limit`` (MACs), with the relative tolerance :data:`RTOL`."""
    return cost <= limit * (1.0 + RTOL)


def check_budget(budget: float, name: str = "budget") -> float:
    """Validate a budget: a fraction of the dense cost in ``(0, 1]``."""
    return check_fraction(name, budget, "a fraction of the dense cost")


def budget_to_macs(budget: float, in_features: int, out_features: int) -> float:
    """The largest cost (MACs per token) allowed by ``budget`` for one layer."""
    return check_budget(budget) * dense_cost(in_features, out_features)


def max_rank_for_budget(in_features: int, out_features: int, budget: float) -> int:
    """Largest rank ``R`` with ``R * (in + out) <= budget * in * out`` (capped at ``min(in, out)``).

    Returns 0 when not even rank 1 fits; callers decide whether that is an error.
    """
    limit = budget_to_macs(budget, in_features, out_features)
    rank = int(math.floor(limit / (in_features + out_features) + RTOL))
    return max(0, min(rank, min(in_features, out_features)))


def within_budget(cost: int, budget: float, in_features: int, out_features: int) -> bool:
    """Whether ``cost`` MACs per token fit ``budget`` (with the relative tolerance :data:`RTOL`)."""
    return fits(cost, budget_to_macs(budget, in_features, out_features))


def check_within_budget(
    cost: int, budget: float | None, in_features: int, out_features: int, what: str
) -> None:
    """Raise ``ValueError`` when ``cost`` does not fit ``budget`` (no check when it is None).

    ``what`` opens the message, subject and verb: ``"rank=4 costs"``.
    """
    if budget is not None and not within_budget(cost, budget, in_features, out_features):
        raise ValueError(
            f"{what} {cost} MACs, over budget={budget} "
            f"({budget_to_macs(budget, in_features, out_features):.1f} MACs)"
        )


def units_within_budget(
    budget: float, in_features: int, out_features: int, unit_cost: int
) -> int:
    """How many units of ``unit_cost`` MACs fit ``budget`` (same tolerance as ``within_budget``)."""
    return int(budget_to_macs(budget, in_features, out_features) * (1 + RTOL) // unit_cost)
