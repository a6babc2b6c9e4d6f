import json

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import gblr
from gblr import GBLRConv2d, GBLRLinear, count_flops, flops_report
from gblr.ops import costed_conv2d, costed_linear

BUDGETS = [0.3, 0.6]
SHAPES = [(16, 24), (30, 18)]


def counted(model, *inputs):
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(*inputs)
    return counter.get_total_flops()


def gblr_with_partial_boxes(n_in, n_out):
    torch.manual_seed(0)
    layer = GBLRLinear(n_in, n_out)
    k = layer.num_components
    with torch.no_grad():
        layer.widths[:, : k // 3] = 1.0
        layer.widths[:, k // 3 : 2 * k // 3] = 0.5  # identical half boxes (grouped)
        layer.locations[:, k // 3 : 2 * k // 3] = 0.0
        layer.widths[:, 2 * k // 3 :] = 0.0  # off
    return layer


def mixed_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(16, 24),
        nn.GELU(),
        gblr_with_partial_boxes(24, 32),
        nn.ReLU(),
        gblr.LowRankLinear.from_dense(torch.randn(20, 32), 0.4),
        gblr.MonarchLinear.from_dense(torch.randn(18, 20), 0.5),
        nn.Linear(18, 8, bias=False),
    ).eval()


def test_report_rows_and_totals_per_token():
    model = mixed_model()
    report = flops_report(model)
    assert [r.name for r in report] == ["0", "2", "4", "5", "6"]
    assert [r.structure for r in report] == ["dense", "gblr", "lowrank", "monarch", "dense"]
    assert [r.structured for r in report] == [False, True, True, True, False]
    for row, (_, module) in zip(report, [(n, model[int(n)]) for n in "02456"], strict=True):
        expected = module.macs() if row.structured else module.in_features * module.out_features
        assert row.macs == expected
        assert row.params == sum(p.numel() for p in module.parameters())
        assert row.positions is None
    gblr_row = report.rows[1]
    assert gblr_row.shape == "24->32" and gblr_row.dense_macs == 24 * 32
    assert gblr_row.fraction == pytest.approx(gblr_row.macs / (24 * 32))
    structured = [r for r in report if r.structured]
    assert report.structured_macs == sum(r.macs for r in structured)
    assert report.replaced_dense_macs == 24 * 32 + 32 * 20 + 20 * 18
    assert report.structured_fraction == pytest.approx(
        report.structured_macs / report.replaced_dense_macs
    )
    assert report.total_macs_per_token == sum(r.macs for r in report)
    assert report.total_macs is None


def test_gblr_cost_in_the_report_is_hand_computed():
    layer = gblr_with_partial_boxes(24, 32)  # K = 24: 8 full, 8 identical 12x16 boxes, 8 off
    row = flops_report(layer).rows[0]
    assert row.name == ""
    assert row.macs == min(8 * (24 + 32), 24 * 32) + min(8 * (12 + 16), 12 * 16)


@pytest.mark.parametrize("lead", [(7,), (3, 5)])
def test_whole_model_count_equals_sum_of_layer_costs(lead):
    model = mixed_model()
    x = torch.randn(*lead, 16)
    tokens = x.numel() // 16
    report = flops_report(model, x)
    assert all(r.positions == tokens for r in report)
    assert report.total_macs == tokens * report.total_macs_per_token
    # plain FlopCounterMode around the evaluation-mode model, and the helper
    assert counted(model, x) == 2 * report.total_macs
    assert count_flops(model, x) == 2 * report.total_macs


@pytest.mark.parametrize("n_in,n_out", SHAPES)
@pytest.mark.parametrize("name", ["lowrank", "monarch", "blockdiag", "blocksparse", "blr", "gblr"])
@pytest.mark.parametrize("budget", BUDGETS)
def test_flop_counter_agrees_for_every_structure(n_in, n_out, name, budget):
    torch.manual_seed(0)
    layer = gblr.get_structure(name).from_dense(torch.randn(n_out, n_in), budget).eval()
    x = torch.randn(5, n_in)
    report = flops_report(layer, x)
    assert counted(layer, x) == 2 * 5 * layer.macs() == 2 * report.total_macs


@pytest.mark.parametrize("bias", [True, False])
def test_flop_counter_agrees_for_nn_linear(bias):
    layer = nn.Linear(12, 7, bias=bias)
    x = torch.randn(2, 3, 12)
    assert counted(layer, x) == 2 * flops_report(layer, x).total_macs == 2 * 6 * 84


def test_convolutions_count_output_positions():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        GBLRConv2d(8, 16, 3, stride=2, per_tap=True),
        GBLRConv2d.from_conv(nn.Conv2d(16, 4, (3, 2), dilation=2, padding=2), budget=0.5),
        nn.Conv2d(4, 4, 1, groups=2),
    ).eval()
    x = torch.randn(2, 3, 10, 10)
    report = flops_report(model, x)
    assert [r.positions for r in report] == [200, 32, 48, 48]
    assert [r.macs for r in report][0] == 8 * 3 * 9
    assert report.rows[1].structure == "gblr (per tap)"
    assert report.rows[3].macs == 4 * 2  # groups=2
    assert counted(model, x) == 2 * report.total_macs == count_flops(model, x)
    # the GBLR matrices inside a GBLRConv2d are not listed twice
    assert len(report) == 4


def test_count_flops_restores_modes_and_counts_evaluation_cost():
    model = nn.Sequential(gblr_with_partial_boxes(24, 32), nn.Dropout(0.1)).train()
    x = torch.randn(4, 24)
    flops = count_flops(model, x)
    assert flops == 2 * 4 * model[0].macs()
    assert model.training and model[0].training and model[1].training
    # in training the dense path is what runs, and FlopCounterMode counts it
    assert counted(model, x) > flops


def test_report_string_and_dict():
    model = mixed_model()
    report = flops_report(model, torch.randn(3, 16))
    text = str(report)
    for word in ("GBLRLinear", "LowRankLinear", "MonarchLinear", "24->32", "total", "FLOPs"):
        assert word in text
    data = json.loads(json.dumps(report.to_dict()))
    assert len(data["layers"]) == 5
    assert data["totals"]["total_macs"] == report.total_macs
    assert data["layers"][1]["fraction"] == pytest.approx(report.rows[1].fraction)
    assert "FlopsReport" in repr(report)


def test_hf_conv1d_is_counted_as_a_linear_layer():
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    layer = pytorch_utils.Conv1D(12, 8)  # nf=12 outputs, nx=8 inputs
    x = torch.randn(5, 8)
    report = flops_report(layer, x)
    assert report.rows[0].shape == "8->12" and report.rows[0].macs == 96
    assert counted(layer, x) == 2 * report.total_macs


def test_model_without_layers_and_bad_model():
    report = flops_report(nn.ReLU(), torch.randn(3))
    assert len(report) == 0 and report.total_macs == 0 and report.fraction == 1.0
    with pytest.raises(TypeError, match="model"):
        flops_report(lambda x: x)
    with pytest.raises(TypeError, match="model"):
        count_flops("not a model")


def test_costed_ops_pass_opcheck():
    x, u, v = torch.randn(5, 6), torch.randn(4, 3), torch.randn(3, 6)
    for dense in (False, True):
        torch.library.opcheck(torch.ops.gblr.costed_linear.default, (x, u, v, 11, dense))
    x4 = torch.randn(2, 3, 6, 5)
    u4, v4 = torch.randn(1, 4, 2), torch.randn(1, 2, 3 * 2 * 2)
    args = (x4, u4, v4, [2, 2], False, [1, 2], [1, 0], [1, 1], 7)
    torch.library.opcheck(torch.ops.gblr.costed_conv2d.default, args)


def test_costed_ops_gradcheck():
    def t(*shape):
        return torch.randn(*shape, dtype=torch.float64, requires_grad=True)

    assert torch.autograd.gradcheck(
        lambda a, b, c: costed_linear(a, b, c, 3), (t(5, 6), t(4, 3), t(3, 6))
    )
    for per_tap, taps, n in ((True, 6, 3), (False, 1, 18)):
        assert torch.autograd.gradcheck(
            lambda a, b, c, p=per_tap: costed_conv2d(a, b, c, (2, 3), p, (2, 1), (1, 0), (1, 2), 5),
            (t(2, 3, 7, 6), t(taps, 4, 2), t(taps, 2, n)),
        )
