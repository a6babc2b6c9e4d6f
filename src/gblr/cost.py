"""The one place where cost and budget are defined.

Cost is counted in MACs per token (multiply-accumulates for one input vector);
a dense ``in -> out`` layer costs ``in * out``. A budget is always a fraction
in ``(0, 1]`` of the dense cost of the layers it applies to.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = [
    "INPUT_AXIS",
    "OUTPUT_AXIS",
    "check_budget",
    "check_positive",
    "dense_cost",
    "budget_to_macs",
    "lowrank_cost",
    "max_rank_for_budget",
    "block_cost",
    "grouped_component_cost",
]

#: Row of ``widths``/``locations`` that describes the input (column) axis.
INPUT_AXIS = 0
#: Row of ``widths``/``locations`` that describes the output (row) axis.
OUTPUT_AXIS = 1


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


def check_budget(budget: float, name: str = "budget") -> float:
    """Validate a budget: a fraction of the dense cost in ``(0, 1]``."""
    try:
        b = float(budget)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number in (0, 1], got {budget!r}") from None
    if not math.isfinite(b) or b <= 0.0 or b > 1.0:
        raise ValueError(
            f"{name} must be a fraction of the dense cost in (0, 1], got {budget!r}"
        )
    return b


def dense_cost(in_features: int, out_features: int) -> int:
    """MACs per token of a dense ``in -> out`` layer."""
    return int(in_features) * int(out_features)


def budget_to_macs(budget: float, in_features: int, out_features: int) -> float:
    """The largest cost (MACs per token) allowed by ``budget`` for one layer."""
    return check_budget(budget) * dense_cost(in_features, out_features)


def lowrank_cost(in_features: int, out_features: int, rank: int) -> int:
    """Cost of ``x -> U (V x)`` with ``U`` of shape ``(out, rank)``."""
    return int(rank) * (int(in_features) + int(out_features))


def max_rank_for_budget(in_features: int, out_features: int, budget: float) -> int:
    """Largest rank ``R`` with ``R * (in + out) <= budget * in * out`` (capped at ``min(in, out)``).

    Returns 0 when not even rank 1 fits; callers decide whether that is an error.
    """
    limit = budget_to_macs(budget, in_features, out_features)
    rank = int(math.floor(limit / (in_features + out_features) + 1e-9))
    return max(0, min(rank, min(in_features, out_features)))


def block_cost(rank: int, height: int, width: int) -> int:
    """Cost of one block ``height x width`` holding ``rank`` rank-1 terms.

    A block is computed either factored (``rank * (h + w)``) or dense (``h * w``),
    whichever is cheaper.
    """
    if height <= 0 or width <= 0 or rank <= 0:
        return 0
    return min(int(rank) * (int(height) + int(width)), int(height) * int(width))


def grouped_component_cost(
    in_support: torch.Tensor, out_support: torch.Tensor, ranks: Sequence[int] | torch.Tensor
) -> int:
    """Cost of a set of components given their boolean supports.

    ``in_support`` is ``(K, in)`` and ``out_support`` is ``(K, out)``; ``ranks``
    gives each component's rank. Components with identical supports form one
    block, costed once by :func:`block_cost` with their ranks summed; a component
    with an empty support on either axis costs nothing.
    """
    if in_support.shape[0] == 0:
        return 0
    ranks_t = torch.as_tensor(ranks, dtype=torch.long, device=in_support.device)
    h = out_support.sum(dim=1)
    w = in_support.sum(dim=1)
    on = (h > 0) & (w > 0) & (ranks_t > 0)
    if not bool(on.any()):
        return 0
    keys = torch.cat([in_support[on], out_support[on]], dim=1).to(torch.uint8)
    uniq, inverse = torch.unique(keys, dim=0, return_inverse=True)
    group_rank = torch.zeros(uniq.shape[0], dtype=torch.long, device=keys.device)
    group_rank.index_add_(0, inverse, ranks_t[on])
    n_in = in_support.shape[1]
    gw = uniq[:, :n_in].sum(dim=1).long()
    gh = uniq[:, n_in:].sum(dim=1).long()
    per_group = torch.minimum(group_rank * (gh + gw), gh * gw)
    return int(per_group.sum().item())
