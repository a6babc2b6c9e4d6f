"""Progress output: plain periodic lines when redirected, never carriage returns."""

import io

from gblr.core.progress import LineProgress, progress


def test_lines_have_totals_and_no_carriage_returns():
    out = io.StringIO()
    bar = LineProgress(range(5), desc="distil", unit="step", every=0.0, file=out)
    for _ in bar:
        bar.set_postfix(loss="0.12")
    text = out.getvalue()
    assert "\r" not in text
    lines = text.strip().splitlines()
    assert lines[0].startswith("distil: 1/5 step (20%) | loss=0.12")
    assert lines[-1].startswith("distil: 5/5 step (100%)")


def test_lines_are_rate_limited():
    out = io.StringIO()
    bar = LineProgress(total=1000, desc="x", every=3600.0, file=out)
    for _ in range(1000):
        bar.update()
    bar.close()
    assert len(out.getvalue().splitlines()) == 1  # only the closing line


def test_redirected_output_gets_lines(capsys):
    bar = progress(total=2, desc="project", unit="layer")  # pytest's stderr is no terminal
    assert isinstance(bar, LineProgress)
    bar.update(2)
    bar.close()
    assert "project: 2/2 layer" in capsys.readouterr().err
    silent = progress(total=2, disable=True)
    silent.update(2)
    silent.close()
    assert capsys.readouterr().err == ""
