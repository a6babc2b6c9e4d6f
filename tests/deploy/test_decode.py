"""Packed layers at few tokens: the prepared per-thread views of a decode step (one token)
and of short inputs, their time model, and their exactness in every mode."""

from __future__ import annotations

import copy
import pickle
import threading

import pytest
import torch

from gblr import GBLRLinear, PackedGBLRLinear, load_packed, save_packed
from gblr.core.timemodel import OP_OVERHEAD_MACS, TIME_MODELS, VECTOR_TIME_MODELS, TimeModel
from gblr.deploy.executor import CHUNK_TOKENS, VIEW_TOKENS


def random_layer(n_in, n_out, k, seed=0, bias=True, dtype=torch.float64, wrap=False):
    torch.manual_seed(seed)
    layer = GBLRLinear(n_in, n_out, num_components=k, init="random", bias=bias).to(dtype)
    with torch.no_grad():
        layer.widths.uniform_(0.0, 1.0)
        layer.locations.uniform_(0.0, 1.0)
        if wrap:  # a few bands across the end of both axes
            layer.widths[:, :3] = 0.4
            layer.locations[:, :3] = 0.85
        if bias:
            layer.bias.normal_()
    return layer.eval()


def _one_buffer(plan) -> bool:
    """Whether a packing's weights are views of one allocation (a one-token packing's are)."""
    return len({w.untyped_storage().data_ptr() for w in plan.weights()}) == 1


def trained_layer():
    """A small layer fitted to a target while its widths shrink to 30% of dense cost."""
    from gblr.bench.shrink import shrink_to_budget, structured_target

    torch.manual_seed(0)
    weight = structured_target(72, 40, seed=3)
    with torch.enable_grad():
        layer = shrink_to_budget(weight, 0.3, shrink_steps=15, finetune_steps=3, probes=32)
    with torch.no_grad():
        layer.bias = torch.nn.Parameter(torch.randn(72))
    return layer.double().eval()


