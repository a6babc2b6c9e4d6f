import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gblr import GBLRLinear
from gblr.cost import grouped_component_cost


def make(n_in=12, n_out=10, **kw):
    torch.manual_seed(0)
    kw.setdefault("dtype", torch.float64)
    return GBLRLinear(n_in, n_out, **kw)


def set_boxes(layer, widths, locations):
    with torch.no_grad():
        layer.widths.copy_(torch.as_tensor(widths, dtype=layer.widths.dtype))
        layer.locations.copy_(torch.as_tensor(locations, dtype=layer.locations.dtype))


def box(n, start, length):
    m = torch.zeros(n, dtype=torch.float64)
    m[[(start + i) % n for i in range(length)]] = 1.0
    return m


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("sigma", [None, 3.0])
def test_paths_agree(training, sigma):
    layer = make(sigma=sigma).train(training)
    set_boxes(layer, torch.rand(2, layer.num_components), torch.rand(2, layer.num_components))
    x = torch.randn(7, 12, dtype=torch.float64)
    outs = {}
    for path in ("dense", "lowrank"):
        layer.path = path
        outs[path] = layer(x)
    torch.testing.assert_close(outs["dense"], outs["lowrank"])
    torch.testing.assert_close(outs["dense"], x @ layer.to_dense().t() + layer.bias)


def test_layer_applies_the_sum_of_masked_components():
    layer = make(8, 6, num_components=2)
    # component 0: columns 2..5 (4 of 8), rows 3..5 (3 of 6); component 1: full width
    set_boxes(layer, [[0.5, 1.0], [0.5, 1.0]], [[0.25, 0.0], [0.5, 0.0]])
    u, v = layer.U.detach(), layer.V.detach()
    expected = torch.outer(box(6, 3, 3) * u[:, 0], box(8, 2, 4) * v[0]) + torch.outer(u[:, 1], v[1])
    torch.testing.assert_close(layer.to_dense(), expected)
    layer.eval()
    torch.testing.assert_close(layer.to_dense(), expected)


def test_component_one_index_wide_is_off_in_eval_and_sharp_training():
    layer = make(8, 6, num_components=3)
    # component 2 is one column wide: off in evaluation and, with sharp masks, in training too
    set_boxes(layer, [[1.0, 0.5, 1 / 8], [1.0, 0.5, 0.5]], torch.zeros(2, 3))
    x = torch.randn(4, 8, dtype=torch.float64)
    y_train = layer.train()(x)
    y_eval = layer.eval()(x)
    torch.testing.assert_close(y_train, y_eval)
    assert layer.active_components().tolist() == [True, True, False]
    layer.train()(x).sum().backward()
    assert layer.U.grad[:, 2].abs().sum() == 0 and layer.U.grad[:, 0].abs().sum() > 0
    # with a low-pass (annealing) the narrow component still takes part in training
    layer.U.grad = None
    layer.sigma = 4.0
    layer.train()(x).sum().backward()
    assert layer.U.grad[:, 2].abs().sum() > 0


def test_flops_hand_computed():
    layer = make(8, 6, num_components=2)
    set_boxes(layer, [[0.5, 1.0], [0.5, 1.0]], [[0.25, 0.0], [0.5, 0.0]])
    # min(1*(4+3), 4*3) + min(1*(8+6), 8*6)
    assert layer.macs() == 7 + 14
    set_boxes(layer, [[0.25, 1.0], [2 / 6, 1.0]], [[0.0, 0.0], [0.0, 0.0]])
    # component 0: 2 columns x 2 rows -> min(1*4, 4) = 4
    assert layer.macs() == 4 + 14


def test_flops_off_components_cost_nothing():
    layer = make(8, 6, num_components=3)
    set_boxes(layer, [[1.0, 0.0, 1 / 8], [1.0, 1.0, 1.0]], torch.zeros(2, 3))
    assert layer.active_components().tolist() == [True, False, False]
    assert layer.macs() == 8 + 6
    set_boxes(layer, torch.zeros(2, 3), torch.zeros(2, 3))
    assert layer.macs() == 0
    layer.eval()
    assert torch.count_nonzero(layer(torch.randn(2, 8, dtype=torch.float64)) - layer.bias) == 0


