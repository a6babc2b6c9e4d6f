"""Block-low-rank linear layer: a grid of ``p x q`` blocks, each of rank ``r``."""

from __future__ import annotations

import torch
from torch import nn

from gblr.core.budget import (
    budget_to_macs,
    check_budget,
    check_within_budget,
    units_within_budget,
    within_budget,
)
from gblr.core.cost import block_low_rank_cost
from gblr.core.validate import check_positive
from gblr.layers.base import (
    StructuredLinear,
    check_dense_args,
    check_second_moment,
    init_uniform_,
    register_structure,
)
from gblr.layers.blocks import (
    best_by_error,
    block_factor_matmul,
    blocks_to_factors,
    candidate_shapes,
    check_block_shape,
    default_block_shape,
    diagonal_blocks,
    from_blocks,
    to_blocks,
    truncated_svd_factors,
)

__all__ = ["BlockLowRankLinear", "DEFAULT_GRID"]

#: Default number of blocks per axis when ``block_shape`` is not given.
DEFAULT_GRID = 4


def _rank_for_budget(n_in: int, n_out: int, p: int, q: int, budget: float) -> int:
    per_rank = block_low_rank_cost(n_in, n_out, p, q, 1)
    return min(min(p, q), units_within_budget(budget, n_in, n_out, per_rank))


def _resolve(
    n_in: int,
    n_out: int,
    block_shape: tuple[int, int] | None,
    rank: int | None,
    budget: float | None,
) -> tuple[tuple[int, int], int]:
    """Block shape and per-block rank from the constructor's arguments."""
    if budget is not None:
        budget = check_budget(budget)
    if rank is not None:
        rank = check_positive("rank", rank)
    elif budget is None:
        raise ValueError("BlockLowRankLinear needs rank or budget")
    if block_shape is None:
        target = (max(1.0, n_out / DEFAULT_GRID), max(1.0, n_in / DEFAULT_GRID))

        def feasible(p: int, q: int) -> bool:
            if rank is None:
                return _rank_for_budget(n_in, n_out, p, q, budget) >= 1
            if rank > min(p, q):
                return False
            cost = block_low_rank_cost(n_in, n_out, p, q, rank)
            return budget is None or within_budget(cost, budget, n_in, n_out)

        wanted = f"rank={rank}" if rank is not None else "rank 1"
        if budget is not None:
            wanted += f" within budget={budget}"
        block_shape = default_block_shape(n_out, n_in, target, feasible, wanted)
    p, q = check_block_shape(block_shape, n_out, n_in)
    if rank is None:
        rank = _rank_for_budget(n_in, n_out, p, q, budget)
        if rank == 0:
            raise ValueError(
                f"budget={budget} is too small for rank 1 in every {p}x{q} block "
                f"({block_low_rank_cost(n_in, n_out, p, q, 1)} MACs, budget allows "
                f"{budget_to_macs(budget, n_in, n_out):.1f})"
            )
        return (p, q), rank
    if rank > min(p, q):
        raise ValueError(f"rank={rank} exceeds the block's min dimension {min(p, q)}")
    check_within_budget(
        block_low_rank_cost(n_in, n_out, p, q, rank), budget, n_in, n_out,
        f"rank={rank} on {p}x{q} blocks costs",
    )
    return (p, q), rank


