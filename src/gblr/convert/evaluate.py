"""How close a compressed model stays to the original: embedding cosine, neighbour agreement."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gblr.convert.text import encode
from gblr.layers.base import StructuredLinear

__all__ = [
    "last_hidden",
    "mean_pool",
    "pooled_embeddings",
    "sentence_embeddings",
    "neighbour_agreement",
    "compare_embeddings",
]


def last_hidden(outputs: Any) -> torch.Tensor:
    """The last hidden state of a model's outputs (HF ``ModelOutput``, tuple or tensor)."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    hidden = getattr(outputs, "last_hidden_state", None)
    if hidden is None and getattr(outputs, "hidden_states", None) is not None:
        hidden = outputs.hidden_states[-1]
    if hidden is None and isinstance(outputs, tuple | list) and outputs:
        hidden = outputs[0]
    if not isinstance(hidden, torch.Tensor):
        raise TypeError(
            f"cannot find a last hidden state in model outputs of type {type(outputs).__name__}"
        )
    return hidden


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token vectors over non-padding positions: ``(batch, dim)``."""
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)


@contextmanager
def dense_weights(model: nn.Module) -> Iterator[None]:
    """Within the block, structured linear layers apply their evaluation-mode matrix,
    materialized once, instead of rebuilding masks on every call (same outputs up to
    rounding; only for inference)."""
    patched = []
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, StructuredLinear):
                was = m.training
                m.eval()
                weight = m.to_dense()
                m.train(was)
                m.forward = partial(F.linear, weight=weight, bias=m.bias)
                patched.append(m)
    try:
        yield
    finally:
        for m in patched:
            del m.forward


@torch.no_grad()
def pooled_embeddings(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Mean-pooled last hidden states (evaluation mode) over ``batches`` of model inputs.

    Positions where a batch's ``attention_mask`` is 0 are left out; without a mask
    (image models) every token counts.
    """
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        with dense_weights(model):
            chunks = [_pooled(model, batch, device) for batch in batches]
        return torch.cat(chunks)
    finally:
        model.train(was_training)


def _pooled(model: nn.Module, batch: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
    batch = {k: v.to(device) for k, v in batch.items()}
    hidden = last_hidden(model(**batch)).float()
    mask = batch.get("attention_mask")
    if mask is None:
        mask = torch.ones(hidden.shape[:2], device=hidden.device)
    return mean_pool(hidden, mask).cpu()


def sentence_embeddings(
    model: nn.Module, tokenizer: Any, texts: Sequence[str], batch_size: int = 32,
    max_length: int = 128,
) -> torch.Tensor:
    """Mean-pooled last-layer embeddings of ``texts`` (evaluation mode), ``(len(texts), dim)``."""
    return pooled_embeddings(model, (encode(tokenizer, texts[i:i + batch_size], max_length)
                                     for i in range(0, len(texts), batch_size)))


def neighbour_agreement(reference: torch.Tensor, other: torch.Tensor, k: int = 10) -> float:
    """Mean fraction of each item's ``k`` nearest neighbours (cosine, self excluded) shared."""
    n = reference.shape[0]
    if n < 2:
        raise ValueError("neighbour agreement needs at least 2 items")
    k = min(k, n - 1)

    def top(x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(x.double(), dim=1)
        sim = x @ x.t()
        sim.fill_diagonal_(-float("inf"))
        return sim.topk(k, dim=1).indices

    a, b = top(reference), top(other)
    shared = (a.unsqueeze(2) == b.unsqueeze(1)).any(2).sum(1).double()
    return float((shared / k).mean())


def compare_embeddings(
    reference: torch.Tensor, other: torch.Tensor, k: int = 10
) -> dict[str, float]:
    """``{"cosine": mean cosine of paired embeddings, "neighbours": top-k agreement}``."""
    cosine = F.cosine_similarity(reference.double(), other.double(), dim=1).mean()
    return {"cosine": float(cosine), "neighbours": neighbour_agreement(reference, other, k)}
