"""A trained-like GBLR layer for benchmarks: SVD start, then widths shrunk to a budget.

Stands in for the projection search (SPEC section 5) until it is available: all
``min(in, out)`` components start full width from the SVD of a target matrix, then
Adam on factors, widths and locations fits the target while a proximal L1 step pulls
the widths down (its strength steered from the measured evaluation-mode cost) until
the layer's cost is within the budget; the structure is then frozen and the factors
fine-tuned. The result has components of many widths at many locations, as in training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gblr.cost import budget_to_macs, check_budget
from gblr.layers.gblr import GBLRLinear

__all__ = ["structured_target", "shrink_to_budget"]


def structured_target(out_features: int, in_features: int, seed: int = 0) -> torch.Tensor:
    """A dense matrix with a decaying spectrum (``s_i ~ i^-0.5``), like a trained weight."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(out_features, in_features, generator=g, dtype=torch.float64)
    u, _, vh = torch.linalg.svd(a, full_matrices=False)
    s = torch.arange(1, u.shape[1] + 1, dtype=torch.float64) ** -0.5
    return ((u * s) @ vh).float() / s.norm()


def shrink_to_budget(
    weight: torch.Tensor,
    budget: float,
    shrink_steps: int = 200,
    finetune_steps: int = 50,
    lr: float = 3e-3,
    structure_lr: float = 1e-2,
    progress: bool = False,
) -> GBLRLinear:
    """Fit a GBLR layer to ``weight`` while shrinking its widths to ``budget`` of dense cost."""
    from tqdm import tqdm

    check_budget(budget)
    out_f, in_f = weight.shape
    target = weight.float()
    limit = budget_to_macs(budget, in_f, out_f)
    layer = GBLRLinear(in_f, out_f, bias=False, init="random")
    k = layer.num_components
    with torch.no_grad():
        u, s, vh = torch.linalg.svd(target.double(), full_matrices=False)
        root = s[:k].sqrt()
        layer.U.copy_(u[:, :k] * root)
        layer.V.copy_(root[:, None] * vh[:k])
        layer.widths.fill_(1.0)
        layer.locations.copy_((torch.arange(k) / k).expand(2, k))
    factors = [layer.U, layer.V]
    structure = [layer.widths, layer.locations]
    # Adam steps have the size of the learning rate: scale it to the factors' entries
    factor_lr = lr * float(layer.U.detach().pow(2).mean().sqrt())
    opt = torch.optim.Adam(factors, lr=factor_lr)
    # structure: SGD on globally normalised gradients, so that components that matter
    # resist the shrink more than those that do not (a per-entry Adam would move all alike)
    opt_s = torch.optim.SGD(structure, lr=structure_lr)
    norm = target.pow(2).sum()
    lam = 0.1
    start_cost = layer.flops()
    bar = tqdm(range(2 * shrink_steps), desc="shrink", disable=not progress, mininterval=5)
    for step in bar:
        loss = F.mse_loss(layer.to_dense(), target, reduction="sum") / norm
        opt.zero_grad()
        opt_s.zero_grad()
        loss.backward()
        for p in structure:
            p.grad.div_(p.grad.abs().mean().clamp_min(1e-12))
        opt.step()
        opt_s.step()
        cost = layer.flops()
        with torch.no_grad():
            layer.widths.copy_(F.softshrink(layer.widths, lam * structure_lr).clamp(0.0, 1.0))
            layer.locations.remainder_(1.0)
        # follow a linear path from the starting cost to the budget over shrink_steps
        scheduled = max(limit, start_cost + (limit - start_cost) * (step + 1) / shrink_steps)
        lam = lam * 1.1 if cost > scheduled else lam * 0.8
        bar.set_postfix(loss=f"{loss.item():.4f}", cost=f"{cost / (in_f * out_f):.3f}")
        if layer.flops() <= limit:
            break
    # freeze the structure at the budget and fit the factors to it
    while layer.flops() > limit:
        with torch.no_grad():
            layer.widths.sub_(1.0 / max(in_f, out_f)).clamp_(0.0, 1.0)
    for p in structure:
        p.requires_grad_(False)
    opt = torch.optim.Adam(factors, lr=factor_lr)
    for _ in range(finetune_steps):
        loss = F.mse_loss(layer.to_dense(), target, reduction="sum") / norm
        opt.zero_grad()
        loss.backward()
        opt.step()
    for p in structure:
        p.requires_grad_(True)
    return layer.eval()
