"""Block-diagonal linear layer: ``nblocks`` independent dense blocks on the diagonal."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gblr.core.budget import budget_to_macs, check_budget, check_within_budget, within_budget
from gblr.core.cost import blockdiag_cost, padded_block_size
from gblr.layers.base import (
    StructuredLinear,
    check_dense_args,
    init_uniform_,
    register_structure,
)
from gblr.layers.blocks import (
    check_nblocks,
    pad_matrix,
    padding_masks,
    to_blocks,
    valid_nblocks,
)

__all__ = ["BlockDiagLinear"]


def _useful_macs(in_features: int, out_features: int, nblocks: int) -> int:
    """MACs on real (unpadded) entries: all blocks full but the last, which is cut."""
    bi = padded_block_size(in_features, nblocks)
    bo = padded_block_size(out_features, nblocks)
    last_in = in_features - (nblocks - 1) * bi
    last_out = out_features - (nblocks - 1) * bo
    return (nblocks - 1) * bi * bo + last_in * last_out


def _resolve_nblocks(
    in_features: int, out_features: int, nblocks: int | None, budget: float | None
) -> int:
    if budget is not None:
        budget = check_budget(budget)
    if nblocks is not None:
        nb = check_nblocks(nblocks, in_features, out_features)
        check_within_budget(
            blockdiag_cost(in_features, out_features, nb), budget, in_features, out_features,
            f"nblocks={nb} costs",
        )
        return nb
    if budget is None:
        raise ValueError("BlockDiagLinear needs nblocks or budget")
    best: tuple[int, int] | None = None
    valid = valid_nblocks(in_features, out_features)
    for nb in valid:
        if not within_budget(blockdiag_cost(in_features, out_features, nb), budget,
                             in_features, out_features):
            continue
        key = (_useful_macs(in_features, out_features, nb), -nb)
        if best is None or key > best:
            best = key
    if best is None:
        smallest = min(blockdiag_cost(in_features, out_features, nb) for nb in valid)
        raise ValueError(
            f"budget={budget} is too small for a block-diagonal {out_features}x{in_features} "
            f"weight (the cheapest costs {smallest} MACs, budget allows "
            f"{budget_to_macs(budget, in_features, out_features):.1f})"
        )
    return -best[1]


@register_structure("blockdiag")
class BlockDiagLinear(StructuredLinear):
    """``nblocks`` dense blocks of ``ceil(out/nb) x ceil(in/nb)`` on the diagonal.

    When ``nblocks`` does not divide a size, that axis is zero-padded at the end (the
    padded entries of ``weight`` stay zero and receive no gradient) and the cost counts
    the padded blocks as computed: ``nblocks * ceil(in/nb) * ceil(out/nb)`` MACs per token.

    Args:
        in_features, out_features: sizes, as for ``nn.Linear``.
        nblocks: number of diagonal blocks; it must leave no block empty.
        bias: learn an additive bias.
        budget: fraction of the dense cost; when ``nblocks`` is None, the block count whose
            cost fits the budget and covers the most real entries is chosen (ties: fewer
            blocks), otherwise ``nblocks`` is checked against it.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        nblocks: int | None = None,
        bias: bool = True,
        *,
        budget: float | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.nblocks = _resolve_nblocks(self.in_features, self.out_features, nblocks, budget)
        self.block_in = padded_block_size(self.in_features, self.nblocks)
        self.block_out = padded_block_size(self.out_features, self.nblocks)
        self.weight = nn.Parameter(
            torch.empty(self.nblocks, self.block_out, self.block_in, device=device, dtype=dtype)
        )
        self.reset_parameters()

    def _padding(self) -> torch.Tensor:
        """Boolean ``weight``-shaped mask of the entries that only touch padding."""
        rows, cols = padding_masks(self.nblocks, self.block_out, self.block_in,
                                   self.out_features, self.in_features, self.weight.device)
        return rows | cols

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Each block as ``nn.Linear`` initialises a ``block_in -> block_out`` layer."""
        init_uniform_(self.weight, self.block_in)
        self.weight.masked_fill_(self._padding(), 0.0)
        self.reset_bias()

    def _forward_2d(self, x: torch.Tensor) -> torch.Tensor:
        nb, bo, bi = self.nblocks, self.block_out, self.block_in
        tokens = x.shape[0]
        x = F.pad(x, (0, nb * bi - self.in_features))
        y = torch.bmm(x.reshape(tokens, nb, bi).transpose(0, 1), self.weight.transpose(1, 2))
        return y.transpose(0, 1).reshape(tokens, nb * bo)[:, : self.out_features]

    def to_dense(self) -> torch.Tensor:
        return torch.block_diag(*self.weight.unbind(0))[: self.out_features, : self.in_features]

    def gemms(self, tokens: int | None = None) -> list[tuple[int, int, int]]:
        return [(self.nblocks, self.block_out, self.block_in)]

    def macs(self) -> int:
        return blockdiag_cost(self.in_features, self.out_features, self.nblocks)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, nblocks={self.nblocks}"

    @classmethod
    def from_dense(
        cls,
        weight: torch.Tensor,
        budget: float,
        bias: torch.Tensor | None = None,
        *,
        nblocks: int | None = None,
    ) -> BlockDiagLinear:
        """Keep the diagonal blocks of ``weight`` (the Frobenius-optimal projection).

        ``nblocks`` is chosen from ``budget`` unless given (then it must fit the budget).
        """
        out_features, in_features = check_dense_args(weight, bias)
        layer = cls(
            in_features, out_features, nblocks, bias=bias is not None, budget=budget,
            device=weight.device, dtype=weight.dtype,
        )
        nb, bo, bi = layer.nblocks, layer.block_out, layer.block_in
        grid = to_blocks(pad_matrix(weight.detach(), nb * bo, nb * bi), bo, bi)
        idx = torch.arange(nb, device=weight.device)
        layer.load_tensors(bias, weight=grid[idx, idx])
        return layer
