"""The structured family: low-rank, Monarch, block-sparse, block-low-rank, block-diagonal."""

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import gblr
from gblr import (
    BlockDiagLinear,
    BlockLowRankLinear,
    BlockSparseLinear,
    GBLRLinear,
    LowRankLinear,
    MonarchLinear,
)
from gblr.layers.blocks import to_blocks

NAMES = {
    "lowrank": LowRankLinear,
    "monarch": MonarchLinear,
    "blocksparse": BlockSparseLinear,
    "blr": BlockLowRankLinear,
    "blockdiag": BlockDiagLinear,
}

# (class, in, out, constructor kwargs): divisible, rectangular and padded cases
LAYERS = [
    (LowRankLinear, 10, 6, {"rank": 2}),
    (LowRankLinear, 37, 91, {"rank": 5}),
    (MonarchLinear, 16, 16, {"nblocks": 4}),
    (MonarchLinear, 12, 20, {"nblocks": 2, "rank": 3}),
    (MonarchLinear, 10, 7, {"nblocks": 3, "rank": 2}),
    (MonarchLinear, 91, 37, {"budget": 0.3}),
    (BlockSparseLinear, 12, 8, {"block_shape": (2, 3), "num_blocks": 5}),
    (BlockSparseLinear, 91, 37, {"budget": 0.4}),
    (BlockLowRankLinear, 12, 8, {"block_shape": (4, 6), "rank": 2}),
    (BlockLowRankLinear, 91, 37, {"budget": 0.4}),
    (BlockDiagLinear, 12, 8, {"nblocks": 4}),
    (BlockDiagLinear, 10, 7, {"nblocks": 3}),
]
LAYER_IDS = [f"{c.__name__}-{i}x{o}-{sorted(k)}" for c, i, o, k in LAYERS]

SHAPES = [(64, 64), (32, 96), (96, 32), (37, 91), (91, 37)]
BUDGETS = [0.1, 0.25, 0.5, 1.0]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Small SVDs and matmuls: one thread avoids contention on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _dense(out_features, in_features, dtype=torch.float64):
    return torch.randn(out_features, in_features, dtype=dtype)


# -- registry and exports ----------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(NAMES))
def test_registry_lookup(name):
    assert gblr.get_structure(name) is NAMES[name]
    assert gblr.STRUCTURES[name] is NAMES[name]
    assert NAMES[name].structure_name == name
    assert getattr(gblr.layers, NAMES[name].__name__) is NAMES[name]
    assert issubclass(NAMES[name], gblr.StructuredLinear)


def test_registry_unknown_name():
    with pytest.raises(ValueError, match="known structures"):
        gblr.get_structure("butterfly")


# -- forward, to_dense, leading shapes, bias ---------------------------------------------------
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("cls,n_in,n_out,kwargs", LAYERS, ids=LAYER_IDS)
def test_forward_matches_dense_on_leading_shapes(cls, n_in, n_out, kwargs, bias):
    layer = cls(n_in, n_out, bias=bias, dtype=torch.float64, **kwargs)
    if bias:
        torch.nn.init.normal_(layer.bias)
    else:
        assert layer.bias is None
    dense = layer.to_dense()
    assert dense.shape == (n_out, n_in)
    b = layer.bias if bias else torch.zeros(n_out, dtype=torch.float64)
    for shape in [(2, 3, n_in), (n_in,), (2, 1, 3, n_in), (5, n_in)]:
        x = torch.randn(*shape, dtype=torch.float64)
        y = layer(x)
        assert y.shape == (*shape[:-1], n_out)
        torch.testing.assert_close(y, x @ dense.T + b)


@pytest.mark.parametrize("cls,n_in,n_out,kwargs", LAYERS, ids=LAYER_IDS)
def test_flops_match_flop_counter(cls, n_in, n_out, kwargs):
    """flops() counts exactly the MACs the forward pass performs (FlopCounterMode: 2 per MAC)."""
    layer = cls(n_in, n_out, bias=False, **kwargs)
    x = torch.randn(3, 7, n_in)
    with FlopCounterMode(display=False) as counter:
        layer(x)
    assert counter.get_total_flops() == 2 * 21 * layer.macs()


