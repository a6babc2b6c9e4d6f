"""flops_report's parameter counts: held, used in evaluation, and dense."""

from __future__ import annotations

import torch
from torch import nn

from gblr import GBLRConv2d, GBLRLinear, LowRankLinear, flops_report
from gblr.accounting.report import eval_parameters


def block_sparse(bias: bool = True) -> GBLRLinear:
    torch.manual_seed(0)
    weight = torch.randn(12, 16)
    keep = torch.tensor([[1, 0, 0, 1], [0, 1, 0, 0], [0, 0, 0, 1]], dtype=torch.bool)
    return GBLRLinear.from_block_sparse(weight, keep, (4, 4),
                                        bias=torch.randn(12) if bias else None).eval()


def test_gblr_eval_parameters_count_the_boxes():
    layer = block_sparse()
    # 4 blocks of 4x4, each held as 4 rank-1 components: 4 + 4 factor entries each,
    # widths and locations (4 numbers) per component, and the bias
    assert eval_parameters(layer) == 16 * (4 + 4) + 16 * 4 + 12
    assert sum(p.numel() for p in layer.parameters()) == 12 * 16 + 16 * 16 + 16 * 4 + 12
    with torch.no_grad():
        layer.widths[1, :4] = 0.0  # one block off
    assert eval_parameters(layer) == 12 * 8 + 12 * 4 + 12
    layer.sigma = 2.0  # smooth masks use the factors beyond the boxes
    assert eval_parameters(layer) == sum(p.numel() for p in layer.parameters())


def test_report_rows_and_totals_carry_parameters():
    model = nn.Sequential(block_sparse(), nn.ReLU(), nn.Linear(12, 5),
                          LowRankLinear(5, 7, rank=2))
    report = flops_report(model)
    gblr_row, dense_row, low_row = report.rows
    assert gblr_row.eval_params == eval_parameters(model[0]) < gblr_row.params
    assert gblr_row.dense_params == 12 * 16 + 12
    assert dense_row.params == dense_row.eval_params == dense_row.dense_params == 12 * 5 + 5
    assert low_row.eval_params == low_row.params == 2 * (5 + 7) + 7
    assert low_row.dense_params == 5 * 7 + 7
    totals = report.totals()
    assert totals["parameters"] == sum(r.params for r in report.rows) == report.parameters
    assert totals["eval_parameters"] == sum(r.eval_params for r in report.rows)
    assert totals["dense_parameters"] == sum(r.dense_params for r in report.rows)
    row = report.to_dict()["layers"][0]
    assert row["eval_params"] == gblr_row.eval_params and row["dense_params"] == 204
    text = str(report)
    assert "eval params" in text.splitlines()[0]
    assert f"{report.eval_parameters:,} used in evaluation" in text


def test_conv_eval_parameters_keep_every_slot():
    conv = GBLRConv2d(4, 6, 3, per_tap=True, init="random", bias=True).eval()
    with torch.no_grad():
        for lin in conv.linears:
            lin.widths.fill_(0.5)
            lin.widths[:, 0] = 0.0  # one component off in each tap
            lin.locations.fill_(0.25)
    k = conv.linears[0].num_components
    per_tap = (k - 1) * (2 + 3) + 4 * k  # active: 2 of 4 inputs, 3 of 6 outputs
    assert eval_parameters(conv) == 9 * per_tap + 6
    row = flops_report(nn.Sequential(conv)).rows[0]
    assert row.dense_params == 6 * 4 * 9 + 6
