"""Exact GBLR forms of the structures GBLR contains: low rank, block-sparse, block-low-rank.

Each builds a GBLR layer whose matrix and cost equal the structure's (components spanning
exactly the structure's blocks), so the families can be compared and converted.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from typing_extensions import Self

import torch

from gblr.core.validate import check_positive
from gblr.layers.base import check_matrix
from gblr.layers.blocks import truncated_svd_factors

__all__ = ["ExactForms"]


class ExactForms:
    """Constructors of :class:`~gblr.layers.gblr.GBLRLinear` from other structures (a mixin:
    they build through the class's ``_from_components``)."""

    @classmethod
    def from_low_rank(
        cls, U: torch.Tensor, V: torch.Tensor, bias: torch.Tensor | None = None, **kwargs: Any
    ) -> Self:
        """Exact GBLR form of ``U @ V``: one full-width component per rank."""
        if U.dim() != 2 or V.dim() != 2 or U.shape[1] != V.shape[0]:
            raise ValueError(
                f"U (out, R) and V (R, in) must agree, got {tuple(U.shape)} and {tuple(V.shape)}"
            )
        rank = U.shape[1]
        widths = torch.ones(2, rank)
        locations = torch.zeros(2, rank)
        return cls._from_components(U, V, widths, locations, bias, **kwargs)

    @staticmethod
    def _check_blocks(weight: torch.Tensor, block_shape: tuple[int, int]) -> tuple[int, int]:
        if len(block_shape) != 2:
            raise ValueError(f"block_shape must be (rows, cols), got {block_shape!r}")
        p = check_positive("block_shape[0]", block_shape[0])
        q = check_positive("block_shape[1]", block_shape[1])
        out_features, in_features = weight.shape
        if out_features % p or in_features % q:
            raise ValueError(
                f"block_shape {(p, q)} does not tile a weight of shape {tuple(weight.shape)}"
            )
        if p < 2 or q < 2:
            raise ValueError(
                f"block_shape {(p, q)}: GBLR components must span at least 2 indices per axis"
            )
        return p, q

    @classmethod
    def _from_block_factors(
        cls,
        weight: torch.Tensor,
        block_shape: tuple[int, int],
        blocks: list[tuple[int, int]],
        rank: int,
        bias: torch.Tensor | None,
        **kwargs: Any,
    ) -> Self:
        p, q = block_shape
        out_features, in_features = weight.shape
        us, vs, widths, locations = [], [], [], []
        for i, j in blocks:
            rows, cols = slice(i * p, (i + 1) * p), slice(j * q, (j + 1) * q)
            u_blk, v_blk = truncated_svd_factors(weight[rows, cols], rank)
            u = weight.new_zeros(out_features, rank)
            v = weight.new_zeros(rank, in_features)
            u[rows] = u_blk
            v[:, cols] = v_blk
            us.append(u)
            vs.append(v)
            widths.append(torch.tensor([[q / in_features], [p / out_features]]).expand(2, rank))
            locations.append(
                torch.tensor([[j * q / in_features], [i * p / out_features]]).expand(2, rank)
            )
        if not blocks:
            raise ValueError("at least one block must be kept")
        return cls._from_components(
            torch.cat(us, 1), torch.cat(vs, 0), torch.cat(widths, 1), torch.cat(locations, 1),
            bias, **kwargs,
        )

    @classmethod
    def from_block_sparse(
        cls,
        weight: torch.Tensor,
        block_mask: torch.Tensor,
        block_shape: tuple[int, int],
        bias: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Self:
        """Exact GBLR form of ``weight`` restricted to the kept blocks of a grid.

        ``block_shape = (rows, cols)`` of one block; ``block_mask`` is a boolean
        ``(out/rows, in/cols)`` grid. Each kept block becomes ``min(rows, cols)``
        rank-1 components spanning exactly that block, so it costs ``rows * cols``.
        """
        check_matrix(weight)
        p, q = cls._check_blocks(weight, block_shape)
        grid = (weight.shape[0] // p, weight.shape[1] // q)
        block_mask = torch.as_tensor(block_mask)
        if tuple(block_mask.shape) != grid:
            raise ValueError(f"block_mask must have shape {grid}, got {tuple(block_mask.shape)}")
        blocks = [tuple(ij) for ij in block_mask.bool().nonzero().tolist()]
        return cls._from_block_factors(weight, (p, q), blocks, min(p, q), bias, **kwargs)

    @classmethod
    def from_block_low_rank(
        cls,
        weight: torch.Tensor,
        block_shape: tuple[int, int],
        rank: int,
        bias: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Self:
        """Exact GBLR form of the block-low-rank matrix nearest ``weight``.

        Every ``rows x cols`` block is replaced by its rank-``rank`` truncated SVD,
        held as ``rank`` components spanning that block.
        """
        check_matrix(weight)
        p, q = cls._check_blocks(weight, block_shape)
        rank = check_positive("rank", rank)
        if rank > min(p, q):
            raise ValueError(f"rank={rank} exceeds the block's min dimension {min(p, q)}")
        grid = (weight.shape[0] // p, weight.shape[1] // q)
        blocks = [(i, j) for i in range(grid[0]) for j in range(grid[1])]
        return cls._from_block_factors(weight, (p, q), blocks, rank, bias, **kwargs)
