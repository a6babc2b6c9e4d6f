"""Fine-tuning after projection: distil the compressed model towards the dense teacher.

The student learns its factors and, for GBLR layers, its structure (widths and
locations); after every optimizer step :func:`project_widths_to_budget` shrinks all
widths by one common amount, just enough that the evaluation-mode cost of the
compressed layers stays within the budget.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from gblr.convert.evaluate import last_hidden, mean_pool
from gblr.cost import INPUT_AXIS, OUTPUT_AXIS, check_positive
from gblr.layers.base import StructuredLinear
from gblr.layers.conv import GBLRConv2d

__all__ = [
    "DistillResult",
    "distill",
    "structured_cost",
    "project_widths_to_budget",
    "LOSSES",
]

#: What the student matches: every hidden state, the mean-pooled embedding, or both.
LOSSES = ("hidden", "embedding", "both")


def _has_structure(layer: nn.Module) -> bool:
    return isinstance(layer, StructuredLinear) and hasattr(layer, "widths") and hasattr(
        layer, "locations"
    )


def _box_cost(
    widths: torch.Tensor, locations: torch.Tensor, n_in: int, n_out: int, rank: int
) -> int:
    """Evaluation-mode cost of one GBLR layer from its (rounded) boxes.

    A component more than one index wide on both axes is on; components with the same box
    are one block costing ``min(sum of ranks * (h + w), h * w)`` (the rule of ``flops()``).
    """
    w = widths.clamp(0.0, 1.0)
    cols = torch.round(w[INPUT_AXIS] * n_in).long()
    rows = torch.round(w[OUTPUT_AXIS] * n_out).long()
    on = (cols > 1) & (rows > 1)
    if not bool(on.any()):
        return 0
    loc = torch.remainder(locations, 1.0)
    col_at = torch.remainder(torch.round(loc[INPUT_AXIS] * n_in).long(), n_in)
    row_at = torch.remainder(torch.round(loc[OUTPUT_AXIS] * n_out).long(), n_out)
    col_at = torch.where(cols >= n_in, 0, col_at)  # a full axis starts anywhere
    row_at = torch.where(rows >= n_out, 0, row_at)
    keys = torch.stack([cols, col_at, rows, row_at], dim=1)[on]
    boxes, inverse = torch.unique(keys, dim=0, return_inverse=True)
    group_rank = torch.zeros(boxes.shape[0], dtype=torch.long).index_add_(
        0, inverse, torch.full((keys.shape[0],), int(rank), dtype=torch.long))
    h, wd = boxes[:, 2], boxes[:, 0]
    return int(torch.minimum(group_rank * (h + wd), h * wd).sum())


def structured_cost(model: nn.Module) -> tuple[int, int]:
    """``(cost, dense cost)`` in MACs per token of the model's structured layers (eval mode)."""
    layers = [m for m in model.modules() if isinstance(m, StructuredLinear)]
    return sum(int(m.flops()) for m in layers), sum(m.dense_flops() for m in layers)


@torch.no_grad()
def project_widths_to_budget(layers: Iterable[StructuredLinear], max_cost: float) -> float:
    """Shrink the widths of GBLR ``layers`` so that their summed cost is ``<= max_cost``.

    Widths are clamped to ``[0, 1]`` and locations wrapped into ``[0, 1)``; then, if the
    evaluation-mode cost (from the rounded boxes, identical boxes merged as ``flops()``
    does) exceeds ``max_cost``, every width becomes ``clamp(w - tau, 0, 1)`` with the
    smallest ``tau`` (found by bisection) that meets it. Returns ``tau``. This is the
    budget projection used during distillation; ``max_cost`` covers these layers only.
    """
    layers = [m for m in layers if _has_structure(m)]
    for m in layers:
        m.widths.clamp_(0.0, 1.0)
        m.locations.remainder_(1.0)
    if not layers:
        return 0.0
    # on the CPU in float32, as the layers round them
    start = [m.widths.detach().float().cpu() for m in layers]
    where = [m.locations.detach().float().cpu() for m in layers]

    def cost(tau: float) -> float:
        return float(sum(
            _box_cost((w - tau).clamp(0.0, 1.0), loc, m.in_features, m.out_features,
                      m.rank_per_component)
            for m, w, loc in zip(layers, start, where, strict=True)
        ))

    if cost(0.0) <= max_cost:
        return 0.0
    lo, hi = 0.0, 1.0
    if cost(hi) > max_cost:
        raise ValueError(f"max_cost={max_cost} cannot be met even with every component off")
    for _ in range(30):
        mid = 0.5 * (lo + hi)
        if cost(mid) <= max_cost:
            hi = mid
        else:
            lo = mid
    for m, w in zip(layers, start, strict=True):
        m.widths.copy_((w - hi).clamp(0.0, 1.0).to(device=m.widths.device, dtype=m.widths.dtype))
    return hi


def _outputs(model: nn.Module, batch: dict[str, torch.Tensor], hidden: bool) -> Any:
    if hidden:
        return model(**batch, output_hidden_states=True)
    return model(**batch)