@pytest.mark.parametrize("cls,n_in,n_out,kwargs", LAYERS, ids=LAYER_IDS)
def test_gradients_reach_every_parameter(cls, n_in, n_out, kwargs):
    layer = cls(n_in, n_out, **kwargs)
    layer(torch.randn(4, n_in)).square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and bool(torch.isfinite(p.grad).all()), name


@pytest.mark.parametrize("cls,n_in,n_out,kwargs", LAYERS, ids=LAYER_IDS)
def test_extra_repr_and_reset(cls, n_in, n_out, kwargs):
    layer = cls(n_in, n_out, **kwargs)
    text = repr(layer)
    assert f"in_features={n_in}" in text and f"out_features={n_out}" in text
    before = layer.to_dense().clone()
    layer.reset_parameters()
    assert not torch.equal(before, layer.to_dense())


# -- hand-computed costs and parameter counts --------------------------------------------------
@pytest.mark.parametrize(
    "layer,macs,params",
    [
        (lambda: LowRankLinear(10, 6, rank=2), 2 * (10 + 6), 2 * 16 + 6),
        (lambda: LowRankLinear(10, 6, rank=2, bias=False), 32, 32),
        # Monarch, paper case: n = 16, 4 blocks of 4x4 per factor, rank-1 blocks
        (lambda: MonarchLinear(16, 16, nblocks=4), 4 * 4 * (4 + 4), 2 * 4 * 4 * 4 + 16),
        # default rank ceil(min(6, 10) / 2) = 3: (in + out) * min / nb = 32 * 12 / 2
        (lambda: MonarchLinear(12, 20, nblocks=2, bias=False), 192, 2 * 6 * 6 + 2 * 10 * 6),
        # padded: blocks 4 (in, 10 -> 12) x 3 (out, 7 -> 9), rank 2: 2 * 9 * (4 + 3)
        (lambda: MonarchLinear(10, 7, nblocks=3, rank=2, bias=False), 126, 3 * 6 * 4 + 3 * 3 * 6),
        (lambda: BlockSparseLinear(12, 8, (2, 3), num_blocks=5), 5 * 2 * 3, 30 + 8),
        (lambda: BlockLowRankLinear(12, 8, (4, 6), rank=2), 4 * 2 * (4 + 6), 4 * 2 * 10 + 8),
        (lambda: BlockDiagLinear(12, 8, nblocks=4, bias=False), 4 * 3 * 2, 24),
        # padded: blocks 4 x 3 on 3 blocks
        (lambda: BlockDiagLinear(10, 7, nblocks=3, bias=False), 3 * 4 * 3, 36),
    ],
)
def test_hand_computed_cost(layer, macs, params):
    layer = layer()
    assert layer.macs() == macs
    assert layer.num_parameters() == params
    assert layer.dense_macs() == layer.in_features * layer.out_features


def test_cost_rules_in_cost_module():
    assert gblr.cost.blockdiag_cost(12, 8, 4) == 24
    assert gblr.cost.monarch_cost(16, 16, 4, 1) == 128
    assert gblr.cost.monarch_cost(768, 768, 4, 48) == (768 + 768) * 768 // 4
    assert gblr.cost.block_sparse_cost(5, 2, 3) == 30
    assert gblr.cost.block_low_rank_cost(12, 8, 4, 6, 2) == 80
    assert gblr.cost.padded_block_size(10, 3) == 4