def test_identical_boxes_are_costed_as_one_block():
    layer = make(8, 6, num_components=3)
    same = [[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]]
    set_boxes(layer, same, torch.zeros(2, 3))
    # one 3x4 block of rank 3: min(3*(4+3), 12) = 12, not 3 * 7
    assert layer.macs() == 12
    set_boxes(layer, same, [[0.0, 0.5, 0.0], [0.0, 0.0, 0.0]])
    # two distinct boxes: components 0 and 2 share one (rank 2), component 1 alone
    assert layer.macs() == min(2 * 7, 12) + 7


def test_sharp_macs_of_layers_equal_each_layers_own():
    from gblr.layers.gblr import sharp_macs_of

    torch.manual_seed(0)
    layers = [make(8, 6, num_components=3), make(6, 8, num_components=3, rank_per_component=2),
              make(8, 6, num_components=3)]
    for layer in layers:
        with torch.no_grad():
            layer.widths.uniform_(0.2, 1.0)
    with torch.no_grad():  # the same boxes in two layers are two blocks, one per layer
        layers[2].widths.copy_(layers[0].widths)
        layers[2].locations.copy_(layers[0].locations)
    costs = sharp_macs_of(layers)
    assert costs == [layer.sharp_macs() for layer in layers]
    assert costs[0] == costs[2] > 0


def test_flops_follow_in_place_width_updates():
    layer = make(8, 6, num_components=2)
    set_boxes(layer, torch.ones(2, 2), torch.zeros(2, 2))
    assert layer.macs() == min(2 * 14, 48)
    with torch.no_grad():
        layer.widths[:, 1] = 0.0
    assert layer.macs() == 14
    # a low-pass widens the evaluation-mode support: the cached cost must follow sigma
    with torch.no_grad():
        layer.widths[:, 1] = 0.5
    assert layer.macs() == 14 + 7
    layer.sigma = 0.5
    assert layer.macs() == grouped_component_cost(*layer.component_supports(), [1, 1])
    assert layer.macs() > 14 + 7


def test_flops_of_inference_tensors_follow_in_place_updates():
    # a layer built under inference_mode has no version counters: its cost is not cached
    with torch.inference_mode():
        layer = make(8, 6, num_components=2)
        set_boxes(layer, torch.ones(2, 2), torch.zeros(2, 2))
        assert layer.macs() == min(2 * 14, 48)
        layer.widths[:, 1] = 0.0
        assert layer.macs() == 14


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("path", ["dense", "lowrank"])
def test_bias_false(training, path):
    layer = make(bias=False, path=path).train(training)
    assert layer.bias is None
    x = torch.randn(3, 12, dtype=torch.float64)
    torch.testing.assert_close(layer(x), x @ layer.to_dense().t())
    layer(x).sum().backward()
    assert layer.U.grad is not None


@pytest.mark.parametrize("shape", [(12,), (5, 12), (2, 3, 12), (2, 3, 4, 12), (0, 12)])
@pytest.mark.parametrize("training", [True, False])
def test_leading_shapes(shape, training):
    layer = make().train(training)
    x = torch.randn(*shape, dtype=torch.float64)
    y = layer(x)
    assert y.shape == (*shape[:-1], 10)
    torch.testing.assert_close(y, x @ layer.to_dense().t() + layer.bias)


@pytest.mark.parametrize("path", ["dense", "lowrank"])
def test_straight_through_gradients_reach_widths_and_locations(path):
    layer = make(16, 12, sigma=2.0, path=path).train()
    set_boxes(layer, torch.full((2, 12), 0.5), torch.rand(2, 12))
    layer(torch.randn(6, 16, dtype=torch.float64)).pow(2).sum().backward()
    for p in (layer.widths, layer.locations):
        assert p.grad is not None and torch.isfinite(p.grad).all()
        assert p.grad.abs().sum() > 0
        # every component's width and location moves on both axes
        assert (p.grad.abs() > 0).all()


def test_gradients_reach_structure_in_evaluation_mode():
    layer = make(16, 12, sigma=2.0).eval()
    set_boxes(layer, torch.full((2, 12), 0.5), torch.rand(2, 12))
    layer(torch.randn(6, 16, dtype=torch.float64)).pow(2).sum().backward()
    assert layer.widths.grad.abs().sum() > 0 and layer.U.grad.abs().sum() > 0