def _loss(student: Any, teacher: Any, mask: torch.Tensor, kind: str) -> torch.Tensor:
    terms = []
    if kind in ("hidden", "both"):
        s_states = getattr(student, "hidden_states", None) or (last_hidden(student),)
        t_states = getattr(teacher, "hidden_states", None) or (last_hidden(teacher),)
        m = mask.unsqueeze(-1).to(s_states[-1].dtype)
        per_layer = [
            (((s - t) ** 2) * m).sum() / (((t ** 2) * m).sum().clamp_min(1e-12))
            for s, t in zip(s_states[1:] or s_states, t_states[1:] or t_states, strict=True)
        ]
        terms.append(torch.stack(per_layer).mean())
    if kind in ("embedding", "both"):
        s_emb = mean_pool(last_hidden(student).float(), mask)
        t_emb = mean_pool(last_hidden(teacher).float(), mask)
        terms.append((1.0 - F.cosine_similarity(s_emb, t_emb, dim=1)).mean())
    return torch.stack(terms).sum()


@dataclass
class DistillResult:
    """What a distillation run did: steps, time, losses and cost at the end."""

    steps: int
    seconds: float
    losses: list[float] = field(default_factory=list)
    cost: int = 0
    dense_cost: int = 0

    @property
    def cost_fraction(self) -> float:
        return self.cost / self.dense_cost if self.dense_cost else 0.0


def distill(
    student: nn.Module,
    teacher: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    steps: int | None = None,
    minutes: float | None = None,
    budget: float | None = None,
    loss: str = "both",
    lr: float = 1e-4,
    structure_lr: float = 1e-3,
    weight_decay: float = 0.0,
    progress: bool = True,
) -> DistillResult:
    """Train ``student`` to reproduce ``teacher`` on text batches, holding the budget.

    ``batches`` yields dicts of model inputs (text with an ``attention_mask``, or
    ``pixel_values`` for image models). Runs ``steps``
    optimizer steps, or as many as fit in ``minutes`` (the first limit reached when both
    are given). ``loss`` picks the target: normalised error of every hidden state,
    ``1 - cosine`` of mean-pooled embeddings, or their sum. Dropout is off. All student
    parameters train; widths and locations in their own group (Adam betas ``(0, 0.999)``, no weight
    decay, ``structure_lr``). ``budget`` (default: the student's cost fraction at the start)
    is held on the structured layers after every step by :func:`project_widths_to_budget`.
    """
    if steps is None and minutes is None:
        raise ValueError("give steps or minutes (or both) to bound the distillation")
    if steps is not None:
        check_positive("steps", steps)
    if minutes is not None and not (float(minutes) > 0 and math.isfinite(float(minutes))):
        raise ValueError(f"minutes must be a positive number, got {minutes!r}")
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    structured = [m for m in student.modules() if isinstance(m, StructuredLinear)]
    if not structured:
        raise ValueError("student has no structured layers; compress it first")
    cost0, dense = structured_cost(student)
    if budget is None:
        budget = cost0 / dense
    learnable = [m for m in structured if _has_structure(m)]
    fixed_cost = sum(int(m.flops()) for m in structured if not _has_structure(m))
    max_cost = budget * dense - fixed_cost
    structure_params = [p for m in learnable for p in (m.widths, m.locations)]
    ids = {id(p) for p in structure_params}
    weights = [p for p in student.parameters() if id(p) not in ids and p.requires_grad]
    groups = [{"params": weights, "lr": lr, "weight_decay": weight_decay}]
    if structure_params:
        groups.append({"params": structure_params, "lr": structure_lr, "weight_decay": 0.0,
                       "betas": (0.0, 0.999)})
    optimizer = torch.optim.AdamW(groups)
    project_widths_to_budget(learnable, max_cost)

    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    was_training = student.training
    # dropout off (the student should match the teacher's deterministic outputs), while the
    # structured layers train so that components that are off can grow back
    student.eval()
    for m in student.modules():
        if isinstance(m, StructuredLinear | GBLRConv2d):
            m.train()
    device = next(student.parameters()).device
    deadline = None if minutes is None else time.perf_counter() + 60.0 * float(minutes)
    start = time.perf_counter()
    losses: list[float] = []
    iterator: Iterator[dict[str, torch.Tensor]] = iter(batches)
    bar = tqdm(total=steps, desc="distil", unit="step", disable=not progress)
    want_hidden = loss in ("hidden", "both")
    step = 0
    try:
        while (steps is None or step < steps) and (
            deadline is None or time.perf_counter() < deadline
        ):
            try:
                batch = next(iterator)
            except StopIteration:
                break
            batch = {k: v.to(device) for k, v in batch.items()}
            with torch.no_grad():
                t_out = _outputs(teacher, batch, want_hidden)
            s_out = _outputs(student, batch, want_hidden)
            mask = batch.get("attention_mask")
            if mask is None:  # images: every token counts
                mask = torch.ones(last_hidden(t_out).shape[:2], device=device)
            value = _loss(s_out, t_out, mask, loss)
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            optimizer.step()
            project_widths_to_budget(learnable, max_cost)
            losses.append(float(value.detach()))
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
    finally:
        bar.close()
        student.train(was_training)
    cost, dense = structured_cost(student)
    if cost > budget * dense * (1 + 1e-9):
        raise RuntimeError(f"budget not held: cost {cost} > {budget} * {dense}")
    return DistillResult(steps=step, seconds=time.perf_counter() - start, losses=losses,
                         cost=cost, dense_cost=dense)
