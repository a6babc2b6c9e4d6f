"""Factorized token embedding: the table ``E (V, d)`` held as ``codes (V, R) @ basis (R, d)``.

A model's token embedding is often the largest single tensor it has (MiniLM-L6: 11.7M of
its 22.7M parameters), untouched by compressing its linear layers. Held in factored form it
costs ``R * (V + d)`` parameters instead of ``V * d``, and ``R * d`` MACs per token for the
product that rebuilds a row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gblr.core.budget import check_budget, max_rank_for_budget
from gblr.core.validate import check_positive
from gblr.layers.blocks import truncated_svd_factors

__all__ = ["LowRankEmbedding", "embedding_rank"]


def embedding_rank(num_embeddings: int, embedding_dim: int, budget: float) -> int:
    """Largest ``R`` whose factors fit ``budget`` of the table's parameters:
    ``R * (V + d) <= budget * V * d`` (0 when not even rank 1 fits)."""
    return max_rank_for_budget(embedding_dim, num_embeddings, check_budget(budget))


class LowRankEmbedding(nn.Module):
    """Token embedding ``E[ids] = codes[ids] @ basis``, used in place of an ``nn.Embedding``.

    It takes the same ids and gives the same shapes, but it is not an ``nn.Embedding``:
    ``max_norm``, ``scale_grad_by_freq`` and sparse gradients are not supported, and
    ``transformers``' ``resize_token_embeddings`` refuses it. The padding token's code gets
    no gradient, but its row ``codes[padding_idx] @ basis`` moves when ``basis`` trains
    (an ``nn.Embedding`` keeps that row fixed).

    Args:
        num_embeddings: vocabulary size ``V``.
        embedding_dim: width ``d`` of an embedding.
        rank: inner dimension ``R``, ``1 <= R <= min(V, d)``.
        padding_idx: as in ``nn.Embedding``: the code of this token gets no gradient
            (see above).
        device, dtype: of the factors.

    Shape:
        - Input: integer tensor of any shape ``(*)``.
        - Output: ``(*, embedding_dim)``.

    Example:
        >>> emb = LowRankEmbedding.from_dense(torch.randn(1000, 64), budget=0.5)
        >>> emb(torch.tensor([[1, 2, 3]])).shape
        torch.Size([1, 3, 64])
    """

    structure_name = "lowrank-embedding"

    def __init__(self, num_embeddings: int, embedding_dim: int, rank: int,
                 padding_idx: int | None = None, device=None, dtype=None) -> None:
        super().__init__()
        self.num_embeddings = check_positive("num_embeddings", num_embeddings)
        self.embedding_dim = check_positive("embedding_dim", embedding_dim)
        self.rank = check_positive("rank", rank)
        if rank > min(num_embeddings, embedding_dim):
            raise ValueError(f"rank={rank} exceeds min(num_embeddings, embedding_dim)="
                             f"{min(num_embeddings, embedding_dim)}")
        if padding_idx is not None:
            if not -num_embeddings <= padding_idx < num_embeddings:
                raise ValueError(f"padding_idx={padding_idx} is outside the vocabulary of "
                                 f"{num_embeddings}")
            padding_idx %= num_embeddings
        self.padding_idx = padding_idx
        kw = {"device": device, "dtype": dtype}
        self.codes = nn.Parameter(torch.empty(num_embeddings, rank, **kw))
        self.basis = nn.Parameter(torch.empty(rank, embedding_dim, **kw))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Rows of unit-variance entries, as ``nn.Embedding`` starts (``N(0, 1)`` per entry)."""
        nn.init.normal_(self.codes)
        nn.init.normal_(self.basis, std=self.rank ** -0.5)
        if self.padding_idx is not None:
            with torch.no_grad():
                self.codes[self.padding_idx].zero_()

    @classmethod
    def from_dense(cls, weight: torch.Tensor, budget: float | None = None, *,
                   rank: int | None = None, frequencies: torch.Tensor | None = None,
                   padding_idx: int | None = None) -> LowRankEmbedding:
        """The best rank-``R`` factorization of the table ``weight (V, d)``.

        ``R`` is ``rank``, or the largest that fits ``budget`` (a fraction of the table's
        parameters). Without ``frequencies`` the truncated SVD (least squared error over
        all rows); with token counts ``frequencies (V,)`` each row's error is weighted by
        ``count + 1``, so that the tokens a text uses are kept closest while unseen tokens
        still count.
        """
        if weight.dim() != 2:
            raise ValueError(f"weight must be (num_embeddings, embedding_dim), got "
                             f"{tuple(weight.shape)}")
        num, dim = weight.shape
        if rank is None:
            if budget is None:
                raise ValueError("LowRankEmbedding.from_dense needs rank or budget")
            rank = embedding_rank(num, dim, budget)
            if rank == 0:
                raise ValueError(f"budget={budget} is too small for rank 1 on a {num}x{dim} "
                                 f"table (rank 1 holds {num + dim} parameters)")
        if frequencies is None:
            row = torch.ones(num, dtype=torch.float64, device=weight.device)
        else:
            if frequencies.shape != (num,):
                raise ValueError(f"frequencies must have shape ({num},), got "
                                 f"{tuple(frequencies.shape)}")
            if (frequencies < 0).any() or not torch.isfinite(frequencies).all():
                raise ValueError("frequencies must be finite counts >= 0")
            row = (frequencies.to(weight.device, torch.float64) + 1.0).sqrt()
        layer = cls(num, dim, rank, padding_idx=padding_idx, device=weight.device,
                    dtype=weight.dtype)
        codes, basis = truncated_svd_factors(weight.detach().double() * row[:, None], rank)
        with torch.no_grad():
            layer.codes.copy_(codes / row[:, None])
            layer.basis.copy_(basis)
        return layer

    @property
    def weight(self) -> torch.Tensor:
        """The full ``(V, d)`` table (computed, as :meth:`to_dense`; for code that reads it)."""
        return self.to_dense()

    def to_dense(self) -> torch.Tensor:
        """The ``(V, d)`` table the layer represents."""
        return self.codes @ self.basis

    def params(self) -> int:
        """Parameters held: ``R * (V + d)``."""
        return self.rank * (self.num_embeddings + self.embedding_dim)

    def macs(self) -> int:
        """MACs per looked-up token: ``R * d`` (the product that rebuilds a row)."""
        return self.rank * self.embedding_dim

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.codes, self.padding_idx) @ self.basis

    def extra_repr(self) -> str:
        pad = "" if self.padding_idx is None else f", padding_idx={self.padding_idx}"
        return f"{self.num_embeddings}, {self.embedding_dim}, rank={self.rank}{pad}"
