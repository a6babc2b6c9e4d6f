"""The token embedding of a compressed model: which one, whether it may change, its record.

``gblr.compress`` factorizes a model's input token embedding (``get_input_embeddings()`` of
a ``transformers`` model) into a :class:`~gblr.layers.LowRankEmbedding` at a budget that is
a fraction of its parameters, weighting each token by how often the calibration text uses
it. An embedding that must stay as it is is left dense with the reason
(:func:`input_embedding` lists them).
"""

from __future__ import annotations

import time

import torch
from torch import nn

from gblr.convert.report import LayerRecord
from gblr.layers.embedding import LowRankEmbedding, embedding_rank

__all__ = ["EMBEDDING_KIND", "input_embedding", "project_embedding"]

#: Kind recorded for a factorized embedding (beside "linear", "conv1d" and "conv2d").
EMBEDDING_KIND = "embedding"


def input_embedding(model: nn.Module, budget: float) -> tuple[str | None, str | None]:
    """``(name, None)`` of the model's input token embedding when it can be factorized at
    ``budget``, ``(name, why not)`` when it must stay dense, ``(None, None)`` without one.

    It stays dense when its class changes the lookup (a scaled embedding), its weight is
    tied to the output head or shared with another module, it uses ``max_norm``, sparse or
    frequency-scaled gradients, or not even rank 1 fits ``budget``. A model whose
    ``get_input_embeddings`` is not implemented has none.
    """
    getter = getattr(model, "get_input_embeddings", None)
    try:
        embedding = getter() if callable(getter) else None
    except (NotImplementedError, AttributeError):
        embedding = None
    if not isinstance(embedding, nn.Embedding):
        return None, None
    paths = [n for n, m in model.named_modules(remove_duplicate=False) if m is embedding]
    if not paths:
        return None, None
    name = paths[0]
    if type(embedding).forward is not nn.Embedding.forward:
        return name, (f"its class {type(embedding).__name__} changes the lookup (a scale, "
                      "say), which the factors would not")
    own = {f"{p}.weight" for p in paths}
    shared = [n for n, p in model.named_parameters(remove_duplicate=False)
              if p is embedding.weight and n not in own]
    if shared:
        out_getter = getattr(model, "get_output_embeddings", None)
        head = out_getter() if callable(out_getter) else None
        if head is not None and getattr(head, "weight", None) is embedding.weight:
            return name, "its weight is tied to the output head, which stays dense"
        return name, (f"its weight is shared with {shared[0].removesuffix('.weight')}, "
                      "which stays as it is")
    if embedding.max_norm is not None:
        return name, "it renormalises looked-up rows (max_norm), which factors cannot"
    if embedding.sparse or embedding.scale_grad_by_freq:
        return name, "it takes sparse or frequency-scaled gradients"
    if embedding_rank(embedding.num_embeddings, embedding.embedding_dim, budget) == 0:
        return name, f"budget {budget} is too small for rank 1"
    return name, None


def project_embedding(name: str, embedding: nn.Embedding, budget: float,
                      counts: torch.Tensor | None) -> tuple[LowRankEmbedding, LayerRecord]:
    """The factorized embedding at ``budget`` (token ``counts`` weight the fit) and its
    record (``dense_cost`` 0: a lookup; ``cost`` the ``R * d`` MACs per token it adds)."""
    start = time.perf_counter()
    weight = embedding.weight.detach()
    new = LowRankEmbedding.from_dense(weight.float(), budget, frequencies=counts,
                                      padding_idx=embedding.padding_idx)
    with torch.no_grad():
        rel = float(torch.linalg.norm(new.to_dense() - weight.float())
                    / torch.linalg.norm(weight.float()).clamp_min(1e-30))
    seconds = time.perf_counter() - start
    new = new.to(device=weight.device, dtype=weight.dtype).train(embedding.training)
    record = LayerRecord(
        name=name, kind=EMBEDDING_KIND, in_features=embedding.num_embeddings,
        out_features=embedding.embedding_dim, structure=new.structure_name, budget=budget,
        dense_cost=0, cost=new.macs(), params=new.params(), dense_params=weight.numel(),
        rel_error=rel, seconds=seconds,
    )
    return new, record