def block_layer(size):
    """Dense blocks of a block-sparse layer: 8x8 ones are GEMMs, 2x2 ones one sparse matrix."""
    torch.manual_seed(size)
    grid = torch.rand(24 // size, 40 // size) < 0.3
    grid[0, 0] = True
    w = torch.randn(24, 40, dtype=torch.float64)
    return GBLRLinear.from_block_sparse(w, grid, (size, size)).eval()


LAYERS = {
    "odd": lambda: random_layer(37, 53, 20),
    "odd-nobias": lambda: random_layer(53, 37, 20, seed=1, bias=False),
    "wrap": lambda: random_layer(41, 29, 12, seed=2, wrap=True),
    "tall": lambda: random_layer(9, 70, 6, seed=3),
    "blocks": lambda: block_layer(8),
    "sparse": lambda: block_layer(2),
}


def pack(layer, tokens, **kw):
    """The packed form, never the dense fallback (small random layers would take it)."""
    packed = PackedGBLRLinear.from_gblr(layer, tokens=tokens, allow_dense=False, **kw)
    assert not any(p.spec["full"] for p in packed.plans)
    return packed


def _check(packed, layer, tokens, mode):
    """Fresh inputs through ``packed`` (several calls, so scratch buffers are reused) match
    the masked layer; earlier outputs are not overwritten by later calls."""
    outs, refs = [], []
    for _ in range(3):
        x = torch.randn(tokens, layer.in_features, dtype=torch.float64)
        refs.append(layer(x).detach())
        with mode():
            outs.append(packed(x))
    for out, ref in zip(outs, refs, strict=True):
        assert torch.allclose(out, ref, atol=1e-10, rtol=0), (tokens, (out - ref).abs().max())


MODES = {"inference": torch.inference_mode, "no_grad": torch.no_grad,
         "grad": torch.enable_grad}


@pytest.mark.parametrize("name", sorted(LAYERS))
@pytest.mark.parametrize("mode", sorted(MODES))
def test_prepared_views_exact(name, mode):
    layer = LAYERS[name]()
    for tok in ((1,), (64,), (1, 64, 4096)):
        packed = pack(layer, tok)
        for t in (1, 2, 17, VIEW_TOKENS, VIEW_TOKENS + 1, 1, 17):  # the count changes
            _check(packed, layer, t, MODES[mode])


def test_trained_layer_exact_and_tuned(tmp_path):
    layer = trained_layer()
    assert layer.macs() < 0.45 * 40 * 72
    packed = pack(layer, (1, 64), tune=True)
    assert _one_buffer(packed.plans[0]) and not _one_buffer(packed.plans[1])
    for t in (1, 5, 64, CHUNK_TOKENS + 3):
        _check(packed, layer, t, torch.inference_mode)
    # a saved and reloaded packing runs the same steps
    save_packed(packed, tmp_path / "trained.safetensors")
    loaded = load_packed(tmp_path / "trained.safetensors")
    x = torch.randn(1, 40, dtype=torch.float64)
    with torch.inference_mode():
        assert torch.equal(loaded(x), packed(x))
        assert torch.equal(loaded(x[0]), packed(x)[0])  # a lone vector


def test_one_token_leading_shapes_and_bias():
    layer = random_layer(30, 44, 14, seed=5)
    packed = pack(layer, 1)
    for shape in [(30,), (1, 30), (1, 1, 30)]:
        x = torch.randn(*shape, dtype=torch.float64)
        with torch.inference_mode():
            out = packed(x)
        assert out.shape == (*shape[:-1], 44)
        assert torch.allclose(out, layer(x), atol=1e-10, rtol=0)
    x = torch.randn(1, 30, dtype=torch.float64)
    with torch.no_grad():
        layer.bias.zero_()
    assert torch.allclose(pack(layer, 1)(x), layer(x), atol=1e-10, rtol=0)


def test_bfloat16_one_token_and_dtype_change_after_use():
    layer = random_layer(64, 48, 20, seed=8, dtype=torch.float32)
    x = torch.randn(1, 64)
    ref = layer(x)
    packed = pack(layer, (1, 64))
    with torch.inference_mode():
        assert torch.allclose(packed(x), ref, atol=1e-5, rtol=1e-5)  # scratch in float32
        packed = packed.to(torch.bfloat16)  # new buffers: the prepared steps are rebuilt
        assert _one_buffer(packed.plans[0]) and packed.plans[0].w0.dtype == torch.bfloat16
        out = packed(x.bfloat16())
        many = packed(torch.randn(7, 64).bfloat16())
    assert out.dtype == many.dtype == torch.bfloat16
    assert (out.float() - ref).norm() / ref.norm() < 2e-2


def test_threads_do_not_share_scratch():
    layer = random_layer(96, 80, 30, seed=6)
    packed = pack(layer, (1, 16))
    errors: list[float] = []
    together = threading.Barrier(4)
    holding: list[tuple[int, int]] = []

    def work(seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        for i in range(40):
            x = torch.randn(1 if i % 2 else 16, 96, dtype=torch.float64, generator=g)
            with torch.inference_mode():
                out = packed(x)
            errors.append(float((out - layer(x).detach()).abs().max()))
        together.wait()  # all four alive: one set of buffers per thread
        holding.append((len(packed.plans[0]._scratch), len(packed.plans[1]._scratch)))
        together.wait()

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(errors) == 160 and max(errors) < 1e-10
    assert all(a >= 4 and b >= 4 for a, b in holding)
    # and the buffers of a thread end with it (changed: they used to stay with the plan)
    assert len(packed.plans[0]._scratch) == 0 and len(packed.plans[1]._scratch) == 0


def test_copy_and_pickle_after_use():
    layer = random_layer(20, 26, 8, seed=7)
    packed = pack(layer, (1, 8))
    x1, x8 = torch.randn(1, 20, dtype=torch.float64), torch.randn(8, 20, dtype=torch.float64)
    with torch.inference_mode():
        packed(x1), packed(x8)
    assert packed.plans[0]._scratch
    for other in (copy.deepcopy(packed), pickle.loads(pickle.dumps(packed))):
        assert not other.plans[0]._scratch
        plan = other.plans[0]  # one buffer still, and the GEMV operands are views of it
        assert _one_buffer(plan)
        assert {w.data_ptr() for *_, w, _ in plan._mv1} <= {w.data_ptr() for w in plan.weights()}
        with torch.inference_mode():
            assert torch.equal(other(x1), packed(x1)) and torch.equal(other(x8), packed(x8))


def test_inputs_that_require_grad_take_the_plain_path():
    layer = random_layer(20, 26, 8, seed=9)
    packed = pack(layer, 1)
    x = torch.randn(1, 20, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():  # no graph: prepared views are fine
        assert torch.allclose(packed(x), layer(x), atol=1e-10, rtol=0)
    with pytest.raises(RuntimeError):  # a packed layer is for inference: out= GEMMs refuse
        packed(x)
    with torch.no_grad():  # and the scratch left behind still works
        assert torch.allclose(packed(x), layer(x), atol=1e-10, rtol=0)


def test_one_token_time_model():
    layer = random_layer(300, 500, 60, seed=10)
    default = PackedGBLRLinear.from_gblr(layer, tokens=1)
    ovh, io = VECTOR_TIME_MODELS["cpu"]
    explicit = PackedGBLRLinear.from_gblr(layer, tokens=1, overhead=ovh, io=io)
    assert default.plans[0].spec == explicit.plans[0].spec
    old = PackedGBLRLinear.from_gblr(layer, tokens=1, overhead=OP_OVERHEAD_MACS,
                                     io=TIME_MODELS["cpu"][2])
    # cheaper calls: at least as many GEMVs, and no more MACs than the old model's plan
    assert default.num_gemms(1) >= old.num_gemms(1)
    assert default.macs(1) <= old.macs(1)
    # many tokens keep the GEMM model
    many = PackedGBLRLinear.from_gblr(layer, tokens=64)
    same = PackedGBLRLinear.from_gblr(layer, tokens=64, overhead=OP_OVERHEAD_MACS,
                                      io=TIME_MODELS["cpu"][2])
    assert many.plans[0].spec == same.plans[0].spec


def test_compile_takes_the_plain_path():
    layer = random_layer(24, 20, 10, seed=11, dtype=torch.float32)
    packed = pack(layer, (1, 8))
    compiled = torch.compile(packed, backend="eager", fullgraph=True)
    for t in (1, 8):
        x = torch.randn(t, 24)
        with torch.no_grad():
            assert torch.allclose(compiled(x), layer(x), atol=1e-5, rtol=1e-5)


def _plans(layer, overhead, merge):
    """Packings for 1 and 64 tokens from one grouping setting (see ``_stage_groups``)."""
    from gblr.deploy.bands import banded_factors
    from gblr.deploy.planner import _build_plan

    args = banded_factors(layer)
    return [_build_plan(*args, t, torch.float64, TimeModel(4, overhead, 1.0), True, merge,
                        False)
            for t in (1, 64)]


@pytest.mark.parametrize("bias", [True, False])
def test_zeroed_and_permuted_intermediates(bias):
    # three separate bands in one group: no GEMV starts the group's ranks (they are zeroed
    # first), and no stage-2 GEMV spans every output row (y starts from the bias)
    torch.manual_seed(0)
    apart = GBLRLinear(64, 48, num_components=3, init="random", bias=bias).double().eval()
    with torch.no_grad():
        apart.widths.fill_(0.25)
        apart.locations.copy_(torch.tensor([0.05, 0.55, 0.3]).expand(2, 3))
    # tight groups, ordered differently on the two stages: h is permuted between them
    scattered = random_layer(60, 45, 16, seed=0, bias=bias)
    for layer, merge, what in ((apart, None, "h_zero"), (scattered, "best", "perm")):
        plans = _plans(layer, 1.0, merge)
        if what == "h_zero":
            assert all(p._h_zero and not p._y_init for p in plans)
        else:
            assert plans[0].perm is not None
        b = None if layer.bias is None else layer.bias.detach()
        packed = PackedGBLRLinear(layer.in_features, layer.out_features, plans, b)
        for mode in (torch.inference_mode, torch.no_grad):
            for t in (1, 3, 1, 64, 3):
                _check(packed, layer, t, mode)
