import pytest

from gblr.bench import suite


def test_quick_suite_writes_results_page(tmp_path):
    page = tmp_path / "RESULTS.md"
    out = tmp_path / "results"
    code = suite.main(["layers", "--quick", "--out", str(out), "--page", str(page), "--no-cuda"])
    assert code == 0
    text = page.read_text()
    assert "## The paper's reference numbers" in text
    assert "78.51%" in text  # the paper's figure, in its own table
    assert "## Layer training step" in text
    assert "did not complete" not in text
    assert (out / "layers" / "results.json").exists()


def test_unknown_benchmark_is_an_error(tmp_path):
    with pytest.raises(SystemExit):
        suite.main(["nope", "--out", str(tmp_path)])


def test_failed_benchmark_is_reported(tmp_path):
    runs = [{"name": "layers", "out": tmp_path / "missing", "status": "failed (exit 1)",
             "seconds": 1.0, "device": None}]
    page = tmp_path / "R.md"
    suite.write_results_page(runs, page, "python -m gblr.bench layers")
    assert "did not complete: failed (exit 1)" in page.read_text()
