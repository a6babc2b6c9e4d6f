"""CompressionConfig.from_json names what is wrong with its input."""

from __future__ import annotations

import pytest

from gblr.convert import CompressionConfig


@pytest.mark.parametrize("text, kind", [
    ("[]", "list"), ("  [1, 2]", "list"), ("3", "int"), ('"gblr"', "str"), ("null", "None"),
    ("true", "bool"),
])
def test_from_json_text_that_is_not_an_object(text, kind):
    with pytest.raises(ValueError, match=f"must be a JSON object.*{kind}") as info:
        CompressionConfig.from_json(text)
    assert "does not exist" not in str(info.value)


@pytest.mark.parametrize("text", ["{", '{"budget": 0.5,}', "{'budget': 0.5}"])
def test_from_json_invalid_json_text(text):
    with pytest.raises(ValueError, match="not valid JSON"):
        CompressionConfig.from_json(text)


def test_from_json_file_that_is_not_an_object(tmp_path):
    path = tmp_path / "c.json"
    path.write_text("[]\n", encoding="utf-8")
    for arg in (path, str(path)):
        with pytest.raises(ValueError, match=r"c\.json.*must be a JSON object.*list"):
            CompressionConfig.from_json(arg)


def test_from_json_file_with_invalid_json(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"budget": 0.5', encoding="utf-8")
    with pytest.raises(ValueError, match=r"c\.json.*not valid JSON"):
        CompressionConfig.from_json(path)
    path.write_bytes(b"\xff\xfe{}")
    with pytest.raises(ValueError, match=r"c\.json.*UTF-8"):
        CompressionConfig.from_json(path)


def test_from_json_directory(tmp_path):
    for arg in (tmp_path, str(tmp_path)):
        with pytest.raises(ValueError, match="is a directory") as info:
            CompressionConfig.from_json(arg)
        assert "does not exist" not in str(info.value)


def test_from_json_missing_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        CompressionConfig.from_json(tmp_path / "nope.json")
    with pytest.raises(ValueError, match="does not exist"):
        CompressionConfig.from_json("nope.json")


def test_from_json_round_trip_text_and_file(tmp_path):
    cfg = CompressionConfig(budget=0.3)
    assert CompressionConfig.from_json(cfg.to_json()) == cfg
    assert CompressionConfig.from_json("\n " + cfg.to_json()) == cfg
    cfg.to_json(tmp_path / "c.json")
    assert CompressionConfig.from_json(str(tmp_path / "c.json")) == cfg
