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
    "within_budget",
    "check_within_budget",
    "units_within_budget",
    "padded_block_size",
    "blockdiag_cost",
    "monarch_cost",
    "block_sparse_cost",
    "block_low_rank_cost",
    "box_component_cost",
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


def within_budget(cost: int, budget: float, in_features: int, out_features: int) -> bool:
    """Whether ``cost`` MACs per token fit ``budget`` (with a relative tolerance of 1e-9)."""
    return cost <= budget_to_macs(budget, in_features, out_features) * (1.0 + 1e-9)


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
    return int(budget_to_macs(budget, in_features, out_features) * (1 + 1e-9) // unit_cost)


def padded_block_size(n: int, nblocks: int) -> int:
    """Size of each of ``nblocks`` equal blocks covering ``n`` indices (the last one padded)."""
    return -(-int(n) // int(nblocks))


def blockdiag_cost(in_features: int, out_features: int, nblocks: int) -> int:
    """Cost of a block-diagonal layer: ``nblocks`` dense blocks of ``ceil(out/nb) x ceil(in/nb)``.

    Equals ``in * out / nblocks`` when ``nblocks`` divides both sizes; otherwise the
    padded blocks are counted as computed.
    """
    bi = padded_block_size(in_features, nblocks)
    bo = padded_block_size(out_features, nblocks)
    return int(nblocks) * bi * bo


def monarch_cost(in_features: int, out_features: int, nblocks: int, rank: int) -> int:
    """Cost of a Monarch layer with ``nblocks`` blocks per factor and blocks of rank ``rank``.

    The first block-diagonal factor has ``nblocks`` blocks ``(nblocks*rank) x ceil(in/nb)``,
    the second ``nblocks`` blocks ``ceil(out/nb) x (nblocks*rank)``, so the cost is
    ``rank * nblocks**2 * (ceil(in/nb) + ceil(out/nb))``, about
    ``rank * nblocks * (in + out)``. With ``rank = min(in, out) / nblocks**2`` this is
    the ``(in + out) * min(in, out) / nblocks`` of Dao et al. (2022).
    """
    bi = padded_block_size(in_features, nblocks)
    bo = padded_block_size(out_features, nblocks)
    return int(rank) * int(nblocks) ** 2 * (bi + bo)


def block_sparse_cost(num_blocks: int, block_rows: int, block_cols: int) -> int:
    """Cost of ``num_blocks`` dense blocks of ``block_rows x block_cols``."""
    return int(num_blocks) * int(block_rows) * int(block_cols)


def block_low_rank_cost(
    in_features: int, out_features: int, block_rows: int, block_cols: int, rank: int
) -> int:
    """Cost of a grid of ``block_rows x block_cols`` blocks, each held as rank-``rank`` factors.

    Every block is computed factored, ``rank * (block_rows + block_cols)``; the grid
    must tile the matrix.
    """
    n_blocks = (int(out_features) // int(block_rows)) * (int(in_features) // int(block_cols))
    return n_blocks * int(rank) * (int(block_rows) + int(block_cols))


def box_component_cost(
    in_len: torch.Tensor,
    in_start: torch.Tensor,
    out_len: torch.Tensor,
    out_start: torch.Tensor,
    in_features: int,
    out_features: int,
    ranks: torch.Tensor | int = 1,
) -> int:
    """Cost of components given as integer cyclic boxes (the evaluation rule, without masks).

    ``in_len``/``in_start`` (and ``out_*``) are ``(K,)`` integer tensors: a component covers
    ``len`` indices from ``start``, wrapping around. A component at most one index long on
    either axis is off; boxes that cover the same indices form one block, as in
    :func:`grouped_component_cost`, whose result this equals for sharp (``sigma=None``) masks.
    """
    in_len = in_len.long().clamp(0, in_features)
    out_len = out_len.long().clamp(0, out_features)
    ranks_t = torch.as_tensor(ranks, dtype=torch.long, device=in_len.device).expand_as(in_len)
    on = (in_len > 1) & (out_len > 1) & (ranks_t > 0)
    if not bool(on.any()):
        return 0
    # a full-length box covers the same indices wherever it starts
    i_s = torch.where(in_len >= in_features, 0, in_start.long() % in_features)
    o_s = torch.where(out_len >= out_features, 0, out_start.long() % out_features)
    keys = torch.stack([in_len, i_s, out_len, o_s], dim=1)[on]
    uniq, inverse = torch.unique(keys, dim=0, return_inverse=True)
    group_rank = torch.zeros(uniq.shape[0], dtype=torch.long, device=keys.device)
    group_rank.index_add_(0, inverse, ranks_t[on])
    gw, gh = uniq[:, 0], uniq[:, 2]
    return int(torch.minimum(group_rank * (gh + gw), gh * gw).sum().item())
