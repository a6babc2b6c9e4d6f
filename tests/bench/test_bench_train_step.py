"""The model-level training-step benchmark: its phases and its quick run."""

from __future__ import annotations

import json

import pytest

from gblr.bench import train_step


@pytest.fixture
def data_root(tmp_path, monkeypatch):
    monkeypatch.setenv("GBLR_DATA", str(tmp_path / "data"))
    return tmp_path / "data"


def test_phases_shrink_to_the_budget_and_anneal_sigma(data_root):
    model, _, _, cfg = train_step._build("mnist1d/mixer", "gblr", ["data.num_samples=600"])
    controller = train_step._controller(model, cfg, int(cfg.trainer.max_steps))
    budget = float(cfg.budget)
    start = train_step._set_phase(model, cfg, 0.0, 1500)
    # the start is full width: half the paper's rank costs 0.75 of the dense Mixer
    full = controller.measure()
    assert start["sigma"] == cfg.structure.sigma_start and full == pytest.approx(0.7492, abs=1e-4)
    middle = train_step._set_phase(model, cfg, 0.5, 1500)
    halfway = full + (budget - full) * 0.5
    assert controller.measure() <= halfway and controller.measure() > halfway - 0.05
    start_sigma, end_sigma = cfg.structure.sigma_start, cfg.structure.sigma_end
    assert middle["sigma"] == pytest.approx((start_sigma * end_sigma) ** 0.5)
    end = train_step._set_phase(model, cfg, 1.0, 1500)
    assert end["sigma"] is None and budget - 0.01 < controller.measure() <= budget
    assert 0 < end["active_components"] <= end["components"]


def test_quick_run_writes_the_table_figure_and_runs(tmp_path, data_root):
    out = tmp_path / "out"
    assert train_step.main(["--quick", "--experiments", "mnist1d/mixer", "--out", str(out)]) == 0
    text = (out / "results.md").read_text()
    for phase in train_step.PHASES:
        assert f"| gblr | {phase} |" in text and f"| {train_step.FLOOR} | {phase} |" in text
    assert "| lowrank | - |" in text and "Wall clock" in text
    data = json.loads((out / "results.json").read_text())
    assert {r["structure"] for r in data["steps"]} == {"dense", "gblr", "lowrank", "monarch",
                                                       train_step.FLOOR}
    for row in data["steps"]:  # quartiles of the paired ratios
        assert 0 < row["paired_q1"] <= row["paired_q3"]
    dense = [r for r in data["steps"] if r["structure"] == "dense"]
    assert all(r["paired_q1"] == r["paired_q3"] == 1.0 for r in dense)
    (run,) = data["runs"]
    assert run["steps"] == 6 and run["dense_seconds"] > 0 and run["gblr_seconds"] > 0
    assert (out / "step_time.png").is_file()


def test_masks_off_ablation_computes_u_times_v():
    import torch

    from gblr import GBLRLinear

    torch.manual_seed(0)
    model = torch.nn.Sequential(GBLRLinear(6, 8))
    with torch.no_grad():
        model[0].widths.fill_(0.3)
    train_step._masks_off(model)
    x = torch.randn(5, 6)
    layer = model[0]
    want = x @ (layer.U @ layer.V).t() + layer.bias
    torch.testing.assert_close(model(x), want)
