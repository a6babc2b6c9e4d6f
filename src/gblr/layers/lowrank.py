"""Low-rank linear layer: ``W = U V`` with ``U (out, R)`` and ``V (R, in)``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gblr.core.budget import (
    budget_to_macs,
    check_budget,
    check_within_budget,
    max_rank_for_budget,
)
from gblr.core.cost import lowrank_cost
from gblr.core.validate import check_positive
from gblr.layers.base import (
    StructuredLinear,
    check_dense_args,
    check_second_moment,
    init_uniform_,
    register_structure,
)
from gblr.layers.blocks import truncated_svd_factors

__all__ = ["LowRankLinear"]


def _resolve_rank(
    in_features: int, out_features: int, rank: int | None, budget: float | None
) -> int:
    min_dim = min(in_features, out_features)
    if budget is not None:
        budget = check_budget(budget)
    if rank is None:
        if budget is None:
            raise ValueError("LowRankLinear needs rank or budget")
        rank = max_rank_for_budget(in_features, out_features, budget)
        if rank == 0:
            raise ValueError(
                f"budget={budget} is too small for rank 1 on a {out_features}x{in_features} "
                f"weight (needs {in_features + out_features} MACs, budget allows "
                f"{budget_to_macs(budget, in_features, out_features):.1f})"
            )
        return rank
    rank = check_positive("rank", rank)
    if rank > min_dim:
        raise ValueError(f"rank={rank} exceeds min(in_features, out_features)={min_dim}")
    check_within_budget(
        lowrank_cost(in_features, out_features, rank), budget, in_features, out_features,
        f"rank={rank} costs",
    )
    return rank


@register_structure("lowrank")
class LowRankLinear(StructuredLinear):
    """``y = U (V x) + b``: a rank-``R`` factorization, cost ``R * (in + out)`` MACs per token.

    Args:
        in_features, out_features: sizes, as for ``nn.Linear``.
        rank: ``R``, at most ``min(in, out)``.
        bias: learn an additive bias.
        budget: fraction of the dense cost; when ``rank`` is None the largest rank with
            ``R * (in + out) <= budget * in * out`` is used, otherwise ``rank`` is checked
            against it.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int | None = None,
        bias: bool = True,
        *,
        budget: float | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.rank = _resolve_rank(self.in_features, self.out_features, rank, budget)
        factory = {"device": device, "dtype": dtype}
        self.U = nn.Parameter(torch.empty(self.out_features, self.rank, **factory))
        self.V = nn.Parameter(torch.empty(self.rank, self.in_features, **factory))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Each factor as ``nn.Linear`` initialises a layer of its fan-in; bias likewise."""
        init_uniform_(self.V, self.in_features)
        init_uniform_(self.U, self.rank)
        self.reset_bias()

    def _forward_2d(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.V.t()) @ self.U.t()

    def _linear_2d(self, x: torch.Tensor) -> torch.Tensor:
        # the bias fused into the second GEMM: added separately it is one more pass over the
        # output (measured 25% of the forward of a 768->3072 layer at 4096 tokens on CPU)
        return F.linear(F.linear(x, self.V), self.U, self.bias)

    def to_dense(self) -> torch.Tensor:
        return self.U @ self.V

    def gemms(self, tokens: int | None = None) -> list[tuple[int, int, int]]:
        return [(1, self.rank, self.in_features), (1, self.out_features, self.rank)]

    def macs(self) -> int:
        return lowrank_cost(self.in_features, self.out_features, self.rank)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}"

    @classmethod
    def from_dense(
        cls,
        weight: torch.Tensor,
        budget: float,
        bias: torch.Tensor | None = None,
        *,
        second_moment: torch.Tensor | None = None,
    ) -> LowRankLinear:
        """Truncated SVD of ``weight`` at the largest rank the budget allows (optimal in
        Frobenius norm, Eckart-Young); the factors share the singular values' square roots.

        With ``second_moment`` (``C = X^T X / N`` of the layer's inputs) the whitened SVD,
        which minimises the output error on those inputs instead.
        """
        out_features, in_features = check_dense_args(weight, bias)
        moments = check_second_moment(second_moment, in_features)
        layer = cls(
            in_features, out_features, bias=bias is not None, budget=budget,
            device=weight.device, dtype=weight.dtype,
        )
        u, v = truncated_svd_factors(weight.detach(), layer.rank, moments)
        layer.load_tensors(bias, U=u, V=v)
        return layer
