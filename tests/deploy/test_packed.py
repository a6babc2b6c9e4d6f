"""Packed GBLR layers: exactness, grouping, whole-model deployment, save/load, benchmark."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import random_layer
from torch import nn

import gblr
from gblr import GBLRLinear, PackedGBLRLinear, deploy, load_packed, save_packed
from gblr.core.timemodel import TIME_MODELS, TimeModel
from gblr.deploy import cyclic_band, group_bands

TOKENS = (1, 64, 4096)


def check_exact(layer, tokens=TOKENS, shape=(5, 7), tol=1e-10):
    x = torch.randn(*shape, layer.in_features, dtype=layer.U.dtype)
    ref = layer.eval()(x)
    for t in tokens:
        packed = layer.packed(tokens=t)
        out = packed(x)
        assert out.shape == ref.shape
        assert torch.allclose(out, ref, atol=tol, rtol=0), (t, (out - ref).abs().max())
    return packed


@pytest.mark.parametrize(
    "n_in,n_out,k,r", [(37, 53, 20, 1), (64, 48, 12, 2), (100, 30, 30, 1), (7, 5, 9, 1)]
)
def test_random_layers_exact(n_in, n_out, k, r):
    check_exact(random_layer(n_in, n_out, k, r))


def test_wraparound_alloff_and_fullwidth_components():
    layer = random_layer(41, 29, 12, seed=1)
    with torch.no_grad():
        layer.widths[:, 0:3] = 1.0  # full width
        layer.widths[:, 3] = 0.0  # off
        layer.widths[0, 4] = 1.0 / 41  # one index wide on the input axis: off
        layer.widths[:, 5:8] = 0.5  # wrap-around bands on both axes
        layer.locations[:, 5:8] = 0.8
    m_in, m_out = layer.component_supports()
    assert m_in[5, 0] and m_in[5, -1] and m_out[6, 0] and m_out[6, -1]  # really wraps
    assert not m_in[3].any() and not m_in[4].any()
    check_exact(layer)
    for t in TOKENS:
        assert layer.packed(tokens=t).macs() >= layer.macs()


def test_all_off_layer_gives_bias():
    layer = random_layer(20, 30, 6)
    with torch.no_grad():
        layer.widths.zero_()
    packed = layer.packed()
    x = torch.randn(4, 20, dtype=torch.float64)
    assert packed.macs() == 0 and packed.num_gemms() == 0
    assert torch.equal(packed(x), layer.bias.expand(4, 30))
    no_bias = random_layer(20, 30, 6, bias=False)
    with torch.no_grad():
        no_bias.widths.zero_()
    assert torch.equal(no_bias.packed()(x), torch.zeros(4, 30, dtype=torch.float64))


def test_sigma_masks_are_folded_exactly():
    layer = random_layer(33, 40, 16, seed=2)
    layer.sigma = 4.0
    m_in, _ = layer.eval_masks()
    assert ((m_in > 0) & (m_in < 0.99)).any()  # really non-0/1 masks
    check_exact(layer)


def test_training_mode_unquantized_structure_uses_eval_structure():
    layer = random_layer(30, 26, 10, seed=3)
    with torch.no_grad():
        layer.widths.add_(0.0123)  # off the index grid
    layer.train()
    packed = layer.packed()
    assert layer.training  # left as it was
    x = torch.randn(6, 30, dtype=torch.float64)
    layer.eval()
    assert torch.allclose(packed(x), layer(x), atol=1e-10, rtol=0)


def test_block_sparse_becomes_dense_blocks_at_true_cost():
    torch.manual_seed(4)
    w = torch.randn(24, 32, dtype=torch.float64)
    grid = torch.tensor([[1, 0, 0, 1], [0, 1, 0, 0], [1, 0, 1, 0]], dtype=torch.bool)
    layer = GBLRLinear.from_block_sparse(w, grid, (8, 8)).eval()
    packed = PackedGBLRLinear.from_gblr(layer, tokens=4096, allow_dense=False)
    x = torch.randn(9, 32, dtype=torch.float64)
    assert torch.allclose(packed(x), layer(x), atol=1e-10, rtol=0)
    assert packed.macs() == layer.macs() == 5 * 64
    assert len(packed.plans[0].spec["dense"]) == 5


def test_tiny_blocks_go_to_one_sparse_matrix(tmp_path):
    torch.manual_seed(15)
    w = torch.randn(24, 40, dtype=torch.float64)
    grid = torch.rand(12, 20) < 0.2
    grid[0, 0] = True
    layer = GBLRLinear.from_block_sparse(w, grid, (2, 2)).eval()
    packed = check_exact(layer, tokens=(1, 4096))
    assert packed.plans[0].sp_val is not None and packed.plans[0].spec["dense"] == []
    assert packed.macs() == layer.macs() == int(grid.sum()) * 4
    assert packed.num_gemms() == 1
    save_packed(packed, tmp_path / "sparse.safetensors")
    x = torch.randn(3, 40, dtype=torch.float64)
    assert torch.equal(load_packed(tmp_path / "sparse.safetensors")(x), packed(x))
    with torch.inference_mode():
        out = layer.float().packed(dtype=torch.bfloat16)(x.bfloat16())
    assert (out.double() - layer.double()(x)).norm() / layer(x).norm() < 2e-2


def test_low_rank_is_one_gemm_pair():
    torch.manual_seed(5)
    u, v = torch.randn(50, 6, dtype=torch.float64), torch.randn(6, 70, dtype=torch.float64)
    layer = GBLRLinear.from_low_rank(u, v, bias=torch.randn(50, dtype=torch.float64)).eval()
    for t in TOKENS:
        packed = PackedGBLRLinear.from_gblr(layer, tokens=t, allow_dense=False)
        assert packed.num_gemms() == 2 and packed.macs() == layer.macs() == 6 * 120
    # a decode step of so small a layer is modelled faster as its dense matrix: one GEMM
    assert layer.packed(tokens=1).num_gemms() == 1 and layer.packed(tokens=1).macs() == 3500
    check_exact(layer)


def test_from_dense_svd_layer_packs_to_its_rank():
    torch.manual_seed(6)
    w = torch.randn(40, 60)
    layer = GBLRLinear.from_dense(w, 0.4).eval()
    packed = PackedGBLRLinear.from_gblr(layer, tokens=4096, allow_dense=False)
    assert packed.macs() == layer.macs()
    x = torch.randn(3, 60)
    assert torch.allclose(packed(x), layer(x), atol=1e-5, rtol=1e-5)


def test_leading_shapes_and_bad_input():
    layer = random_layer(12, 9, 5)
    packed = layer.packed()
    for shape in [(12,), (3, 12), (2, 3, 4, 12), (0, 12)]:
        x = torch.randn(*shape, dtype=torch.float64)
        out = packed(x)
        assert out.shape == shape[:-1] + (9,)
        assert torch.allclose(out, layer(x), atol=1e-10, rtol=0)
    with pytest.raises(ValueError, match="in_features|expects"):
        packed(torch.randn(3, 11, dtype=torch.float64))
    with pytest.raises(ValueError, match="tokens"):
        layer.packed(tokens=0)
    with pytest.raises(TypeError, match="GBLRLinear"):
        PackedGBLRLinear.from_gblr(nn.Linear(3, 4))


def test_multiple_packings_chosen_by_token_count():
    layer = random_layer(96, 80, 40, seed=7)
    packed = layer.packed(tokens=(1, 4096))
    assert len(packed.plans) == 2
    assert packed.plan_for(1) is packed.plans[0] and packed.plan_for(4096) is packed.plans[1]
    # decode packing uses fewer, larger GEMMs than the long-prompt packing
    assert packed.num_gemms(1) <= packed.num_gemms(4096)
    # (the long-prompt packing may compute more: its stage-1 ranks are padded to 16s)
    assert packed.macs(1) >= layer.macs() and packed.macs(4096) >= layer.macs()
    for t in (1, 3, 100, 5000):
        x = torch.randn(t, 96, dtype=torch.float64)
        assert torch.allclose(packed(x), layer(x), atol=1e-10, rtol=0)


def test_bfloat16_and_inference_mode():
    layer = random_layer(64, 48, 20, seed=8, dtype=torch.float32)
    packed = layer.packed(dtype=torch.bfloat16)
    assert packed.plans[0].w0.dtype == torch.bfloat16
    x = torch.randn(10, 64)
    with torch.inference_mode():
        out = packed(x.bfloat16())
        ref = layer(x)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).norm() / ref.norm() < 2e-2
    with torch.autocast("cpu", dtype=torch.bfloat16):  # and a float32 packing under autocast
        auto = layer.packed(tokens=4096)(x)
    assert (auto.float() - ref).norm() / ref.norm() < 2e-2
    # a float32 packing converted with .to(bfloat16) works as well
    p32 = layer.packed().to(torch.bfloat16)
    with torch.inference_mode():
        assert torch.allclose(p32(x.bfloat16()).float(), out.float(), atol=5e-2, rtol=5e-2)


def test_torch_compile():
    layer = random_layer(24, 20, 10, seed=9, dtype=torch.float32)
    packed = layer.packed(tokens=(1, 64))
    compiled = torch.compile(packed, backend="eager", fullgraph=True)
    for t in (1, 64):
        x = torch.randn(t, 24)
        assert torch.allclose(compiled(x), layer(x), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_torch_compile_inductor():
    layer = random_layer(48, 40, 20, seed=10, dtype=torch.float32)
    packed = layer.packed(tokens=64)
    compiled = torch.compile(packed)
    x = torch.randn(64, 48)
    with torch.inference_mode():
        assert torch.allclose(compiled(x), layer(x), atol=1e-5, rtol=1e-5)


def test_cyclic_band():
    assert cyclic_band(np.zeros(5, bool)) == (0, 0)
    assert cyclic_band(np.ones(5, bool)) == (0, 5)
    assert cyclic_band(np.array([0, 1, 1, 0, 0], bool)) == (1, 2)
    assert cyclic_band(np.array([1, 0, 0, 1, 1], bool)) == (3, 3)  # wraps
    assert cyclic_band(np.array([1, 0, 1, 0, 0, 0], bool)) == (0, 3)  # inner zero kept


def test_group_bands_follows_the_cost_model():
    starts, lengths, ranks = [0, 10, 50, 52], [5, 5, 10, 10], [1, 1, 1, 1]
    free = group_bands(starts, lengths, ranks, 100, tokens=4096, overhead=0.0, io=0.0)
    assert sorted(m for g in free for m in g[2]) == [0, 1, 2, 3]
    assert len(free) == 4  # no overhead: no padding is worth it
    one = group_bands(starts, lengths, ranks, 100, tokens=1, overhead=1e9)
    assert len(one) == 1 and one[0][1] == 62  # huge overhead: one GEMM over the union
    wrap = group_bands([95, 2], [10, 5], [1, 1], 100, tokens=1, overhead=1e9)
    assert wrap == [(95, 12, [0, 1])]


def nested_layer(n_in=800, n_out=600, k=40, seed=20, wrap=False):
    """Rank-1 components on nested bands around a common centre (like trained layers):
    one union GEMM per group wastes MACs that segmenting the band saves."""
    torch.manual_seed(seed)
    layer = GBLRLinear(n_in, n_out, num_components=k, init="random", bias=True).double()
    with torch.no_grad():
        layer.widths.copy_(torch.linspace(0.05, 0.95, k).expand(2, k))
        layer.locations.fill_(0.9 if wrap else 0.5)  # centred at 0.9: bands wrap
        layer.locations.sub_(layer.widths / 2)
        layer.bias.normal_()
    return layer.eval()


@pytest.mark.parametrize("wrap", [False, True])
def test_segmented_bands_exact_and_cheaper(wrap):
    from gblr.deploy.packed import PackedGBLRLinear

    layer = nested_layer(wrap=wrap)
    m_in, m_out = layer.component_supports()
    if wrap:
        assert m_in[-1, 0] and m_in[-1, -1] and m_out[-1, 0] and m_out[-1, -1]
    x = torch.randn(70, 800, dtype=torch.float64)
    ref = layer(x)
    macs = {}
    for split, merge in [(True, "best"), (True, None), (True, 1.0), (False, 1.0), (False, None)]:
        for t in (1, 64, 4096):
            packed = PackedGBLRLinear.from_gblr(layer, tokens=t)
            plan = _plan(layer, t, split, merge)
            packed.plans[0] = plan
            assert torch.allclose(packed(x), ref, atol=1e-10, rtol=0), (split, merge, t)
            assert plan.macs >= layer.macs()
            macs[split, merge, t] = plan.macs
    # one group over all nested bands: segmenting it saves most of the union's waste
    assert macs[True, None, 4096] < 0.75 * macs[False, None, 4096]
    for t in (1, 64, 4096):
        assert macs[True, None, t] <= macs[False, None, t]
        assert macs[True, 1.0, t] <= macs[False, 1.0, t]


def _plan(layer, tokens, split, merge):
    """One packing of ``layer`` with the given segmenting and merging (see _stage_groups)."""
    from gblr.deploy.bands import banded_factors
    from gblr.deploy.planner import _build_plan

    model = TimeModel(*TIME_MODELS["cpu"])
    return _build_plan(*banded_factors(layer), tokens, torch.float64, model, split, merge)


def test_one_token_runs_as_matrix_vector_products_exactly():
    torch.manual_seed(23)
    blocks = GBLRLinear.from_block_sparse(
        torch.randn(24, 32, dtype=torch.float64),
        torch.tensor([[1, 0, 0, 1], [0, 1, 0, 0], [1, 0, 1, 0]], dtype=torch.bool), (8, 8),
    ).eval()
    layers = [random_layer(37, 53, 20), random_layer(30, 41, 9, bias=False, seed=3),
              nested_layer(wrap=True), blocks]
    for layer in layers:
        for t in TOKENS:  # every packing, also one tuned for many tokens, at one token
            packed = layer.packed(tokens=t)
            x = torch.randn(1, layer.in_features, dtype=torch.float64)
            assert torch.allclose(packed(x), layer(x), atol=1e-10, rtol=0), t
            assert torch.allclose(packed(x[0]), layer(x[0]), atol=1e-10, rtol=0), t
    layer = random_layer(64, 48, 20, seed=8, dtype=torch.float32)
    x = torch.randn(1, 64)
    with torch.inference_mode():
        out = layer.packed(tokens=1, dtype=torch.bfloat16)(x.bfloat16())
    assert out.dtype == torch.bfloat16
    assert (out.float() - layer(x)).norm() / layer(x).norm() < 2e-2


def test_dense_fallback_is_one_linear_exact_and_saved(tmp_path):
    layer = random_layer(20, 14, 12, seed=24)  # tiny, scattered bands: dense is faster
    packed = layer.packed(tokens=(1, 4096))
    assert all(p.spec["full"] for p in packed.plans) and packed.num_gemms(1) == 1
    assert packed.macs() == 20 * 14 and packed.true_macs == layer.macs()
    assert torch.allclose(packed.to_dense(), layer.to_dense(), atol=1e-12, rtol=0)
    for shape in [(20,), (1, 20), (3, 700, 20)]:
        x = torch.randn(*shape, dtype=torch.float64)
        assert torch.allclose(packed(x), layer(x), atol=1e-10, rtol=0), shape
    save_packed(packed, tmp_path / "full.safetensors")
    x = torch.randn(5, 20, dtype=torch.float64)
    assert torch.allclose(load_packed(tmp_path / "full.safetensors")(x), layer(x), atol=1e-10)
    kept = PackedGBLRLinear.from_gblr(layer, tokens=1, allow_dense=False)
    assert not kept.plans[0].spec["full"] and kept.num_gemms() > 1
    assert torch.allclose(kept(x), layer(x), atol=1e-10, rtol=0)


def test_long_inputs_run_in_chunks_exactly():
    from gblr.deploy.executor import CHUNK_TOKENS

    layer = random_layer(45, 38, 16, seed=21)
    packed = layer.packed(tokens=4096)
    for t in (CHUNK_TOKENS, CHUNK_TOKENS + 1, 2 * CHUNK_TOKENS + 37):
        x = torch.randn(t, 45, dtype=torch.float64)
        assert torch.allclose(packed(x), layer(x), atol=1e-10, rtol=0), t
    nobias = random_layer(45, 38, 16, seed=22, bias=False)
    x = torch.randn(3, CHUNK_TOKENS, 45, dtype=torch.float64)
    assert torch.allclose(nobias.packed(tokens=4096)(x), nobias(x), atol=1e-10, rtol=0)


def test_tune_times_candidates_and_stays_exact(tmp_path):
    layer = nested_layer(wrap=True)
    packed = layer.packed(tokens=(1, 600), tune=True)
    assert len(packed.plans) == 2
    for t in (1, 5, 600, 1300):
        x = torch.randn(t, 800, dtype=torch.float64)
        assert torch.allclose(packed(x), layer(x), atol=1e-10, rtol=0), t
    save_packed(packed, tmp_path / "tuned.safetensors")
    x = torch.randn(9, 800, dtype=torch.float64)
    loaded = load_packed(tmp_path / "tuned.safetensors")
    assert [p.spec for p in loaded.plans] == json.loads(json.dumps([p.spec for p in packed.plans]))
    assert torch.allclose(loaded(x), packed(x), atol=1e-12, rtol=0)  # same GEMMs, same weights


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = random_layer(16, 24, 8, seed=11, dtype=torch.float32)
        self.act = nn.GELU()
        self.block = nn.Sequential(random_layer(24, 16, 8, seed=12, dtype=torch.float32),
                                   nn.Linear(16, 8))

    def forward(self, x):
        return self.block(self.act(self.a(x)))


def test_deploy_model_in_place_and_report():
    model = Tiny()
    x = torch.randn(2, 5, 16)
    ref = model(x)
    report = deploy(model)
    assert isinstance(model.a, PackedGBLRLinear) and isinstance(model.block[0], PackedGBLRLinear)
    assert isinstance(model.block[1], nn.Linear)  # not structured: left alone
    assert [r.name for r in report.layers] == ["a", "block.0"]
    assert report.true_macs <= report.packed_macs
    assert "total" in str(report)
    assert torch.allclose(model(x), ref, atol=1e-5, rtol=1e-5)
    assert deploy(model).layers == []  # nothing left to pack
    tuned = Tiny()
    deploy(tuned, tokens=(1, 10), tune=True)  # candidate packings timed, fastest kept
    assert isinstance(tuned.a, PackedGBLRLinear) and len(tuned.a.plans) == 2
    assert torch.allclose(tuned(x), Tiny()(x), atol=1e-5, rtol=1e-5)
    conv_model = nn.Sequential(gblr.GBLRConv2d(3, 4, 3).eval(), nn.Flatten())
    x_img = torch.randn(1, 3, 6, 6)
    ref_img = conv_model(x_img)
    conv_report = deploy(conv_model)
    assert conv_report.layers == [] and conv_report.skipped == ["0"]
    assert torch.equal(conv_model(x_img), ref_img)
    with pytest.raises(TypeError, match="packed"):
        deploy(random_layer(4, 4, 2))
    assert gblr.deploy is deploy


def test_save_load_layer_and_model(tmp_path):
    layer = random_layer(30, 20, 10, seed=13, dtype=torch.float32)
    packed = layer.packed(tokens=(1, 64))
    save_packed(packed, tmp_path / "layer.safetensors")
    loaded = load_packed(tmp_path / "layer.safetensors")
    x = torch.randn(3, 30)
    assert torch.equal(loaded(x), packed(x))
    assert loaded.true_macs == layer.macs() and len(loaded.plans) == 2

    model = Tiny()
    x = torch.randn(4, 16)
    deploy(model)
    ref = model(x)
    save_packed(model, tmp_path / "model.safetensors")
    template = nn.Module()  # the architecture with plain Linear layers in the GBLR slots
    template.a, template.act = nn.Linear(16, 24), nn.GELU()
    template.block = nn.Sequential(nn.Linear(24, 16), model.block[1])
    template.forward = lambda inp: template.block(template.act(template.a(inp)))
    load_packed(tmp_path / "model.safetensors", template)
    assert isinstance(template.a, PackedGBLRLinear)
    assert torch.allclose(template.forward(x), ref, atol=1e-6, rtol=1e-6)

    wrong = nn.Module()
    wrong.a = nn.Linear(16, 25)
    with pytest.raises(ValueError, match="16->24.*16->25"):
        load_packed(tmp_path / "model.safetensors", wrong)
    with pytest.raises(ValueError, match="pass the model"):
        load_packed(tmp_path / "model.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a packed GBLR file"):
        load_packed(tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="no PackedGBLRLinear"):
        save_packed(nn.Linear(2, 2), tmp_path / "none.safetensors")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_packed_matches_masked_layer():
    layer = random_layer(96, 160, 40, seed=14, dtype=torch.float32).cuda()
    x = torch.randn(2, 33, 96, device="cuda")
    ref = layer(x)
    mem, ovh, io = TIME_MODELS["cpu"]
    for t in TOKENS:
        # the CUDA time model keeps this small layer one dense GEMM; the CPU one groups it
        for kw in ({}, {"memory_tokens": mem, "overhead": ovh, "io": io}):
            packed = PackedGBLRLinear.from_gblr(layer, tokens=t, **kw)
            assert packed.plans[0].w0.is_cuda
            assert torch.allclose(packed(x), ref, atol=1e-4, rtol=1e-4)
    with torch.inference_mode():
        out = layer.packed(dtype=torch.bfloat16)(x.bfloat16())
    assert (out.float() - ref).norm() / ref.norm() < 2e-2


def projected_with_sparse_blocks() -> GBLRLinear:
    """A projected layer whose many-token packing gathers tiny blocks into a sparse matrix."""
    torch.manual_seed(0)
    return GBLRLinear.from_dense(torch.randn(192, 64), 0.3)


def test_projected_layer_packs_tiny_blocks_as_sparse():
    layer = projected_with_sparse_blocks()
    packed = PackedGBLRLinear.from_gblr(layer, tokens=(1, 4096), allow_dense=False)
    assert packed.plans[-1].sp_val is not None
    x = torch.randn(300, 64)
    assert torch.allclose(packed(x), layer(x), atol=1e-4, rtol=1e-4)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_packed_projected_layer_with_sparse_blocks():
    layer = projected_with_sparse_blocks().cuda()
    x = torch.randn(300, 64, device="cuda")
    ref = layer(x)
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2)):
        packed = PackedGBLRLinear.from_gblr(layer, tokens=(1, 4096), dtype=dtype,
                                            allow_dense=False)
        assert packed.plans[-1].sp_val is not None and packed.plans[-1].sp_val.is_cuda
        out = packed(x.to(dtype)).float()
        assert (out - ref).norm() / ref.norm() < tol
    tuned = layer.packed(tokens=(1, 64, 4096), tune=True)
    assert torch.allclose(tuned(x), ref, atol=1e-4, rtol=1e-4)


def test_deploy_without_gblr_layers_says_so():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), gblr.LowRankLinear(8, 8, rank=2))
    with pytest.warns(UserWarning, match="no GBLRLinear layer.*LowRankLinear"):
        report = gblr.deploy(model)
    assert report.layers == [] and report.skipped == ["1"]
    with pytest.warns(UserWarning, match="compress or train it with GBLR layers first"):
        gblr.deploy(torch.nn.Sequential(torch.nn.Linear(4, 4)))
