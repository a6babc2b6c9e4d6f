"""Loading without the base model: the architecture rebuilt from the saved Hugging Face
config (``load_compressed(directory)``), ``from_pretrained``, and the refusals."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import tiny_bert, tiny_gpt2
from torch import nn

import gblr
from gblr.convert import CompressionConfig, compress, load_compressed, save_compressed
from gblr.convert.hub import HF_CONFIG_FILE, build_base

IDS = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
MASK = torch.ones_like(IDS).index_fill_(1, torch.arange(6, 9), 0)


def _compressed(model: nn.Module, targets=("encoder",)) -> nn.Module:
    compress(model, CompressionConfig.preset("weights-only", steps=0, budget=0.4,
                                             target_modules=list(targets)), progress=False)
    return model.eval()


def _rewrite(directory: Path, name: str, edit) -> None:
    """Edit one JSON file of a save and re-checksum it in the manifest (a consistent save
    that differs, as an older gblr or a hand edit would leave it)."""
    path = directory / name
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["files"][name] = hashlib.sha256(path.read_bytes()).hexdigest()
    (directory / "manifest.json").write_text(json.dumps(manifest))


def test_load_without_base_is_bit_exact(tmp_path):
    model = _compressed(tiny_bert())
    out = model(input_ids=IDS, attention_mask=MASK).last_hidden_state
    save_compressed(model, tmp_path / "c")
    record = json.loads((tmp_path / "c" / "compression.json").read_text())
    assert record["base"] == {"library": "transformers", "class": "BertModel",
                              "config": HF_CONFIG_FILE, "dtype": "float32"}
    assert HF_CONFIG_FILE in json.loads((tmp_path / "c" / "manifest.json").read_text())["files"]
    again = load_compressed(tmp_path / "c")
    assert type(again).__name__ == "BertModel" and not again.training
    assert torch.equal(again(input_ids=IDS, attention_mask=MASK).last_hidden_state, out)
    assert again.gblr_compression["layers"] == model.gblr_compression["layers"]
    # a base can still be passed, and gives the same model
    with_base = load_compressed(tiny_bert(seed=3), str(tmp_path / "c"))
    assert torch.equal(with_base(input_ids=IDS, attention_mask=MASK).last_hidden_state, out)


def test_from_pretrained_deploys_unless_trainable(tmp_path):
    model = _compressed(tiny_gpt2(head=True), targets=["h"])
    out = model(input_ids=IDS).logits
    save_compressed(model, tmp_path / "g")
    deployed = gblr.from_pretrained(tmp_path / "g")
    assert not deployed.training
    assert any(isinstance(m, gblr.PackedGBLRLinear) for m in deployed.modules())
    assert torch.allclose(deployed(input_ids=IDS).logits, out, atol=1e-5)
    assert deployed.lm_head.weight is deployed.transformer.wte.weight  # ties kept
    trainable = gblr.from_pretrained(tmp_path / "g", trainable=True)
    assert not trainable.training
    assert isinstance(trainable.transformer.h[0].mlp.c_fc, gblr.GBLRLinear)
    assert torch.equal(trainable(input_ids=IDS).logits, out)
    based = gblr.from_pretrained(tmp_path / "g", base=tiny_gpt2(seed=4, head=True))
    assert torch.allclose(based(input_ids=IDS).logits, out, atol=1e-5)


def test_refusals_name_the_problem(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a gblr compressed model"):
        gblr.from_pretrained(tmp_path / "empty")
    with pytest.raises(ValueError, match="not a directory written by gblr"):
        load_compressed(tmp_path / "missing")
    with pytest.raises(TypeError, match="directory alone"):
        load_compressed(str(tmp_path / "empty"), tmp_path / "empty")

    # a model that is not from transformers: the base must be passed
    plain = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 8)).eval()
    compress(plain, CompressionConfig(calibration=False, allocation="uniform", steps=0,
                                      budget=0.5), progress=False)
    save_compressed(plain, tmp_path / "plain")
    assert not (tmp_path / "plain" / HF_CONFIG_FILE).exists()
    with pytest.raises(ValueError, match="pass the base model"):
        gblr.from_pretrained(tmp_path / "plain")
    base = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 8))
    assert isinstance(gblr.from_pretrained(tmp_path / "plain", base=base)[0],
                      gblr.PackedGBLRLinear)

    model = _compressed(tiny_bert())
    save_compressed(model, tmp_path / "c")
    # an edited or missing config: the manifest catches it
    config = tmp_path / "c" / HF_CONFIG_FILE
    text = config.read_text()
    config.write_text(text.replace('"num_hidden_layers": 2', '"num_hidden_layers": 3'))
    with pytest.raises(ValueError, match="hf_config.json is corrupted or was edited"):
        load_compressed(tmp_path / "c")
    config.unlink()
    with pytest.raises(ValueError, match="has no hf_config.json"):
        load_compressed(tmp_path / "c")
    config.write_text(text)
    # a class that is not a transformers model (the record re-checksummed, as by hand)
    _rewrite(tmp_path / "c", "compression.json", lambda r: r["base"].update({"class": "os"}))
    with pytest.raises(ValueError, match="'os' is not a model class of transformers"):
        load_compressed(tmp_path / "c")
    _rewrite(tmp_path / "c", "compression.json", lambda r: r["base"].update({"class": "a.b"}))
    with pytest.raises(ValueError, match="is not a transformers class name"):
        load_compressed(tmp_path / "c")
    with pytest.raises(ValueError, match="describes a 'gpt2' model"):
        build_base({"class": "BertModel", "dtype": "float32"}, {"model_type": "gpt2"}, "here")
    # a save without the config (an older gblr): loads with a base, says so without one
    _rewrite(tmp_path / "c", "compression.json", lambda r: r.pop("base"))
    with pytest.raises(ValueError, match="pass the base model"):
        load_compressed(tmp_path / "c")
    again = load_compressed(tiny_bert(seed=2), tmp_path / "c")
    assert torch.equal(again(input_ids=IDS).last_hidden_state,
                       model(input_ids=IDS).last_hidden_state)


def test_importing_gblr_imports_neither_transformers_nor_sentence_transformers():
    code = ("import sys, gblr; gblr.from_pretrained; gblr.save_sentence_transformer; "
            "print([m for m in ('transformers', 'sentence_transformers') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"
