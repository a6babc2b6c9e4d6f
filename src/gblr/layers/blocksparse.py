"""Block-sparse linear layer: a fixed grid of ``p x q`` blocks of which a set is kept."""

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
from gblr.core.cost import block_sparse_cost
from gblr.core.validate import check_positive
from gblr.layers.base import (
    StructuredLinear,
    check_dense_args,
    init_uniform_,
    register_structure,
)
from gblr.layers.blocks import (
    best_by_error,
    candidate_shapes,
    check_block_shape,
    default_block_shape,
    from_blocks,
    to_blocks,
)

__all__ = ["BlockSparseLinear", "DEFAULT_BLOCK_SIDE"]

#: Default block side when ``block_shape`` is not given: the divisor nearest
#: ``min(DEFAULT_BLOCK_SIDE, n // 4)`` on each axis.
DEFAULT_BLOCK_SIDE = 32


def _check_block_mask(mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"block_mask must be a torch.Tensor, got {type(mask).__name__}")
    if tuple(mask.shape) != grid:
        raise ValueError(f"block_mask must have shape {grid}, got {tuple(mask.shape)}")
    mask = mask.bool()
    if not bool(mask.any()):
        raise ValueError("block_mask must keep at least one block")
    return mask


def _resolve_shape(
    n_in: int,
    n_out: int,
    block_shape: tuple[int, int] | None,
    num_blocks: int | None,
    budget: float | None,
    block_mask: torch.Tensor | None,
) -> tuple[tuple[int, int], int]:
    """Block shape and number of kept blocks from the constructor's arguments."""
    if budget is not None:
        budget = check_budget(budget)
    if num_blocks is not None and block_mask is not None:
        raise ValueError("give num_blocks or block_mask, not both")
    if num_blocks is not None:
        num_blocks = check_positive("num_blocks", num_blocks)
    if block_mask is None and num_blocks is None and budget is None:
        raise ValueError("BlockSparseLinear needs num_blocks, block_mask or budget")
    if block_shape is None and block_mask is not None:
        if not isinstance(block_mask, torch.Tensor) or block_mask.dim() != 2:
            raise ValueError("block_mask must be a 2-D boolean tensor (out/rows, in/cols)")
        gr, gc = block_mask.shape
        if gr == 0 or gc == 0 or n_out % gr or n_in % gc:
            raise ValueError(
                f"block_mask of shape {tuple(block_mask.shape)} does not divide a "
                f"({n_out}, {n_in}) weight into blocks"
            )
        block_shape = (n_out // gr, n_in // gc)
    if block_shape is None:
        target = tuple(max(1, min(DEFAULT_BLOCK_SIDE, n // 4)) for n in (n_out, n_in))

        def feasible(p: int, q: int) -> bool:
            count = 1 if num_blocks is None else num_blocks
            if count > (n_out // p) * (n_in // q):
                return False
            return budget is None or within_budget(block_sparse_cost(count, p, q), budget,
                                                   n_in, n_out)

        wanted = f"num_blocks={num_blocks}" if num_blocks is not None else "one block"
        if budget is not None:
            wanted += f" within budget={budget}"
        block_shape = default_block_shape(n_out, n_in, target, feasible, wanted)
    p, q = check_block_shape(block_shape, n_out, n_in)
    total = (n_out // p) * (n_in // q)
    if block_mask is not None:
        count = int(_check_block_mask(block_mask, (n_out // p, n_in // q)).sum())
    elif num_blocks is not None:
        count = num_blocks
    else:
        count = min(total, units_within_budget(budget, n_in, n_out, p * q))
        if count == 0:
            raise ValueError(
                f"budget={budget} is too small for one {p}x{q} block "
                f"({p * q} MACs, budget allows {budget_to_macs(budget, n_in, n_out):.1f})"
            )
    if count > total:
        raise ValueError(f"num_blocks={count} exceeds the {total} blocks of the grid")
    check_within_budget(
        block_sparse_cost(count, p, q), budget, n_in, n_out, f"{count} blocks of {p}x{q} cost"
    )
    return (p, q), count


@register_structure("blocksparse")
class BlockSparseLinear(StructuredLinear):
    """A grid of ``rows x cols`` blocks of which ``num_blocks`` are dense and the rest zero.

    Cost: ``num_blocks * rows * cols`` MACs per token. The kept blocks are the
    parameter ``blocks (num_blocks, rows, cols)``; their grid positions are the buffers
    ``block_rows`` and ``block_cols`` (row-major order).

    Args:
        in_features, out_features: sizes, as for ``nn.Linear``.
        block_shape: ``(rows, cols)`` of one block; it must tile the weight. Default: the
            divisors nearest ``min(32, n // 4)`` on each axis among those the budget allows,
            or the shape implied by ``block_mask``.
        num_blocks: how many blocks to keep (at random positions).
        bias: learn an additive bias.
        budget: fraction of the dense cost; when neither ``num_blocks`` nor ``block_mask``
            is given, the most blocks that fit are kept, otherwise the cost is checked.
        block_mask: boolean ``(out/rows, in/cols)`` grid of the kept blocks.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        block_shape: tuple[int, int] | None = None,
        num_blocks: int | None = None,
        bias: bool = True,
        *,
        budget: float | None = None,
        block_mask: torch.Tensor | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        n_in, n_out = self.in_features, self.out_features
        (p, q), count = _resolve_shape(n_in, n_out, block_shape, num_blocks, budget, block_mask)
        grid = (n_out // p, n_in // q)
        self.block_shape = (p, q)
        if block_mask is not None:
            mask = _check_block_mask(block_mask, grid).cpu()
        else:
            total = grid[0] * grid[1]
            mask = torch.zeros(total, dtype=torch.bool)
            mask[torch.randperm(total)[:count]] = True
            mask = mask.reshape(grid)
        rows, cols = mask.nonzero(as_tuple=True)
        self.num_blocks = int(rows.numel())
        self.register_buffer("block_rows", rows.to(device=device, dtype=torch.long))
        self.register_buffer("block_cols", cols.to(device=device, dtype=torch.long))
        self.blocks = nn.Parameter(
            torch.empty(self.num_blocks, p, q, device=device, dtype=dtype)
        )
        self.reset_parameters()

    @property
    def grid_shape(self) -> tuple[int, int]:
        """``(out/rows, in/cols)``: the number of blocks on each axis."""
        p, q = self.block_shape
        return self.out_features // p, self.in_features // q

    def block_mask(self) -> torch.Tensor:
        """Boolean grid of the kept blocks."""
        mask = torch.zeros(self.grid_shape, dtype=torch.bool, device=self.block_rows.device)
        mask[self.block_rows, self.block_cols] = True
        return mask

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Uniform as ``nn.Linear`` with the mean number of nonzeros per row as fan-in."""
        p, q = self.block_shape
        fan_in = max(1.0, self.num_blocks * q / self.grid_shape[0])
        init_uniform_(self.blocks, fan_in)
        self.reset_bias()

    def _forward_2d(self, x: torch.Tensor) -> torch.Tensor:
        p, q = self.block_shape
        gr, gc = self.grid_shape
        tokens = x.shape[0]
        xb = x.reshape(tokens, gc, q).transpose(0, 1)[self.block_cols]  # (nnz, T, q)
        yb = torch.bmm(xb, self.blocks.transpose(1, 2))  # (nnz, T, p)
        y = yb.new_zeros(gr, tokens, p).index_add(0, self.block_rows, yb)
        return y.transpose(0, 1).reshape(tokens, gr * p)

    def gemms(self, tokens: int | None = None) -> list[tuple[int, int, int]]:
        p, q = self.block_shape
        return [(self.num_blocks, p, q)]

    def to_dense(self) -> torch.Tensor:
        p, q = self.block_shape
        gr, gc = self.grid_shape
        grid = self.blocks.new_zeros(gr, gc, p, q)
        grid = grid.index_put((self.block_rows, self.block_cols), self.blocks)
        return from_blocks(grid)

    def macs(self) -> int:
        p, q = self.block_shape
        return block_sparse_cost(self.num_blocks, p, q)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, block_shape={self.block_shape}, "
            f"num_blocks={self.num_blocks}/{self.grid_shape[0] * self.grid_shape[1]}"
        )

    @classmethod
    def from_dense(
        cls,
        weight: torch.Tensor,
        budget: float,
        bias: torch.Tensor | None = None,
        *,
        block_shape: tuple[int, int] | None = None,
        search: bool = True,
    ) -> BlockSparseLinear:
        """Keep the blocks of ``weight`` with the largest Frobenius norm, as many as fit.

        This is the Frobenius-optimal projection for a fixed grid. Ties in norm go to
        the block that comes first in row-major order. With ``search`` (the default) and no
        ``block_shape``, the default grid and up to 12 other tilings
        (:func:`~gblr.layers.blocks.candidate_shapes`) are compared and the one with the
        lowest error is returned: the baseline at its best within the budget.
        """
        out_features, in_features = check_dense_args(weight, bias)
        if search and block_shape is None:
            return best_by_error(
                [{}] + [{"block_shape": s} for s in candidate_shapes(out_features, in_features)],
                lambda **kw: cls.from_dense(weight, budget, bias, search=False, **kw),
                weight,
            )
        (p, q), count = _resolve_shape(in_features, out_features, block_shape, None, budget, None)
        grid = to_blocks(weight.detach(), p, q)
        norms = grid.double().pow(2).sum(dim=(-2, -1)).flatten()
        order = torch.sort(norms, descending=True, stable=True).indices[:count]
        mask = torch.zeros_like(norms, dtype=torch.bool)
        mask[order] = True
        mask = mask.reshape(grid.shape[:2])
        layer = cls(
            in_features, out_features, (p, q), bias=bias is not None, budget=budget,
            block_mask=mask, device=weight.device, dtype=weight.dtype,
        )
        layer.load_tensors(bias, blocks=grid[layer.block_rows, layer.block_cols])
        return layer
