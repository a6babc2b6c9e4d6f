"""Monarch linear layer (Dao et al., 2022): two block-diagonal factors and a permutation.

``W = L P R`` (sizes that ``nblocks`` does not divide are zero-padded): ``R`` is
block-diagonal with ``nblocks`` blocks ``(nblocks*rank) x ceil(in/nb)``, ``P`` the
stride permutation that regroups its outputs by output block, ``L`` block-diagonal
with ``nblocks`` blocks ``ceil(out/nb) x (nblocks*rank)``. The paper's outer
permutation of the outputs is left out, as in its reference code. Equivalently, on
the ``nblocks x nblocks`` grid of ``ceil(out/nb) x ceil(in/nb)`` blocks of ``W``,
every block has rank ``rank``. With a square ``n x n`` weight, ``nblocks = sqrt(n)``
and ``rank = 1`` this is the Monarch matrix of the paper, and
``rank = n / nblocks**2`` the Monarch layer with ``nblocks`` square blocks per factor.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from gblr.core.budget import budget_to_macs, check_budget, units_within_budget
from gblr.core.cost import monarch_cost, padded_block_size
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
    check_nblocks,
    diagonal_blocks,
    divisors,
    factors_to_blocks,
    from_blocks,
    pad_matrix,
    padding_masks,
    to_blocks,
    truncated_svd_factors,
    valid_nblocks,
)

__all__ = ["MonarchLinear"]


def _max_rank(n_in: int, n_out: int, nb: int) -> int:
    return min(padded_block_size(n_in, nb), padded_block_size(n_out, nb))


def _resolve(
    n_in: int, n_out: int, nblocks: int | None, rank: int | None, budget: float | None
) -> tuple[int, int]:
    """``(nblocks, rank)`` from the constructor's arguments."""
    if budget is not None:
        budget = check_budget(budget)
    if nblocks is not None:
        nblocks = check_nblocks(nblocks, n_in, n_out)
    if rank is not None:
        rank = check_positive("rank", rank)
        if nblocks is not None and rank > _max_rank(n_in, n_out, nblocks):
            raise ValueError(
                f"rank={rank} exceeds the block's min dimension {_max_rank(n_in, n_out, nblocks)}"
            )
    if budget is None:
        if nblocks is None:
            raise ValueError("MonarchLinear needs nblocks or budget")
        if rank is None:
            rank = -(-_max_rank(n_in, n_out, nblocks) // nblocks)
        return nblocks, rank
    if nblocks is not None:
        candidates = [nblocks]
    else:
        candidates = valid_nblocks(n_in, n_out)
    centre = math.sqrt(min(n_in, n_out))
    best: tuple[tuple[int, float, int], int, int] | None = None
    for nb in candidates:
        k_max = min(_max_rank(n_in, n_out, nb),
                    units_within_budget(budget, n_in, n_out, monarch_cost(n_in, n_out, nb, 1)))
        k = k_max if rank is None else (rank if rank <= k_max else 0)
        if k < 1:
            continue
        # budget spent on real (unpadded) rows and columns; ties: nblocks nearest sqrt(min dim)
        key = (k * nb * (n_in + n_out), -abs(nb - centre), -nb)
        if best is None or key > best[0]:
            best = (key, nb, k)
    if best is None:
        what = f"nblocks={nblocks}" if nblocks is not None else "any nblocks"
        what += f", rank={rank}" if rank is not None else ", rank 1"
        raise ValueError(
            f"budget={budget} is too small for a Monarch {n_out}x{n_in} weight with {what} "
            f"(budget allows {budget_to_macs(budget, n_in, n_out):.1f} MACs)"
        )
    return best[1], best[2]


@register_structure("monarch")
class MonarchLinear(StructuredLinear):
    """Monarch layer: ``y = L P R x + b`` with block-diagonal ``R`` and ``L``.

    ``blkdiag1`` is ``R``, ``(nblocks, nblocks*rank, ceil(in/nb))``; ``blkdiag2`` is ``L``,
    ``(nblocks, ceil(out/nb), nblocks*rank)``. Sizes that ``nblocks`` does not divide are
    zero-padded at the end (entries that only touch padding stay zero and get no
    gradient). Cost: ``rank * nblocks**2 * (ceil(in/nb) + ceil(out/nb))`` MACs per token,
    about ``rank * nblocks * (in + out)``.

    Args:
        in_features, out_features: sizes, as for ``nn.Linear``.
        nblocks: blocks per factor, at most ``min(in, out)`` and leaving no block empty.
        rank: rank of each of the ``nblocks**2`` blocks of ``W``, at most
            ``min(ceil(in/nb), ceil(out/nb))``. Default without a budget:
            ``ceil(min(ceil(in/nb), ceil(out/nb)) / nblocks)``, Dao et al.'s factors of
            ``nblocks`` square-ish blocks.
        bias: learn an additive bias.
        budget: fraction of the dense cost. Missing ``nblocks``/``rank`` are chosen to spend
            the most of it on real (unpadded) rows and columns, ties going to ``nblocks``
            nearest ``sqrt(min(in, out))``; given ones are checked against it.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        nblocks: int | None = None,
        rank: int | None = None,
        bias: bool = True,
        *,
        budget: float | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.nblocks, self.rank = _resolve(
            self.in_features, self.out_features, nblocks, rank, budget
        )
        nb, k = self.nblocks, self.rank
        self.block_in = padded_block_size(self.in_features, nb)
        self.block_out = padded_block_size(self.out_features, nb)
        factory = {"device": device, "dtype": dtype}
        self.blkdiag1 = nn.Parameter(torch.empty(nb, nb * k, self.block_in, **factory))
        self.blkdiag2 = nn.Parameter(torch.empty(nb, self.block_out, nb * k, **factory))
        self.reset_parameters()

    def _paddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Boolean masks of the entries of ``blkdiag1`` and ``blkdiag2`` that touch padding."""
        rows, cols = padding_masks(self.nblocks, self.block_out, self.block_in,
                                   self.out_features, self.in_features, self.blkdiag1.device)
        return cols.expand_as(self.blkdiag1), rows.expand_as(self.blkdiag2)

    @torch.no_grad()
    def _zero_padding(self) -> None:
        pad1, pad2 = self._paddings()
        self.blkdiag1.masked_fill_(pad1, 0.0)
        self.blkdiag2.masked_fill_(pad2, 0.0)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Each block as ``nn.Linear`` initialises a layer of its fan-in; padding zero."""
        init_uniform_(self.blkdiag1, self.block_in)
        init_uniform_(self.blkdiag2, self.nblocks * self.rank)
        self._zero_padding()
        self.reset_bias()

    def _forward_2d(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (0, self.nblocks * self.block_in - self.in_features))
        y = block_factor_matmul(x, self.blkdiag1, self.blkdiag2)
        return y[:, : self.out_features]

    def to_dense(self) -> torch.Tensor:
        U, V = factors_to_blocks(self.blkdiag1, self.blkdiag2)
        return from_blocks(U @ V)[: self.out_features, : self.in_features]

    def gemms(self, tokens: int | None = None) -> list[tuple[int, int, int]]:
        nb, k = self.nblocks, self.rank
        return [(nb, nb * k, self.block_in), (nb, self.block_out, nb * k)]

    def macs(self) -> int:
        return monarch_cost(self.in_features, self.out_features, self.nblocks, self.rank)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, nblocks={self.nblocks}, rank={self.rank}"

    @classmethod
    def from_dense(
        cls,
        weight: torch.Tensor,
        budget: float,
        bias: torch.Tensor | None = None,
        *,
        nblocks: int | None = None,
        rank: int | None = None,
        second_moment: torch.Tensor | None = None,
        search: bool = True,
    ) -> MonarchLinear:
        """Closed-form projection: rank-``rank`` truncated SVD of every block of ``weight``.

        With ``search`` (the default) and neither ``nblocks`` nor ``rank`` given, every
        block count that divides both sizes (``nblocks=1`` is low rank) is projected at the
        largest rank the budget allows, with the constructor's default choice, and the one
        with the lowest (data-aware, with ``second_moment``) error is returned: the
        baseline at its best within the budget.

        Each block of the ``nblocks x nblocks`` grid uses its own rows of ``R`` and
        columns of ``L``, so the blocks decouple and the block-wise SVD is the
        Frobenius-optimal Monarch approximation of the zero-padded ``weight``
        (block-wise rank-1 SVD in the paper's square case). With ``second_moment``
        (``C = X^T X / N`` of the inputs) each block's SVD is whitened by the diagonal block of
        ``C`` of its column band, which lowers the output error (cross-band correlations of
        the inputs are not used).
        """
        out_features, in_features = check_dense_args(weight, bias)
        if search and nblocks is None and rank is None:
            common = [d for d in divisors(in_features) if out_features % d == 0]
            return best_by_error(
                [{}] + [{"nblocks": nb} for nb in common],
                lambda **kw: cls.from_dense(weight, budget, bias, second_moment=second_moment,
                                            search=False, **kw),
                weight, check_second_moment(second_moment, in_features),
            )
        layer = cls(
            in_features, out_features, nblocks, rank, bias=bias is not None, budget=budget,
            device=weight.device, dtype=weight.dtype,
        )
        nb, bi, bo = layer.nblocks, layer.block_in, layer.block_out
        grid = to_blocks(pad_matrix(weight.detach(), nb * bo, nb * bi), bo, bi)
        moments = check_second_moment(second_moment, in_features)
        if moments is not None:  # each block sees the inputs of its column band
            padded = pad_matrix(moments, nb * bi, nb * bi)
            moments = diagonal_blocks(padded, bi).unsqueeze(0)
        u, v = truncated_svd_factors(grid, layer.rank, moments)
        first, second = blocks_to_factors(u, v)
        layer.load_tensors(bias, blkdiag1=first, blkdiag2=second)
        layer._zero_padding()
        return layer
