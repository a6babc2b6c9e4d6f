"""gblr.compress factorizes the token embedding: which one, at what budget, from what data."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import tiny_bert, tiny_gpt2
from torch import nn

from gblr.convert import CompressionConfig, compress, load_compressed, save_compressed
from gblr.convert.calibrate import capture_token_counts
from gblr.convert.distill import distill
from gblr.layers import LowRankEmbedding

IDS = torch.randint(1, 100, (4, 12), generator=torch.Generator().manual_seed(0))
BATCHES = [{"input_ids": IDS, "attention_mask": torch.ones_like(IDS)}]


def weights_only(**changes) -> CompressionConfig:
    return CompressionConfig.preset("weights-only", **changes)


def test_default_factorizes_the_input_embedding_within_the_budget():
    model = tiny_bert()
    dense = model.embeddings.word_embeddings.weight.numel()
    report = compress(model, weights_only(budget=0.4), progress=False).report
    emb = model.embeddings.word_embeddings
    assert isinstance(emb, LowRankEmbedding) and emb.padding_idx == 0
    (record,) = report.embeddings
    assert record.name == "embeddings.word_embeddings" and record.kind == "embedding"
    assert record.params == emb.params() <= 0.4 * dense and record.dense_params == dense
    assert "embedding embeddings.word_embeddings: 100x32 -> rank" in report.table()
    assert report.to_dict()["embeddings"][0]["params"] == record.params
    # position and type embeddings stay as they are
    assert isinstance(model.embeddings.position_embeddings, nn.Embedding)
    model(input_ids=IDS)


def test_embedding_budget_and_switch():
    model = tiny_bert()
    compress(model, weights_only(budget=0.4, embedding_budget=0.2), progress=False)
    emb = model.embeddings.word_embeddings
    assert emb.params() <= 0.2 * 100 * 32 < LowRankEmbedding.from_dense(
        torch.randn(100, 32), 0.4).params()
    kept = tiny_bert()
    report = compress(kept, weights_only(embeddings=False), progress=False).report
    assert isinstance(kept.embeddings.word_embeddings, nn.Embedding) and not report.embeddings


@pytest.mark.parametrize("field, value, error", [
    ("embeddings", "yes", TypeError), ("embedding_budget", 0.0, ValueError),
    ("embedding_budget", 1.5, ValueError),
])
def test_config_checks_the_embedding_fields(field, value, error):
    with pytest.raises(error, match=field):
        CompressionConfig(**{field: value})


def test_token_counts_skip_padding_and_weight_the_fit():
    model = tiny_bert()
    ids = torch.tensor([[5, 5, 5, 7, 0, 0]])
    counts = capture_token_counts(model, "embeddings.word_embeddings", [{"input_ids": ids}])
    assert counts[5] == 3 and counts[7] == 1 and counts[0] == 0 and counts.sum() == 4
    with pytest.raises(ValueError, match="never reached"):
        capture_token_counts(model, "embeddings.word_embeddings", [])
    # data-aware: the tokens of the calibration text come out closer than without data
    table = model.embeddings.word_embeddings.weight.detach().clone()
    used = IDS.unique()
    errors = {}
    for calibrate in (True, False):
        m = tiny_bert()
        config = (CompressionConfig(allocation="uniform", budget=0.3) if calibrate
                  else weights_only(budget=0.3))
        compress(m, config, calibration_data=BATCHES if calibrate else None, progress=False)
        with torch.no_grad():
            errors[calibrate] = float(
                (m.embeddings.word_embeddings.to_dense() - table)[used].norm())
    assert errors[True] < errors[False]


def test_embedding_tied_to_the_head_stays_dense_and_bare_decoder_factorizes():
    lm = tiny_gpt2(head=True)
    report = compress(lm, weights_only(), progress=False).report
    assert "transformer.wte" in report.skipped and not report.embeddings
    assert lm.lm_head.weight is lm.transformer.wte.weight
    body = tiny_gpt2()
    compress(body, weights_only(), progress=False)
    assert isinstance(body.wte, LowRankEmbedding)


def test_a_failed_embedding_step_undoes_everything(monkeypatch):
    import gblr.convert.replace as replace_module

    model = tiny_bert()
    before = {n: type(m) for n, m in model.named_modules()}

    def broken(*args, **kwargs):
        raise RuntimeError("projection failed")

    monkeypatch.setattr(replace_module, "project_embedding", broken)
    with pytest.raises(RuntimeError, match="projection failed"):
        compress(model, weights_only(), progress=False)
    assert {n: type(m) for n, m in model.named_modules()} == before


def test_save_load_and_distillation_train_the_factors(tmp_path):
    model = tiny_bert()
    teacher = copy.deepcopy(model)
    compress(model, weights_only(budget=0.5), progress=False)
    codes = model.embeddings.word_embeddings.codes.detach().clone()
    distill(model, teacher, BATCHES * 3, steps=3, progress=False)
    assert not torch.equal(model.embeddings.word_embeddings.codes, codes)
    model.eval()
    save_compressed(model, tmp_path / "c")
    again = load_compressed(lambda: tiny_bert(seed=3), tmp_path / "c")
    assert isinstance(again.embeddings.word_embeddings, LowRankEmbedding)
    with torch.no_grad():
        assert torch.equal(again(input_ids=IDS).last_hidden_state,
                           model(input_ids=IDS).last_hidden_state)
    # a base whose vocabulary differs is refused
    with pytest.raises(ValueError, match="another architecture"):
        load_compressed(lambda: tiny_bert(vocab=120), tmp_path / "c")


class _Scaled(nn.Embedding):
    def forward(self, ids):
        return super().forward(ids) * 4.0


class _Encoder(nn.Module):
    """A model with an input embedding (T5-like when ``shared``: a second module holds the
    same weight and is the one the forward uses)."""

    def __init__(self, embedding: nn.Embedding | None = None, shared: bool = False,
                 reach: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = embedding if embedding is not None else nn.Embedding(100, 32)
        self.copy = nn.Embedding(100, 32) if shared else None
        if shared:
            self.copy.weight = self.embed.weight
        self.reach = reach
        self.fc = nn.Linear(32, 32)

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None):
        if inputs_embeds is None:
            inputs_embeds = (self.copy or self.embed)(input_ids)
        return self.fc(inputs_embeds)


@pytest.mark.parametrize("model, reason", [
    (lambda: _Encoder(_Scaled(100, 32)), "changes the lookup"),
    (lambda: _Encoder(shared=True), "shared with copy"),
    (lambda: _Encoder(nn.Embedding(100, 32, max_norm=1.0)), "max_norm"),
    (lambda: _Encoder(nn.Embedding(100, 32, sparse=True)), "sparse"),
    (lambda: _Encoder(nn.Embedding(100, 32, scale_grad_by_freq=True)), "frequency-scaled"),
])
def test_embeddings_that_must_stay_whole_are_left_with_a_reason(model, reason):
    m = model()
    before = type(m.embed)
    report = compress(m, weights_only(), progress=False).report
    assert type(m.embed) is before and not report.embeddings
    assert reason in report.skipped["embed"]
    assert isinstance(m.fc, nn.Module) and len(report.layers) == 1


def test_too_small_a_budget_and_unreached_embeddings_are_left_with_a_reason():
    m = _Encoder()
    report = compress(m, weights_only(embedding_budget=0.005), progress=False).report
    assert "too small for rank 1" in report.skipped["embed"]
    # batches that bypass the embedding: it stays whole, the linear layers are compressed
    m = _Encoder()
    feats = [{"inputs_embeds": torch.randn(2, 5, 32)}]
    report = compress(m, CompressionConfig(allocation="uniform"), calibration_data=feats,
                      progress=False).report
    assert "never reach it" in report.skipped["embed"] and len(report.layers) == 1
    assert isinstance(m.embed, nn.Embedding)


def test_token_counts_leave_out_masked_positions():
    model = tiny_bert()
    ids = torch.tensor([[5, 6, 7, 8]])
    batch = {"input_ids": ids, "attention_mask": torch.tensor([[1, 1, 0, 0]])}
    counts = capture_token_counts(model, "embeddings.word_embeddings", [batch])
    assert counts[5] == counts[6] == 1 and counts[7] == counts[8] == 0


def test_command_flags_reach_the_config():
    from gblr.convert.cli import parse_args
    from gblr.convert.options import config_changes

    changes = config_changes(parse_args(["--no-embeddings", "--embedding-budget", "0.3"]))
    assert changes["embeddings"] is False and changes["embedding_budget"] == 0.3
    defaults = config_changes(parse_args([]))
    assert defaults["embeddings"] is True and defaults["embedding_budget"] is None
