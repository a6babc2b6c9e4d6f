"""The fused masked factors agree with the operations they replace, in values and first
derivatives (reverse and forward mode)."""

import pytest
import torch

from gblr.core.boxes import INPUT_AXIS, OUTPUT_AXIS
from gblr.layers import GBLRLinear
from gblr.ops.factors import grid_masked_factors
from gblr.ops.gaudi import gaudi_mask, round_to_grid


def reference(u, v, widths, locations, sigma, rank):
    """The masked factors written out in autograd operations, as the layer builds them."""
    masks = {}
    for axis, n in ((INPUT_AXIS, v.shape[1]), (OUTPUT_AXIS, u.shape[0])):
        w = round_to_grid(widths[axis].clamp(0.0, 1.0), n)
        loc = round_to_grid(torch.remainder(locations[axis], 1.0), n)
        mask = gaudi_mask(w, loc, n, sigma, check=False, on_grid=True)
        masks[axis] = mask.repeat_interleave(rank, dim=0)
    return u * masks[OUTPUT_AXIS].t().to(u.dtype), v * masks[INPUT_AXIS].to(v.dtype)


def inputs(dtype, rank, k=7, n_in=24, n_out=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(n_out, k * rank, generator=g, dtype=dtype)
    v = torch.randn(k * rank, n_in, generator=g, dtype=dtype)
    # widths outside [0, 1] (clamped, no gradient there) and locations to wrap
    widths = torch.rand(2, k, generator=g, dtype=dtype) * 1.3 - 0.15
    locations = torch.rand(2, k, generator=g, dtype=dtype) * 3.0 - 1.0
    return [t.requires_grad_() for t in (u, v, widths, locations)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rank", [1, 3])
@pytest.mark.parametrize("sigma", [None, 1.0, 12.0])
def test_values_and_gradients(dtype, rank, sigma):
    args = inputs(dtype, rank)
    got = grid_masked_factors(*args, sigma, rank)
    want = reference(*args, sigma, rank)
    tol = {"atol": 1e-6, "rtol": 1e-5} if dtype == torch.float32 else {}
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, **tol)
    gen = torch.Generator().manual_seed(1)
    cotangents = [torch.randn(t.shape, generator=gen, dtype=dtype) for t in got]
    grads = torch.autograd.grad(got, args, cotangents)
    wants = torch.autograd.grad(want, args, cotangents)
    for g, w in zip(grads, wants, strict=True):
        torch.testing.assert_close(g, w, **tol)


@pytest.mark.parametrize("factor_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("structure_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sigma", [None, 2.0])
def test_low_precision_matches_the_operations_it_replaces(factor_dtype, structure_dtype,
                                                          sigma):
    """Factors in half precision with rank > 1 (the rank's rows are summed in the mask
    dtype), and widths in bfloat16 on an axis whose length bfloat16 cannot hold (257)."""
    u, v, widths, locations = [t.detach() for t in inputs(torch.float32, 4, n_in=257)]
    args = [u.to(factor_dtype), v.to(factor_dtype), widths.to(structure_dtype),
            locations.to(structure_dtype)]
    args = [t.requires_grad_() for t in args]
    got = grid_masked_factors(*args, sigma, 4)
    want = reference(*args, sigma, 4)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)
    cotangents = [torch.full_like(t, 3.0) for t in got]
    for g, w in zip(torch.autograd.grad(got, args, cotangents),
                    torch.autograd.grad(want, args, cotangents), strict=True):
        assert torch.equal(g, w)


def test_clamped_width_gets_zero_gradient_even_from_an_infinite_cotangent():
    u, v, widths, locations = inputs(torch.float64, 1)
    with torch.no_grad():
        widths[INPUT_AXIS, 0] = 1.2  # clamped to 1: no gradient
    u_m, v_m = grid_masked_factors(u, v, widths, locations, None, 1)
    want = reference(u, v, widths, locations, None, 1)
    cot = torch.zeros_like(v_m)
    cot[0, 0] = float("inf")
    got_w = torch.autograd.grad(v_m, widths, cot)[0]
    want_w = torch.autograd.grad(want[1], widths, cot)[0]
    assert got_w[INPUT_AXIS, 0] == 0
    torch.testing.assert_close(got_w, want_w, equal_nan=True)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit, in torch's forward AD
@pytest.mark.parametrize("sigma", [None, 4.0])
def test_forward_mode(sigma):
    args = tuple(t.detach() for t in inputs(torch.float64, 2))
    gen = torch.Generator().manual_seed(2)
    tangents = tuple(torch.randn(t.shape, generator=gen, dtype=t.dtype) for t in args)
    _, got = torch.func.jvp(lambda *a: grid_masked_factors(*a, sigma, 2), args, tangents)
    _, want = torch.func.jvp(lambda *a: reference(*a, sigma, 2), args, tangents)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)


def test_vmap_and_grad_transforms():
    u, v, widths, locations = [t.detach() for t in inputs(torch.float64, 1)]
    batch = torch.stack([u, 2.0 * u])

    def loss(fn, uu, w):
        u_m, v_m = fn(uu, v, w, locations, 3.0, 1)
        return (u_m @ v_m).square().sum()

    got = torch.func.vmap(torch.func.grad(lambda uu, w: loss(grid_masked_factors, uu, w),
                                          argnums=(0, 1)), in_dims=(0, None))(batch, widths)
    want = torch.func.vmap(torch.func.grad(lambda uu, w: loss(reference, uu, w),
                                           argnums=(0, 1)), in_dims=(0, None))(batch, widths)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)


def test_nan_width_gives_nan_rows():
    u, v, widths, locations = [t.detach() for t in inputs(torch.float32, 1)]
    widths[INPUT_AXIS, 2] = float("nan")
    _, v_m = grid_masked_factors(u, v, widths, locations, None, 1)
    assert torch.isnan(v_m[2]).all() and not torch.isnan(v_m[[0, 1, 3]]).any()


@pytest.mark.parametrize("sigma", [None, 2.0])
def test_layer_training_matches_separate_masks(sigma):
    """The layer's training forward (fused, live components only) and backward equal those
    of its masks built separately."""
    torch.manual_seed(0)
    layer = GBLRLinear(20, 30, num_components=9, rank_per_component=2)
    with torch.no_grad():
        layer.widths[:, :3] = 0.0  # dropped (empty or inactive) components
        layer.widths[:, 3:].uniform_(0.2, 0.9)
    layer.sigma = sigma
    layer.train()
    x = torch.randn(5, 20)
    params = [layer.U, layer.V, layer.widths, layer.locations]
    got = layer(x)
    grads = torch.autograd.grad(got.square().sum(), params)
    u_m, v_m = layer.masked_factors()  # all components, separate masks
    want = torch.nn.functional.linear(x, u_m @ v_m, layer.bias)
    wants = torch.autograd.grad(want.square().sum(), params)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for g, w in zip(grads, wants, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
