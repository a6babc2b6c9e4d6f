"""gblr.compress never breaks a tie silently: shared modules and shared weights are
compressed once and stay shared; a weight tied to a module that is not compressed (an
embedding, an excluded layer) is left dense, with a warning and a report entry."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import tiny_gpt2
from torch import nn

from gblr.convert import CompressionConfig, compress
from gblr.convert.select import select_layers
from gblr.layers.base import StructuredLinear

IDS = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))


def plain_config(**changes) -> CompressionConfig:
    return CompressionConfig.preset("weights-only", **changes)


def _shared(a: nn.Module, b: nn.Module) -> set[str]:
    """Names of the parameters ``a`` and ``b`` hold as the same tensor."""
    pb = dict(b.named_parameters())
    return {n for n, p in a.named_parameters() if n in pb and pb[n] is p}


class Twice(nn.Module):
    """One linear registered under two names (``a`` and ``b``), then a head ``c``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(16, 16)
        self.b = self.a
        self.c = nn.Linear(16, 8)

    def forward(self, x):
        return self.c(self.b(torch.relu(self.a(x))))


class SharedWeight(nn.Module):
    """Two distinct linears holding one weight tensor (own biases), and a third one."""

    def __init__(self, same_bias: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(16, 16)
        self.b = nn.Linear(16, 16)
        self.b.weight = self.a.weight
        if same_bias:
            self.b.bias = self.a.bias
        self.c = nn.Linear(16, 8)

    def forward(self, x):
        return self.c(self.b(torch.relu(self.a(x))))


# -- GPT-2: lm_head is tied to the token embedding ----------------------------------------------
def test_gpt2_all_linear_leaves_the_tied_head_alone():
    model = tiny_gpt2(head=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about: the head is not targeted
        report = compress(model, plain_config(budget=0.5), progress=False).report
    # the token embedding, tied to the head, stays whole too (said in the report)
    assert report.skipped == {
        "transformer.wte": "its weight is tied to the output head, which stays dense"}
    assert isinstance(model.transformer.wte, nn.Embedding)
    assert isinstance(model.lm_head, nn.Linear)
    assert model.lm_head.weight is model.transformer.wte.weight


@pytest.mark.parametrize("target", [
    ["c_attn", "lm_head"],
    lambda name, module: isinstance(module, nn.Linear) or name.endswith("c_attn"),
])
def test_gpt2_head_tied_to_the_embedding_is_skipped_with_a_reason(target):
    model = tiny_gpt2(head=True)
    with pytest.warns(UserWarning, match=r"lm_head.*tied.*transformer\.wte"):
        report = compress(model, plain_config(budget=0.5, target_modules=target),
                          progress=False).report
    assert set(report.skipped) == {"lm_head", "transformer.wte"}
    assert "transformer.wte" in report.skipped["lm_head"]
    assert "Embedding" in report.skipped["lm_head"]
    assert "lm_head" not in [r.name for r in report.layers]
    assert isinstance(model.lm_head, nn.Linear)
    assert model.lm_head.weight is model.transformer.wte.weight  # the tie is kept
    assert isinstance(model.transformer.h[0].attn.c_attn, StructuredLinear)
    model(input_ids=IDS)


def test_gpt2_only_the_tied_head_targeted_is_an_error_naming_the_tie():
    model = tiny_gpt2(head=True)
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"lm_head.*tied.*transformer\.wte"):
        compress(model, plain_config(budget=0.5, target_modules="lm_head"), progress=False)
    assert isinstance(model.lm_head, nn.Linear)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[n], after[n]) for n in before)


# -- one module under two names ----------------------------------------------------------------
def test_a_module_under_two_names_is_replaced_under_both():
    model = Twice()
    x = torch.randn(5, 16)
    report = compress(model, plain_config(budget=0.5), progress=False).report
    assert isinstance(model.a, StructuredLinear)
    assert model.a is model.b  # one compressed module, registered under both names
    assert [r.name for r in report.layers] == ["a", "c"]
    assert report.skipped == {}
    assert torch.allclose(model(x), model.c(model.a(torch.relu(model.a(x)))))


def test_a_module_can_be_targeted_by_either_name():
    model = Twice()
    assert list(select_layers(model, "b")) == ["a"]
    compress(model, plain_config(budget=0.5, target_modules="b"), progress=False)
    assert isinstance(model.a, StructuredLinear) and model.a is model.b
    assert isinstance(model.c, nn.Linear)


def test_a_module_excluded_under_one_name_stays_dense_under_both():
    model = Twice()
    compress(model, plain_config(budget=0.5, exclude_modules=["b"]), progress=False)
    assert isinstance(model.a, nn.Linear) and model.a is model.b
    assert isinstance(model.c, StructuredLinear)