# -- from_dense meets the budget ---------------------------------------------------------------
@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{o}x{i}" for o, i in SHAPES])
@pytest.mark.parametrize("name", sorted(NAMES))
def test_from_dense_meets_budget(name, shape, budget):
    out_features, in_features = shape
    weight = _dense(out_features, in_features, torch.float32)
    bias = torch.randn(out_features)
    layer = gblr.get_structure(name).from_dense(weight, budget, bias=bias)
    assert isinstance(layer, NAMES[name])
    assert (layer.out_features, layer.in_features) == shape
    assert 0 < layer.macs() <= budget * in_features * out_features
    torch.testing.assert_close(layer.bias, bias)
    # the projection is no worse than the zero matrix
    assert (layer.to_dense() - weight).norm() < weight.norm()


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{o}x{i}" for o, i in SHAPES])
def test_budget_is_spent_as_far_as_the_structure_allows(shape, budget):
    out_features, in_features = shape
    limit = budget * in_features * out_features
    weight = _dense(out_features, in_features)
    lr = LowRankLinear.from_dense(weight, budget)
    assert lr.macs() + in_features + out_features > limit or lr.rank == min(shape)
    bsp = BlockSparseLinear.from_dense(weight, budget)
    p, q = bsp.block_shape
    assert bsp.macs() + p * q > limit or bsp.num_blocks == out_features * in_features // (p * q)
    blr = BlockLowRankLinear.from_dense(weight, budget)
    p, q = blr.block_shape
    n_blocks = (out_features // p) * (in_features // q)
    assert blr.macs() + n_blocks * (p + q) > limit or blr.rank == min(p, q)
    for nb in (2, 4):
        step = gblr.cost.monarch_cost(in_features, out_features, nb, 1)
        if step > limit:
            with pytest.raises(ValueError, match="budget"):
                MonarchLinear.from_dense(weight, budget, nblocks=nb)
            continue
        mon = MonarchLinear.from_dense(weight, budget, nblocks=nb)
        assert mon.nblocks == nb
        assert mon.macs() + step > limit or mon.rank == min(mon.block_in, mon.block_out)


def test_constructor_budget_chooses_hyperparameters():
    assert LowRankLinear(64, 64, budget=0.25).rank == 8
    assert BlockDiagLinear(64, 64, budget=0.25).nblocks == 4
    assert BlockSparseLinear(64, 64, (8, 8), budget=0.25).num_blocks == 16
    assert BlockLowRankLinear(64, 64, (16, 16), budget=0.25).rank == 2
    mon = MonarchLinear(64, 64, nblocks=8, budget=0.5)
    assert mon.rank == 2 and mon.macs() == 2 * 64 * 16


# -- projection optimality ---------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(40, 24), (37, 91)])
@pytest.mark.parametrize("budget", [0.1, 0.3, 0.6])
def test_lowrank_error_is_svd_tail(shape, budget):
    weight = _dense(*shape)
    layer = LowRankLinear.from_dense(weight, budget)
    s = torch.linalg.svdvals(weight)
    err = (layer.to_dense() - weight).norm() ** 2
    torch.testing.assert_close(err, s[layer.rank:].pow(2).sum())


@pytest.mark.parametrize("budget", [0.1, 0.25, 0.5])
def test_blocksparse_keeps_top_norm_blocks(budget):
    weight = _dense(24, 36)
    layer = BlockSparseLinear.from_dense(weight, budget, block_shape=(4, 6))
    norms = to_blocks(weight, 4, 6).norm(dim=(-2, -1))
    kept = layer.block_mask()
    assert int(kept.sum()) == layer.num_blocks == int(budget * 24 * 36 // 24)
    assert norms[kept].min() >= norms[~kept].max()
    torch.testing.assert_close(
        to_blocks(layer.to_dense(), 4, 6), to_blocks(weight, 4, 6) * kept[..., None, None]
    )


def test_blocksparse_explicit_mask_and_state_dict():
    mask = torch.tensor([[True, False, False], [False, True, True]])
    layer = BlockSparseLinear(12, 8, block_mask=mask)
    assert layer.block_shape == (4, 4) and layer.num_blocks == 3
    assert torch.equal(layer.block_mask(), mask)
    dense = to_blocks(layer.to_dense(), 4, 4)
    assert bool((dense[~mask] == 0).all())
    twin = BlockSparseLinear(12, 8, (4, 4), num_blocks=3)
    twin.load_state_dict(layer.state_dict())
    torch.testing.assert_close(twin.to_dense(), layer.to_dense())


@pytest.mark.parametrize("block_shape", [(4, 6), (8, 12), (24, 4)])
def test_blr_error_is_blockwise_svd_tail(block_shape):
    weight = _dense(24, 36)
    layer = BlockLowRankLinear.from_dense(weight, 0.6, block_shape=block_shape)
    s = torch.linalg.svdvals(to_blocks(weight, *block_shape))
    err = (layer.to_dense() - weight).norm() ** 2
    torch.testing.assert_close(err, s[..., layer.rank:].pow(2).sum())


def test_blockdiag_keeps_diagonal_blocks():
    weight = _dense(7, 10)
    layer = BlockDiagLinear.from_dense(weight, 0.6, nblocks=3)
    expected = torch.zeros_like(weight)
    for j, (r0, c0) in enumerate([(0, 0), (3, 4), (6, 8)]):
        expected[r0 : r0 + 3, c0 : c0 + 4] = weight[r0 : r0 + 3, c0 : c0 + 4]
        assert j < layer.nblocks
    torch.testing.assert_close(layer.to_dense(), expected)


@pytest.mark.parametrize(
    "n_in,n_out,nblocks,rank",
    [(16, 16, 4, 1), (64, 64, 8, 1), (12, 20, 2, 3), (20, 12, 4, 1), (10, 7, 3, 1), (37, 91, 6, 2)],
)
def test_monarch_recovers_an_exact_monarch_matrix(n_in, n_out, nblocks, rank):
    source = MonarchLinear(n_in, n_out, nblocks, rank, dtype=torch.float64)
    weight = source.to_dense()
    budget = source.macs() / (n_in * n_out)
    assert budget <= 1.0
    layer = MonarchLinear.from_dense(weight, budget, nblocks=nblocks, rank=rank)
    torch.testing.assert_close(layer.to_dense(), weight, atol=1e-10, rtol=0)
    assert layer.macs() == source.macs()


def test_monarch_error_is_blockwise_svd_tail_of_padded_weight():
    weight = _dense(37, 91)
    layer = MonarchLinear.from_dense(weight, 0.3, nblocks=4)
    nb, bo, bi = layer.nblocks, layer.block_out, layer.block_in
    padded = torch.zeros(nb * bo, nb * bi, dtype=weight.dtype)
    padded[:37, :91] = weight
    s = torch.linalg.svdvals(to_blocks(padded, bo, bi))
    err = (layer.to_dense() - weight).norm() ** 2
    torch.testing.assert_close(err, s[..., layer.rank:].pow(2).sum())


@pytest.mark.parametrize("n_in,n_out,nblocks,rank", [(16, 16, 4, 1), (10, 7, 3, 2), (12, 20, 2, 3)])
def test_monarch_is_two_block_diagonals_with_a_permutation(n_in, n_out, nblocks, rank):
    """W = L P R with R, L block-diagonal and P the stride permutation (Dao et al. 2022)."""
    layer = MonarchLinear(n_in, n_out, nblocks, rank, dtype=torch.float64)
    right = torch.block_diag(*layer.blkdiag1.unbind(0))  # (nb*nb*k, nb*bi)
    left = torch.block_diag(*layer.blkdiag2.unbind(0))  # (nb*bo, nb*nb*k)
    m = nblocks * nblocks * rank
    perm = torch.zeros(m, m, dtype=torch.float64)
    for j in range(nblocks):  # R's output j*(nb*k) + l*k + a feeds L's input l*(nb*k) + j*k + a
        for l in range(nblocks):
            for a in range(rank):
                perm[l * nblocks * rank + j * rank + a, j * nblocks * rank + l * rank + a] = 1.0
    full = left @ perm @ right
    torch.testing.assert_close(layer.to_dense(), full[:n_out, :n_in])
    # padded rows/columns of the factors are zero
    assert bool((full[n_out:] == 0).all()) and bool((full[:, n_in:] == 0).all())


def test_monarch_padding_gets_no_gradient():
    layer = MonarchLinear(10, 7, nblocks=3, rank=2)
    layer(torch.randn(5, 10)).sum().backward()
    pad1, pad2 = layer._paddings()
    assert bool((layer.blkdiag1.grad[pad1] == 0).all())
    assert bool((layer.blkdiag2.grad[pad2] == 0).all())


# -- exact representation as GBLR ----------------------------------------------------------------
@pytest.mark.parametrize("shape,budget", [((32, 48), 0.25), ((48, 32), 0.4), ((20, 20), 0.5)])
def test_gblr_from_low_rank_equals_lowrank(shape, budget):
    lr = LowRankLinear.from_dense(_dense(*shape), budget, bias=torch.randn(shape[0]).double())
    g = GBLRLinear.from_low_rank(lr.U, lr.V, bias=lr.bias).eval()
    torch.testing.assert_close(g.to_dense(), lr.to_dense())
    assert g.macs() == lr.macs()
    x = torch.randn(3, shape[1], dtype=torch.float64)
    torch.testing.assert_close(g(x), lr(x))


@pytest.mark.parametrize("block_shape,budget", [((4, 8), 0.25), ((8, 4), 0.5), ((16, 16), 0.35)])
def test_gblr_from_block_sparse_equals_blocksparse(block_shape, budget):
    weight = _dense(32, 48)
    bsp = BlockSparseLinear.from_dense(weight, budget, block_shape=block_shape)
    g = GBLRLinear.from_block_sparse(weight, bsp.block_mask(), bsp.block_shape).eval()
    torch.testing.assert_close(g.to_dense(), bsp.to_dense())
    assert g.macs() == bsp.macs()


@pytest.mark.parametrize("block_shape,budget", [((8, 8), 0.3), ((4, 12), 0.5), ((16, 24), 0.2)])
def test_gblr_from_block_low_rank_equals_blr(block_shape, budget):
    weight = _dense(32, 48)
    blr = BlockLowRankLinear.from_dense(weight, budget, block_shape=block_shape)
    g = GBLRLinear.from_block_low_rank(weight, blr.block_shape, blr.rank).eval()
    torch.testing.assert_close(g.to_dense(), blr.to_dense())
    assert g.macs() == blr.macs()


# -- dtypes ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(NAMES))
def test_from_dense_keeps_dtype_and_bias_false(name):
    weight = torch.randn(24, 32, dtype=torch.float64)
    layer = gblr.get_structure(name).from_dense(weight, 0.5)
    assert layer.bias is None
    assert all(p.dtype == torch.float64 for p in layer.parameters())
    x = torch.randn(2, 32, dtype=torch.float64)
    torch.testing.assert_close(layer(x), x @ layer.to_dense().T)


# -- bad input ---------------------------------------------------------------------------------
CTOR_ARGS = {
    "lowrank": {"rank": 2},
    "monarch": {"nblocks": 2},
    "blocksparse": {"block_shape": (2, 2), "num_blocks": 1},
    "blr": {"block_shape": (2, 2), "rank": 1},
    "blockdiag": {"nblocks": 2},
}


@pytest.mark.parametrize("name", sorted(NAMES))
def test_bad_sizes(name):
    cls = NAMES[name]
    with pytest.raises(ValueError, match="in_features"):
        cls(0, 8, **CTOR_ARGS[name])
    with pytest.raises(ValueError, match="out_features"):
        cls(8, -3, **CTOR_ARGS[name])
    with pytest.raises(TypeError, match="in_features"):
        cls(8.5, 8, **CTOR_ARGS[name])
    with pytest.raises(ValueError, match=r"\(\.\.\., 8\)"):
        cls(8, 8, **CTOR_ARGS[name])(torch.randn(3, 7))


@pytest.mark.parametrize("name", sorted(NAMES))
@pytest.mark.parametrize("budget", [0.0, -0.5, 1.5, float("nan"), float("inf")])
def test_bad_budget(name, budget):
    cls = NAMES[name]
    with pytest.raises(ValueError, match="budget"):
        cls.from_dense(torch.randn(8, 8), budget)
    with pytest.raises(ValueError, match="budget"):
        cls(8, 8, budget=budget)


@pytest.mark.parametrize("name", sorted(NAMES))
def test_budget_too_small(name):
    with pytest.raises(ValueError, match="budget"):
        NAMES[name].from_dense(torch.randn(64, 64), 1e-5)


@pytest.mark.parametrize("name", sorted(NAMES))
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_matrix(name, bad):
    weight = torch.randn(8, 8)
    weight[3, 2] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        NAMES[name].from_dense(weight, 0.5)


@pytest.mark.parametrize("name", sorted(NAMES))
def test_bad_matrix_and_bias(name):
    cls = NAMES[name]
    with pytest.raises(ValueError, match="2-D"):
        cls.from_dense(torch.randn(8), 0.5)
    with pytest.raises(TypeError, match="floating point"):
        cls.from_dense(torch.ones(8, 8, dtype=torch.long), 0.5)
    with pytest.raises(ValueError, match="bias"):
        cls.from_dense(torch.randn(8, 8), 0.5, bias=torch.randn(7))
    with pytest.raises(TypeError):
        cls.from_dense(torch.randn(8, 8), 0.5, no_such_option=3)
    with pytest.raises(TypeError):
        cls(8, 8, no_such_option=3, **CTOR_ARGS[name])


@pytest.mark.parametrize("cls", [BlockSparseLinear, BlockLowRankLinear])
def test_block_shapes_that_do_not_tile(cls):
    with pytest.raises(ValueError, match="block_shape"):
        cls.from_dense(torch.randn(12, 8), 0.5, block_shape=(5, 4))
    with pytest.raises(ValueError, match="block_shape"):
        cls.from_dense(torch.randn(12, 8), 0.5, block_shape=(4, 3))
    with pytest.raises(ValueError, match="block_shape"):
        cls(8, 12, (4, 4, 4), budget=0.5)
    with pytest.raises(ValueError, match=r"block_shape\[0\]"):
        cls(8, 12, (0, 4), budget=0.5)
    with pytest.raises(TypeError, match="block_shape"):
        cls(8, 12, "44", budget=0.5)


def test_structural_hyperparameter_errors():
    with pytest.raises(ValueError, match="rank or budget"):
        LowRankLinear(8, 8)
    with pytest.raises(ValueError, match="rank=9"):
        LowRankLinear(8, 12, rank=9)
    with pytest.raises(ValueError, match="over budget"):
        LowRankLinear(8, 8, rank=4, budget=0.5)
    with pytest.raises(ValueError, match="nblocks"):
        MonarchLinear(8, 8)
    with pytest.raises(ValueError, match="nblocks"):
        MonarchLinear(8, 8, nblocks=0)
    with pytest.raises(ValueError, match="nblocks=4"):
        MonarchLinear(5, 8, nblocks=4)  # blocks of 2 leave the 4th input block empty
    with pytest.raises(ValueError, match="rank=5"):
        MonarchLinear(8, 8, nblocks=2, rank=5)
    with pytest.raises(ValueError, match="budget"):
        MonarchLinear.from_dense(torch.randn(16, 16), 0.3, nblocks=4, rank=2)
    with pytest.raises(ValueError, match="nblocks"):
        BlockDiagLinear(8, 8)
    with pytest.raises(ValueError, match="over budget"):
        BlockDiagLinear(8, 8, nblocks=2, budget=0.25)
    with pytest.raises(ValueError, match="num_blocks"):
        BlockSparseLinear(8, 8, (4, 4), num_blocks=5)
    with pytest.raises(ValueError, match="num_blocks or block_mask"):
        BlockSparseLinear(8, 8, (4, 4), num_blocks=1, block_mask=torch.ones(2, 2, dtype=bool))
    with pytest.raises(ValueError, match="block_mask"):
        BlockSparseLinear(8, 8, (4, 4), block_mask=torch.zeros(2, 2, dtype=bool))
    with pytest.raises(ValueError, match="block_mask"):
        BlockSparseLinear(8, 8, (4, 4), block_mask=torch.ones(3, 2, dtype=bool))
    with pytest.raises(ValueError, match="rank=5"):
        BlockLowRankLinear(8, 8, (4, 4), rank=5)
    with pytest.raises(ValueError, match="rank or budget"):
        BlockLowRankLinear(8, 8, (4, 4))


def test_default_monarch_rank_follows_dao_et_al():
    # nblocks = sqrt(n): rank-1 blocks; nblocks = 4 on 768: factors of 4 square 192-blocks
    assert MonarchLinear(64, 64, nblocks=8).rank == 1
    layer = MonarchLinear(768, 768, nblocks=4, bias=False, device="meta")
    assert layer.rank == 48
    assert layer.macs() == (768 + 768) * 768 // 4
    assert math.isclose(layer.num_parameters(), 2 * 4 * 192 * 192)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("cls,n_in,n_out,kwargs", LAYERS, ids=LAYER_IDS)
def test_cuda_forward_and_projection(cls, n_in, n_out, kwargs):
    layer = cls(n_in, n_out, device="cuda", **kwargs)
    assert all(t.device.type == "cuda" for t in [*layer.parameters(), *layer.buffers()])
    x = torch.randn(4, 3, n_in, device="cuda")
    torch.testing.assert_close(layer(x), x @ layer.to_dense().T + layer.bias)
    weight = torch.randn(n_out, n_in, device="cuda")
    approx = cls.from_dense(weight, 0.5)
    assert approx.to_dense().device.type == "cuda"
    assert approx.macs() <= 0.5 * n_in * n_out
    cpu = cls.from_dense(weight.cpu(), 0.5)
    if cls is not BlockSparseLinear:  # equal norms may order differently across devices
        torch.testing.assert_close(approx.to_dense().cpu(), cpu.to_dense(), atol=1e-4, rtol=1e-4)


def test_meta_device_construction():
    for cls, n_in, n_out, kwargs in LAYERS:
        layer = cls(n_in, n_out, device="meta", **kwargs)
        assert layer.macs() > 0 and layer.num_parameters() > 0


# -- data-aware projection of the baselines ----------------------------------------------------
@pytest.mark.parametrize("name, n_in, n_out", [
    ("lowrank", 96, 64), ("monarch", 96, 64), ("monarch", 90, 70), ("blr", 96, 64),
])
def test_data_aware_from_dense_lowers_the_output_error(name, n_in, n_out):
    torch.manual_seed(0)
    x = torch.randn(2000, n_in) @ torch.randn(n_in, n_in) * 0.3 + 0.1 * torch.randn(2000, n_in)
    weight = torch.randn(n_out, n_in)
    moment = x.t() @ x / x.shape[0]
    cls = gblr.get_structure(name)
    # the same configuration (no search over it), projected plainly and data-aware
    fixed = {} if name == "lowrank" else {"search": False}
    plain = cls.from_dense(weight, 0.3, **fixed)
    aware = cls.from_dense(weight, 0.3, second_moment=moment, **fixed)
    assert aware.macs() == plain.macs()

    def err(layer):
        return float((x @ (layer.to_dense() - weight).t()).norm())

    assert err(aware) < err(plain)
    with pytest.raises(ValueError, match="second_moment"):
        cls.from_dense(weight, 0.3, second_moment=moment[:-1, :-1])


def test_data_aware_lowrank_matches_the_projection():
    from gblr.projection import Calibration, project

    torch.manual_seed(1)
    x, weight = torch.randn(500, 48), torch.randn(40, 48)
    layer = gblr.get_structure("lowrank").from_dense(weight, 0.4, second_moment=x.t() @ x / 500)
    ref, _ = project(weight, 0.4, structure="lowrank", calibration=Calibration.from_inputs(x),
                     progress=False)
    torch.testing.assert_close(layer.to_dense(), ref.to_dense(), atol=1e-5, rtol=1e-5)


# -- baselines at their best -------------------------------------------------------------------
def test_monarch_projection_finds_the_configuration_that_is_exact():
    """A matrix that is exactly Monarch with 4 blocks of rank 2: at its cost the projection
    must find it (the default configuration of that cost would not)."""
    torch.manual_seed(0)
    exact = gblr.MonarchLinear(64, 48, nblocks=4, rank=2)
    with torch.no_grad():
        exact.blkdiag1.normal_()
        exact.blkdiag2.normal_()
    w = exact.to_dense()
    budget = exact.macs() / (64 * 48)
    found = gblr.MonarchLinear.from_dense(w, budget)
    assert found.macs() <= exact.macs()
    err = float((found.to_dense() - w).norm() / w.norm())
    assert err < 1e-5
    default = gblr.MonarchLinear.from_dense(w, budget, search=False)
    assert float((default.to_dense() - w).norm() / w.norm()) > err


@pytest.mark.parametrize("name", ["monarch", "blr", "blocksparse"])
def test_search_is_never_worse_than_the_default_configuration(name):
    torch.manual_seed(1)
    u = torch.randn(96, 8) @ torch.randn(8, 128)
    w = u + 0.3 * torch.randn(96, 128)
    w[:32, :32] += 3.0 * torch.randn(32, 32)  # one strong block
    cls = gblr.get_structure(name)
    best = cls.from_dense(w, 0.3)
    default = cls.from_dense(w, 0.3, search=False)
    assert best.macs() <= 0.3 * w.numel() * (1 + 1e-9)

    def err(layer):
        return float((layer.to_dense() - w).norm() / w.norm())

    assert err(best) <= err(default) + 1e-12
