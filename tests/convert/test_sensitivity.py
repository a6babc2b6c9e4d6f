"""allocation="sensitivity": per-layer budgets from each layer's measured effect on the output."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import gblr
from gblr.convert import CompressionConfig, compress, load_compressed, save_compressed
from gblr.convert.sensitivity import output_error, sensitivity_curves
from gblr.layers.lowrank import LowRankLinear
from gblr.projection.allocate import split_budget


class TwoBranches(nn.Module):
    """``loud(x) + quiet_scale * quiet(x)``: the quiet branch barely reaches the output."""

    def __init__(self, quiet_scale: float = 1e-3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.loud = nn.Linear(32, 32)
        self.quiet = nn.Linear(32, 32)
        self.quiet_scale = quiet_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.loud(x) + self.quiet_scale * self.quiet(x)


DATA = [torch.randn(64, 32, generator=torch.Generator().manual_seed(i)) for i in range(2)]


def _lowrank(model: nn.Module):
    originals = dict(model.named_children())

    def project(name: str, budget: float) -> nn.Module:
        layer = originals[name]
        return LowRankLinear.from_dense(layer.weight.detach(), budget, bias=layer.bias.detach())
    return project


def test_curves_measure_the_output_and_restore_the_model():
    model = TwoBranches()
    ref = model(DATA[0]).detach()
    curves = sensitivity_curves(model, ["loud", "quiet"], _lowrank(model), DATA,
                                grid=(0.2, 0.5, 0.9), progress=False)
    assert isinstance(model.loud, nn.Linear) and isinstance(model.quiet, nn.Linear)
    torch.testing.assert_close(model(DATA[0]), ref)
    for budgets, errors in curves.values():
        assert len(budgets) == 3 and all(0 < b <= 0.9 for b in budgets)
        assert errors == sorted(errors, reverse=True)  # truncated SVD: more rank, less error
    # the quiet branch's error is scaled by 1e-6 (squared 1e-3) relative to the loud one's
    assert max(curves["quiet"][1]) < 1e-4 * min(curves["loud"][1])
    assert output_error(model, DATA, [model(x).double() for x in DATA]) == 0.0


def test_sensitivity_gives_the_budget_to_the_layer_that_matters():
    model = TwoBranches()
    cfg = CompressionConfig(structure="lowrank", budget=0.5, target_modules=["loud", "quiet"],
                            allocation="sensitivity", calibration=False)
    _, report = compress(model, cfg, calibration_data=DATA, progress=False)
    budgets = {r.name: r.budget for r in report.layers}
    assert budgets["loud"] > 0.5 > budgets["quiet"]
    assert report.cost <= 0.5 * report.dense_cost
    # a uniform split of the same total is worse at the output
    uniform = TwoBranches()
    compress(uniform, CompressionConfig(structure="lowrank", budget=0.5, calibration=False,
                                        target_modules=["loud", "quiet"], allocation="uniform"),
             progress=False)
    dense = TwoBranches()
    ref = [dense(x).double() for x in DATA]
    assert output_error(model, DATA, ref) < output_error(uniform, DATA, ref)


def test_sensitivity_with_gblr_structure_search():
    """GBLR's iterative projection (steps > 0) needs gradients inside the measurement."""
    model = TwoBranches()
    config = CompressionConfig(structure="gblr", budget=0.5, steps=3, calibration=True,
                               allocation="sensitivity", target_modules=["loud", "quiet"])
    _, report = compress(model, config, calibration_data=DATA, progress=False)
    assert report.cost <= 0.5 * report.dense_cost
    budgets = {r.name: r.budget for r in report.layers}
    assert budgets["quiet"] < budgets["loud"]


def test_sensitivity_on_a_transformer_round_trips(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=64,
                                  max_position_embeddings=64)
    base = transformers.BertModel(cfg).eval()
    model = copy.deepcopy(base)
    ids = torch.randint(0, 100, (4, 12), generator=torch.Generator().manual_seed(0))
    batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]
    config = CompressionConfig(structure="gblr", steps=0, budget=0.4, target_modules=["encoder"],
                               calibration=True, allocation="sensitivity")
    _, report = compress(model, config, calibration_data=batches, progress=False)
    assert report.cost <= 0.4 * report.dense_cost
    assert len({round(r.budget, 3) for r in report.layers}) > 1
    save_compressed(model, tmp_path / "m")
    again = load_compressed(copy.deepcopy(base), tmp_path / "m")
    assert torch.equal(again(input_ids=ids).last_hidden_state,
                       model(input_ids=ids).last_hidden_state)


def test_sensitivity_bad_input():
    with pytest.raises(ValueError, match="allocation='sensitivity' measures"):
        compress(TwoBranches(), CompressionConfig(structure="lowrank", target_modules=["loud"],
                                                  allocation="sensitivity", calibration=False),
                 progress=False)
    with pytest.raises(ValueError, match="allocation='sensitivity'"):
        CompressionConfig(calibration_mode="sequential", allocation="sensitivity")
    with pytest.raises(ValueError, match="at least one calibration batch"):
        sensitivity_curves(TwoBranches(), ["loud"], _lowrank(TwoBranches()), [], progress=False)
    with pytest.raises(ValueError, match="below what the layers can reach"):
        split_budget({"a": ([0.5, 0.9], [1.0, 0.1])}, {"a": 100}, 0.2)
    assert hasattr(gblr, "compress")
