import json

from gblr.bench import layers


def test_quick_benchmark_runs_end_to_end(tmp_path, capsys):
    assert layers.main(["--quick", "--reps", "2", "--threads", "1", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert [(r["in_features"], r["out_features"]) for r in data["rows"]] == layers.QUICK_SHAPES
    for row in data["rows"]:
        assert row["dense_s"] > 0 and row["gblr_s"] > 0
        assert row["ratio"] == row["gblr_s"] / row["dense_s"]
        assert len(row["gblr_all_s"]) == 2
    assert set(data["mask_build_s"]) == {"sigma=1.0", "sigma=None"}
    table = (tmp_path / "results.md").read_text()
    assert "32->64" in table and "ratio" in table
    assert "ratio" in capsys.readouterr().out