# -- two modules sharing one weight tensor -----------------------------------------------------
@pytest.mark.parametrize("same_bias", [False, True])
def test_linears_sharing_a_weight_share_one_factorisation(same_bias, monkeypatch):
    model = SharedWeight(same_bias)
    x = torch.randn(5, 16)
    old_b_bias = model.b.bias.detach().clone()
    calls = []
    cls = __import__("gblr").get_structure("lowrank")
    original = cls.from_dense.__func__

    def counting(klass, weight, budget, **kwargs):
        calls.append(tuple(weight.shape))
        return original(klass, weight, budget, **kwargs)

    monkeypatch.setattr(cls, "from_dense", classmethod(counting))
    report = compress(model, plain_config(structure="lowrank", budget=0.5),
                      progress=False).report
    assert calls == [(16, 16), (8, 16)]  # a and b: one projection; c: one
    a, b = model.a, model.b
    assert isinstance(a, StructuredLinear) and isinstance(b, StructuredLinear)
    assert a is not b
    shared = _shared(a, b)
    assert {n for n, _ in a.named_parameters() if n != "bias"} <= shared
    assert ("bias" in shared) == same_bias
    torch.testing.assert_close(b.bias.detach(), old_b_bias)
    torch.testing.assert_close(b(x), x @ a.to_dense().T + old_b_bias)
    assert [r.name for r in report.layers] == ["a", "b", "c"]
    rb = report.layers[1]
    assert rb.cost == a.macs()
    assert rb.params == (0 if same_bias else 16)  # b adds only its own bias
    # training one updates the other
    with torch.no_grad():
        next(p for n, p in a.named_parameters() if n != "bias").mul_(2.0)
    torch.testing.assert_close(b(x), x @ a.to_dense().T + b.bias)


def test_shared_weight_takes_the_smaller_budget_of_the_two():
    model = SharedWeight()
    cfg = plain_config(structure="lowrank", budget=0.5, overrides={"b": {"budget": 0.25}})
    report = compress(model, cfg, progress=False).report
    assert model.a.macs() == model.b.macs() <= 0.25 * 256
    assert {r.name: r.budget for r in report.layers}["a"] == 0.25


def test_shared_weight_with_conflicting_settings_is_an_error():
    model = SharedWeight()
    cfg = plain_config(structure="lowrank", budget=0.5,
                       overrides={"b": {"structure": "monarch"}})
    with pytest.raises(ValueError, match="'a' and 'b' share"):
        compress(model, cfg, progress=False)
    assert all(isinstance(m, nn.Linear) for m in (model.a, model.b, model.c))


def test_weight_shared_with_an_excluded_layer_is_skipped_with_a_reason():
    model = SharedWeight()
    with pytest.warns(UserWarning, match=r"'a'.*tied.*'b'"):
        report = compress(model, plain_config(budget=0.5, exclude_modules=["b"]),
                          progress=False).report
    assert set(report.skipped) == {"a"}
    assert "'b'" in report.skipped["a"]
    assert isinstance(model.a, nn.Linear) and model.b.weight is model.a.weight
    assert isinstance(model.c, StructuredLinear)


# -- nothing half done -------------------------------------------------------------------------
def test_a_failing_layer_leaves_the_model_as_it_was():
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2))
    first = model[0]
    # the first layer is projected, then the last fails: at budget 0.05 not even rank 1
    # of its 2x32 weight fits
    cfg = plain_config(structure="lowrank", budget=0.5, overrides={"2": {"budget": 0.05}})
    with pytest.raises(ValueError, match="layer '2'.*too small"):
        compress(model, cfg, progress=False)
    assert model[0] is first and isinstance(model[2], nn.Linear)


# -- ties survive save and load ----------------------------------------------------------------
@pytest.mark.parametrize("trainable", [False, True])
@pytest.mark.parametrize("make", [Twice, SharedWeight])
def test_ties_survive_save_and_load(make, trainable, tmp_path):
    from gblr.convert import load_compressed, save_compressed

    model = make()
    compress(model, plain_config(budget=0.5), progress=False)
    model.eval()
    x = torch.randn(5, 16)
    save_compressed(model, tmp_path / "m", trainable=trainable)
    again = load_compressed(make(), tmp_path / "m").eval()
    assert torch.equal(again(x), model(x))
    if make is Twice:
        assert again.a is again.b and isinstance(again.a, StructuredLinear)
    else:
        assert _shared(again.a, again.b)  # the factorisation is still one set of tensors
