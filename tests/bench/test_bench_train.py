"""The training benchmark's quick run and its reuse of finished runs."""

from __future__ import annotations

import pytest
from helpers import shakespeare_available

from gblr.train import runner


@pytest.mark.slow  # eight tiny trainings in subprocesses, about a minute
def test_train_benchmark_quick(tmp_path):
    if not shakespeare_available():
        pytest.skip("../shared/data/shakespeare is absent")
    from gblr.bench.train import main

    assert main(["--quick", "--jobs", "2", "--work", str(tmp_path / "w"),
                 "--data-root", str(tmp_path / "data"), "--out", str(tmp_path / "out")]) == 0
    text = (tmp_path / "out" / "results.md").read_text()
    assert "| gblr |" in text and "| monarch |" in text
    assert (tmp_path / "out" / "layer_costs.png").is_file()
    assert (tmp_path / "out" / "curves.png").is_file() and "![curves](curves.png)" in text
    # --reuse rebuilds the same table from the finished runs without training again
    assert main(["--quick", "--jobs", "2", "--work", str(tmp_path / "w"), "--reuse",
                 "--data-root", str(tmp_path / "data"), "--out", str(tmp_path / "again")]) == 0
    again = (tmp_path / "again" / "results.md").read_text()
    assert again.split("\n", 3)[3] == text.split("\n", 3)[3]  # all but the command line


def test_train_benchmark_reuses_only_runs_with_the_same_config(tmp_path):
    import json

    from omegaconf import OmegaConf

    from gblr.bench.train import _finished

    out = tmp_path / "run"
    out.mkdir()
    args = ["experiment=mnist1d/mixer-lowrank", f"out_dir={out}", "seed=1", "budget=0.3"]
    assert _finished(out, args) is None  # nothing there yet
    OmegaConf.save(runner.compose(args), out / "config.yaml")
    assert _finished(out, args) is None  # no summary: the run did not finish
    (out / "summary.json").write_text(json.dumps({"name": "mnist1d/mixer-lowrank", "seed": 1}))
    assert _finished(out, args) == {"name": "mnist1d/mixer-lowrank", "seed": 1}
    assert _finished(out, [*args[:-1], "budget=0.4"]) is None
    assert _finished(out, [*args, "trainer.max_steps=7"]) is None
    moved = tmp_path / "moved"
    out.rename(moved)  # a run folder that was moved is still the same run
    assert _finished(moved, [*args[:1], f"out_dir={moved}", *args[2:]]) is not None


def test_validation_curves_are_read_from_the_run_logs(tmp_path):
    from gblr.bench.train import _curve_table, validation_curve

    logs = tmp_path / "run" / "logs"
    logs.mkdir(parents=True)
    rows = ["epoch,step,train/loss,val/loss"]
    for step in range(1, 13):
        rows.append(f"0,{25 * step},2.5,")
        rows.append(f"0,{100 * step},,{3.0 - 0.1 * step:.1f}")
    (logs / "metrics.csv").write_text("\n".join(rows) + "\n")
    curve = validation_curve(tmp_path / "run")
    assert curve[0] == (100, 2.9) and curve[-1] == (1200, 1.8) and len(curve) == 12
    assert validation_curve(tmp_path / "missing") == []
    result = {"suite": "shakespeare", "linear": "dense", "budget": 0.4,
              "run_dir": str(tmp_path / "run")}
    table = _curve_table([result])
    assert "| dense | — | 2.4000 (step 600) | 2.1000 (step 900) | 1.8000 (step 1200) |" in table
