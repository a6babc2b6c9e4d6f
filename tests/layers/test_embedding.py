"""LowRankEmbedding: a token table held as two factors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gblr.layers import LowRankEmbedding
from gblr.layers.embedding import embedding_rank


def _table(v: int = 50, d: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randn(v, d, generator=torch.Generator().manual_seed(seed))


def test_full_rank_is_exact_and_forward_is_a_lookup():
    table = _table()
    emb = LowRankEmbedding.from_dense(table, rank=12)
    assert torch.allclose(emb.to_dense(), table, atol=1e-5)
    ids = torch.tensor([[0, 3, 49], [7, 7, 1]])
    assert torch.allclose(emb(ids), F.embedding(ids, emb.to_dense()), atol=1e-6)
    assert emb(ids).shape == (2, 3, 12)


def test_budget_sets_the_largest_rank_that_fits():
    emb = LowRankEmbedding.from_dense(_table(), budget=0.5)
    assert emb.rank == embedding_rank(50, 12, 0.5) == 4  # 4 * 62 <= 300 < 5 * 62
    assert emb.params() == sum(p.numel() for p in emb.parameters()) <= 0.5 * 50 * 12
    assert emb.macs() == 4 * 12
    with pytest.raises(ValueError, match="too small for rank 1"):
        LowRankEmbedding.from_dense(_table(), budget=0.01)
    with pytest.raises(ValueError, match="rank or budget"):
        LowRankEmbedding.from_dense(_table())


def test_plain_projection_is_the_truncated_svd():
    table = _table()
    emb = LowRankEmbedding.from_dense(table, rank=3)
    u, s, vh = torch.linalg.svd(table.double(), full_matrices=False)
    best = (u[:, :3] * s[:3]) @ vh[:3]
    assert torch.allclose(emb.to_dense().double(), best, atol=1e-4)


def test_token_counts_keep_the_frequent_rows_closest():
    table = _table()
    counts = torch.zeros(50)
    counts[:5] = 1000.0
    plain = LowRankEmbedding.from_dense(table, rank=3)
    weighted = LowRankEmbedding.from_dense(table, rank=3, frequencies=counts)

    def err(e, rows):
        return float((e.to_dense().detach() - table)[rows].norm())

    assert err(weighted, slice(0, 5)) < 0.5 * err(plain, slice(0, 5))
    # optimal for its own weighting: no worse than the plain SVD under that weighting
    w = (counts + 1).sqrt()[:, None]
    assert float(((weighted.to_dense().detach() - table) * w).norm()) <= float(
        ((plain.to_dense().detach() - table) * w).norm()) + 1e-4


def test_padding_token_gets_no_gradient():
    emb = LowRankEmbedding(10, 6, rank=2, padding_idx=-1)
    assert emb.padding_idx == 9 and torch.all(emb.codes[9] == 0)
    emb(torch.tensor([9, 9, 2])).sum().backward()
    assert torch.all(emb.codes.grad[9] == 0) and emb.codes.grad[2].abs().sum() > 0


@pytest.mark.parametrize("kwargs, match", [
    ({"rank": 7}, "exceeds"),
    ({"rank": 0}, "rank"),
    ({"rank": 2, "padding_idx": 10}, "outside the vocabulary"),
])
def test_bad_shapes_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LowRankEmbedding(10, 6, **kwargs)


def test_bad_frequencies_are_refused():
    with pytest.raises(ValueError, match="shape"):
        LowRankEmbedding.from_dense(_table(), rank=2, frequencies=torch.ones(3))
    with pytest.raises(ValueError, match=">= 0"):
        LowRankEmbedding.from_dense(_table(), rank=2, frequencies=-torch.ones(50))
    with pytest.raises(ValueError, match="num_embeddings, embedding_dim"):
        LowRankEmbedding.from_dense(torch.ones(3, 4, 5), rank=2)


def test_repr_and_reset():
    emb = LowRankEmbedding(10, 6, rank=2, padding_idx=0)
    assert repr(emb) == "LowRankEmbedding(10, 6, rank=2, padding_idx=0)"
    torch.manual_seed(0)
    emb.reset_parameters()
    rows = emb.to_dense().detach()[1:]
    assert 0.3 < float(rows.std()) < 3.0  # rows of about unit scale, like nn.Embedding
