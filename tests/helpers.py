"""Small builders shared by the tests (``tests/`` is on the test path)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gblr import GBLRLinear


def random_layer(n_in, n_out, k, r=1, seed=0, bias=True, dtype=torch.float64):
    """A GBLR layer with random factors and random grid-aligned widths/locations."""
    torch.manual_seed(seed)
    layer = GBLRLinear(n_in, n_out, num_components=k, rank_per_component=r, init="random",
                       bias=bias).to(dtype)
    with torch.no_grad():
        layer.widths.uniform_(0.0, 1.0)
        layer.locations.uniform_(0.0, 1.0)
        if bias:
            layer.bias.normal_()
    return layer.eval()


def shakespeare_available() -> bool:
    """Whether the Shakespeare corpus (``../shared/data/shakespeare``) is there."""
    from gblr.data import shakespeare_dir

    return shakespeare_dir().is_dir()


def transformers():
    """The ``transformers`` module, or a skip of the calling test when it is not installed."""
    return pytest.importorskip("transformers")


def tiny_bert(seed: int = 0, vocab: int = 100) -> nn.Module:
    torch.manual_seed(seed)
    hf = transformers()
    cfg = hf.BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    return hf.BertModel(cfg).eval()


def tiny_gpt2(seed: int = 0, vocab: int = 100, head: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    hf = transformers()
    cfg = hf.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=2,
                        n_positions=64, bos_token_id=0, eos_token_id=0)
    cls = hf.GPT2LMHeadModel if head else hf.GPT2Model
    return cls(cfg).eval()