def test_sharp_evaluation_gradients_come_from_the_boxes_only():
    """In evaluation mode the masks are thresholded, so with sharp boxes the structure's
    gradient comes from the indices inside each box, as it does with the formula's masks."""
    from gblr.ops.gaudi import gaudi_mask, round_to_grid

    layer = make(16, 12).eval()
    set_boxes(layer, torch.full((2, 12), 0.5), torch.rand(2, 12, dtype=torch.float64))
    x = torch.randn(6, 16, dtype=torch.float64)
    layer(x).pow(2).sum().backward()
    got = layer.widths.grad.clone(), layer.locations.grad.clone()
    layer.zero_grad()
    masks = []
    for axis, n in ((0, 16), (1, 12)):
        w = round_to_grid(layer.widths[axis].clamp(0, 1), n)
        loc = round_to_grid(torch.remainder(layer.locations[axis], 1.0), n)
        m = gaudi_mask(w, loc, n, check=False)  # the formula, by inverse FFT
        masks.append(torch.where(m.abs() < 1e-3, 0.0, m))
    weight = (layer.U * masks[1].t()) @ (layer.V * masks[0])
    (x @ weight.t() + layer.bias).pow(2).sum().backward()
    torch.testing.assert_close(got[0], layer.widths.grad)
    torch.testing.assert_close(got[1], layer.locations.grad)


def test_eval_under_autocast_uses_the_autocast_dtype():
    layer = GBLRLinear(16, 8).eval()
    x = torch.randn(3, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), layer(x), atol=0.1, rtol=0.05)


def test_exact_constructors():
    torch.manual_seed(0)
    w = torch.randn(8, 12, dtype=torch.float64)
    u, v = torch.randn(8, 3, dtype=torch.float64), torch.randn(3, 12, dtype=torch.float64)
    lr = GBLRLinear.from_low_rank(u, v)
    torch.testing.assert_close(lr.to_dense(), u @ v)
    assert lr.macs() == 3 * (8 + 12)
    keep = torch.tensor([[True, False, True], [False, True, False]])
    bsp = GBLRLinear.from_block_sparse(w, keep, (4, 4))
    kept = keep.repeat_interleave(4, 0).repeat_interleave(4, 1)
    torch.testing.assert_close(bsp.to_dense(), w * kept)
    assert bsp.macs() == 3 * 16
    blr = GBLRLinear.from_block_low_rank(w, (4, 4), rank=1)
    assert blr.macs() == 6 * (4 + 4)