@register_structure("blr")
class BlockLowRankLinear(StructuredLinear):
    """A grid of ``rows x cols`` blocks, block ``(i, j)`` equal to ``U[i, j] @ V[i, j]``.

    ``U`` is ``(out/rows, in/cols, rows, rank)`` and ``V`` is ``(out/rows, in/cols, rank,
    cols)``. Every block is computed factored, so the cost is
    ``blocks * rank * (rows + cols)`` MACs per token; the forward pass is two batched
    matmuls with a stride permutation between them.

    Args:
        in_features, out_features: sizes, as for ``nn.Linear``.
        block_shape: ``(rows, cols)`` of one block; it must tile the weight. Default: the
            divisors nearest a 4 x 4 grid among those that allow the rank (or rank 1
            within the budget).
        rank: rank of every block, at most ``min(rows, cols)``.
        bias: learn an additive bias.
        budget: fraction of the dense cost; when ``rank`` is None the largest rank that
            fits is used, otherwise the cost is checked.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        block_shape: tuple[int, int] | None = None,
        rank: int | None = None,
        bias: bool = True,
        *,
        budget: float | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        (p, q), self.rank = _resolve(self.in_features, self.out_features, block_shape, rank,
                                     budget)
        self.block_shape = (p, q)
        gr, gc = self.grid_shape
        factory = {"device": device, "dtype": dtype}
        self.U = nn.Parameter(torch.empty(gr, gc, p, self.rank, **factory))
        self.V = nn.Parameter(torch.empty(gr, gc, self.rank, q, **factory))
        self.reset_parameters()

    @property
    def grid_shape(self) -> tuple[int, int]:
        """``(out/rows, in/cols)``: the number of blocks on each axis."""
        p, q = self.block_shape
        return self.out_features // p, self.in_features // q

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """``V`` with fan-in ``cols``, ``U`` with fan-in ``(in/cols) * rank``, as ``nn.Linear``."""
        q = self.block_shape[1]
        init_uniform_(self.V, q)
        init_uniform_(self.U, self.grid_shape[1] * self.rank)
        self.reset_bias()

    def _forward_2d(self, x: torch.Tensor) -> torch.Tensor:
        first, second = blocks_to_factors(self.U, self.V)
        return block_factor_matmul(x, first, second)

    def to_dense(self) -> torch.Tensor:
        return from_blocks(self.U @ self.V)

    def gemms(self, tokens: int | None = None) -> list[tuple[int, int, int]]:
        (p, q), (gr, gc), r = self.block_shape, self.grid_shape, self.rank
        return [(gc, gr * r, q), (gr, p, gc * r)]

    def macs(self) -> int:
        p, q = self.block_shape
        return block_low_rank_cost(self.in_features, self.out_features, p, q, self.rank)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, block_shape={self.block_shape}, rank={self.rank}"

    @classmethod
    def from_dense(
        cls,
        weight: torch.Tensor,
        budget: float,
        bias: torch.Tensor | None = None,
        *,
        block_shape: tuple[int, int] | None = None,
        second_moment: torch.Tensor | None = None,
        search: bool = True,
    ) -> BlockLowRankLinear:
        """Per-block truncated SVD at the largest rank the budget allows.

        With ``search`` (the default) and no ``block_shape``, the constructor's default grid
        and up to 12 other tilings (:func:`~gblr.layers.blocks.candidate_shapes`, from small
        to large blocks) are projected, and the one with the lowest (data-aware) error is
        returned: the baseline at its best within the budget.

        The blocks are independent, so this is the Frobenius-optimal projection onto
        the grid at that rank (Eckart-Young on every block). With ``second_moment``
        (``C = X^T X / N`` of the inputs) each block's SVD is whitened by the diagonal block of
        ``C`` of its column band (cross-band correlations of the inputs are not used).
        """
        out_features, in_features = check_dense_args(weight, bias)
        if search and block_shape is None:
            return best_by_error(
                [{}] + [{"block_shape": s} for s in candidate_shapes(out_features, in_features)],
                lambda **kw: cls.from_dense(weight, budget, bias, second_moment=second_moment,
                                            search=False, **kw),
                weight, check_second_moment(second_moment, in_features),
            )
        layer = cls(
            in_features, out_features, block_shape, bias=bias is not None, budget=budget,
            device=weight.device, dtype=weight.dtype,
        )
        p, q = layer.block_shape
        moments = check_second_moment(second_moment, in_features)
        if moments is not None:  # each block sees the inputs of its column band
            moments = diagonal_blocks(moments, q).unsqueeze(0)
        u, v = truncated_svd_factors(to_blocks(weight.detach(), p, q), layer.rank, moments)
        layer.load_tensors(bias, U=u, V=v)
        return layer
