import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from gblr import GBLRConv2d

CONFIGS = [
    dict(kernel_size=3, stride=1, padding=1, dilation=1),
    dict(kernel_size=3, stride=2, padding=0, dilation=1),
    dict(kernel_size=(3, 2), stride=(1, 2), padding=(2, 1), dilation=(2, 1)),
    dict(kernel_size=1, stride=1, padding=0, dilation=1),
    dict(kernel_size=3, padding="same"),
]


def conv(cfg, bias=True, c_in=3, c_out=5):
    torch.manual_seed(0)
    return nn.Conv2d(c_in, c_out, bias=bias, dtype=torch.float64, **cfg)


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("per_tap", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_from_conv_is_exact_on_every_path(cfg, per_tap, bias):
    ref = conv(cfg, bias)
    layer = GBLRConv2d.from_conv(ref, per_tap=per_tap)
    torch.testing.assert_close(layer.to_dense(), ref.weight.detach())
    x = torch.randn(2, 3, 9, 8, dtype=torch.float64)
    expected = ref(x)
    for path in ("dense", "lowrank"):
        layer.path = path
        torch.testing.assert_close(layer.train()(x), expected)
    torch.testing.assert_close(layer.eval()(x), expected)
    torch.testing.assert_close(layer(x[0]), expected[0])  # unbatched input


@pytest.mark.parametrize("per_tap", [False, True])
def test_paths_agree_with_partial_boxes_and_gradients_reach_structure(per_tap):
    torch.manual_seed(1)
    layer = GBLRConv2d(4, 6, 3, stride=2, padding=1, per_tap=per_tap, sigma=2.0,
                       dtype=torch.float64)
    with torch.no_grad():
        for lin in layer.linears:
            lin.widths.uniform_(0.3, 0.9)
            lin.locations.uniform_(0.0, 1.0)
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64)
    outs = {}
    for path in ("dense", "lowrank"):
        layer.path = path
        layer.zero_grad()
        outs[path] = layer(x)
        outs[path].square().sum().backward()
        for lin in layer.linears:
            assert lin.widths.grad.abs().sum() > 0
            assert lin.locations.grad.abs().sum() > 0
    torch.testing.assert_close(outs["dense"], outs["lowrank"])
    ref = nn.functional.conv2d(x, layer.to_dense(), layer.bias, 2, 1)
    torch.testing.assert_close(outs["dense"], ref)


def test_flops_per_position_hand_computed_and_macs():
    layer = GBLRConv2d(2, 4, 2, bias=False, dtype=torch.float64)  # a 4 x 8 kernel matrix
    lin = layer.linears[0]
    assert lin.num_components == 4
    with torch.no_grad():
        lin.widths.fill_(1.0)
    # four full-width components: one dense 4 x 8 block
    assert layer.macs() == layer.dense_macs() == 32
    with torch.no_grad():
        lin.widths[:, 1:] = 0.0
    assert layer.macs() == 1 * (8 + 4)
    assert layer.output_size((5, 6)) == (4, 5)
    assert layer.macs((5, 6)) == 12 * 4 * 5


def test_per_tap_cost_is_the_sum_over_taps():
    layer = GBLRConv2d(4, 6, 3, per_tap=True, dtype=torch.float64)
    assert len(layer.linears) == 9
    assert layer.dense_macs() == 6 * 4 * 9
    with torch.no_grad():
        layer.linears[0].widths[:, 1:] = 0.0
    # tap 0: one full-width rank-1 component; the others a dense 6 x 4 block
    assert layer.macs() == (4 + 6) + 8 * 24


@pytest.mark.parametrize("per_tap", [False, True])
def test_flop_counter_counts_output_positions(per_tap):
    layer = GBLRConv2d(3, 8, 3, stride=2, padding=1, per_tap=per_tap).eval()
    with torch.no_grad():
        for lin in layer.linears:
            lin.widths[:, 1:] = 0.0
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        y = layer(x)
    positions = 2 * y.shape[-2] * y.shape[-1]
    assert counter.get_total_flops() == 2 * positions * layer.macs()


@pytest.mark.parametrize("per_tap", [False, True])
@pytest.mark.parametrize("budget", [0.2, 0.5])
def test_from_conv_with_budget_meets_it(per_tap, budget):
    ref = conv(dict(kernel_size=3, padding=1), c_in=8, c_out=16)
    layer = GBLRConv2d.from_conv(ref, budget=budget, per_tap=per_tap)
    assert 0 < layer.macs() <= budget * layer.dense_macs()
    x = torch.randn(1, 8, 6, 6, dtype=torch.float64)
    err = (layer.eval()(x) - ref(x)).norm() / ref(x).norm()
    assert err < 1.0


def test_new_layer_output_scale_matches_nn_conv2d():
    torch.manual_seed(0)
    x = torch.randn(8, 16, 12, 12)
    ref_std = nn.Conv2d(16, 32, 3)(x).std()
    for per_tap in (False, True):
        std = GBLRConv2d(16, 32, 3, per_tap=per_tap)(x).std()
        assert 0.5 * ref_std < std < 2.0 * ref_std


def test_groups_and_padding_mode_are_rejected():
    with pytest.raises(ValueError, match="groups"):
        GBLRConv2d(4, 4, 3, groups=2)
    with pytest.raises(ValueError, match="groups"):
        GBLRConv2d.from_conv(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match="padding_mode"):
        GBLRConv2d.from_conv(nn.Conv2d(4, 4, 3, padding_mode="reflect"))
    with pytest.raises(TypeError, match="conv"):
        GBLRConv2d.from_conv(nn.Linear(4, 4))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(in_channels=0, out_channels=4, kernel_size=3), "in_channels"),
        (dict(in_channels=4, out_channels=-1, kernel_size=3), "out_channels"),
        (dict(in_channels=4, out_channels=4, kernel_size=0), "kernel_size"),
        (dict(in_channels=4, out_channels=4, kernel_size=3, stride=0), "stride"),
        (dict(in_channels=4, out_channels=4, kernel_size=3, padding=-1), "padding"),
        (dict(in_channels=4, out_channels=4, kernel_size=3, padding="full"), "padding"),
        (dict(in_channels=4, out_channels=4, kernel_size=2, padding="same"), "same"),
        (dict(in_channels=4, out_channels=4, kernel_size=3, path="fast"), "path"),
        (dict(in_channels=2, out_channels=4, kernel_size=1, num_components=3), "num_components"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        GBLRConv2d(**kwargs)


def test_wrong_input_shape():
    layer = GBLRConv2d(3, 4, 3)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        layer(torch.randn(2, 5, 8, 8))
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        layer(torch.randn(8, 8))
    with pytest.raises(ValueError, match="input_hw"):
        layer(torch.randn(1, 3, 2, 2))