def test_matches_nn_linear_interface():
    layer = make(bias=True)
    ref = nn.Linear(12, 10, dtype=torch.float64)
    assert layer.bias.shape == ref.bias.shape
    assert layer.dense_macs() == 120
    assert layer.num_parameters() == sum(p.numel() for p in layer.parameters())


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(in_features=0, out_features=4), "in_features"),
        (dict(in_features=4, out_features=-2), "out_features"),
        (dict(in_features=4, out_features=6, num_components=0), "num_components"),
        (dict(in_features=4, out_features=6, num_components=5), "num_components"),
        (dict(in_features=4, out_features=6, rank_per_component=0), "rank_per_component"),
        (dict(in_features=4, out_features=6, rank_per_component=5), "rank_per_component"),
        (dict(in_features=4, out_features=6, sigma=-1.0), "sigma"),
        (dict(in_features=4, out_features=6, path="fast"), "path"),
        (dict(in_features=4, out_features=6, init="lowrank"), "init_fraction"),
        (dict(in_features=4, out_features=6, init="lowrank", init_fraction=1.5), "init_fraction"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        GBLRLinear(**kwargs)


def test_non_integer_size_is_a_type_error():
    with pytest.raises(TypeError, match="in_features"):
        GBLRLinear(4.5, 3)


@pytest.mark.parametrize("shape", [(3, 11), (11,), ()])
def test_wrong_last_dimension(shape):
    layer = make()
    with pytest.raises(ValueError, match=r"\(\.\.\., 12\)"):
        layer(torch.randn(shape, dtype=torch.float64))


def test_lowrank_init_off_components_can_regrow():
    torch.manual_seed(0)
    layer = GBLRLinear(16, 24, init="lowrank", init_fraction=0.3, sigma=2.0)
    on = layer.active_components()
    assert 0 < int(on.sum()) < layer.num_components
    assert torch.all(layer.widths[:, on] == 1.0)
    # evaluation cost is that of the full-width components only
    assert layer.macs() == int(on.sum()) * (16 + 24)
    layer.train()
    layer(torch.randn(32, 16)).square().sum().backward()
    # an off component has a gradient on its closed (output) width, so training can reopen it
    assert layer.widths.grad[1, ~on].abs().sum() > 0


@pytest.mark.parametrize("rank", [1, 2])
@pytest.mark.parametrize("path", ["dense", "lowrank"])
@pytest.mark.parametrize("sigma", [None, 3.0])
def test_components_off_on_both_axes_are_skipped_exactly(rank, path, sigma):
    torch.manual_seed(0)
    layer = GBLRLinear(20, 14, num_components=6, rank_per_component=rank, path=path,
                       sigma=sigma)
    with torch.no_grad():
        layer.widths[:, 3:] = 0.0  # three components off on both axes
        layer.widths[0, 2] = 0.0  # one off on the input axis only
    x = torch.randn(5, 20)
    u, v = layer.masked_factors(live_only=True)
    # sharp training switches a component off when one axis is <= 1 index (as evaluation
    # does); with a low-pass its other mask is nonzero, so it stays and may regrow
    live = 2 if sigma is None else 3
    assert u.shape[1] == v.shape[0] == live * rank
    full = copy.deepcopy(layer)
    y = layer(x)
    torch.testing.assert_close(y, F.linear(x, full.to_dense(), full.bias))
    y.square().sum().backward()
    u_f, v_f = full.masked_factors()
    F.linear(F.linear(x, v_f), u_f, full.bias).square().sum().backward()
    for name in ("U", "V", "widths", "locations", "bias"):
        torch.testing.assert_close(getattr(layer, name).grad, getattr(full, name).grad)
    if sigma is not None:
        assert float(layer.widths.grad[0, 2].abs()) > 0  # the half-off component learns


def test_renamed_names_warn_and_agree():
    """flops()/dense_flops() and GBLRLinear(budget=) are deprecated aliases of macs(),
    dense_macs() and init_fraction=: same values, one DeprecationWarning each."""
    torch.manual_seed(0)
    layer = GBLRLinear(16, 24, init="lowrank", init_fraction=0.3).eval()
    with pytest.warns(DeprecationWarning, match="macs"):
        assert layer.flops() == layer.macs()
    with pytest.warns(DeprecationWarning, match="dense_macs"):
        assert layer.dense_flops() == layer.dense_macs() == 16 * 24
    torch.manual_seed(0)
    with pytest.warns(DeprecationWarning, match="init_fraction"):
        old = GBLRLinear(16, 24, init="lowrank", budget=0.3).eval()
    assert old.init_fraction == 0.3
    assert torch.equal(old.widths, layer.widths)
    with pytest.raises(ValueError, match="init_fraction"), pytest.warns(DeprecationWarning):
        GBLRLinear(16, 24, init="lowrank", budget=0.3, init_fraction=0.3)


def test_structure_keeps_float32_under_low_precision():
    """.to(bfloat16) and a half-precision from_dense keep the boxes: widths and locations stay
    float32, so cost and structure are those of the float32 layer."""
    import copy

    torch.manual_seed(0)
    w = torch.randn(64, 48)
    layer = GBLRLinear.from_dense(w, 0.3, steps=0)
    x = torch.randn(5, 48)
    ref = layer(x)
    low = copy.deepcopy(layer).to(torch.bfloat16)
    assert low.U.dtype == torch.bfloat16 and low.widths.dtype == torch.float32
    assert low.macs() == layer.macs()
    assert torch.equal(low.widths, layer.widths) and torch.equal(low.locations, layer.locations)
    out = low(x.bfloat16()).float()
    assert float((out - ref).norm() / ref.norm()) < 0.02
    half = GBLRLinear.from_dense(w.half(), 0.3, steps=0)
    assert half.widths.dtype == torch.float32 and half.macs() == layer.macs()
    assert GBLRLinear(8, 8).double().widths.dtype == torch.float64
