"""A trained-like GBLR layer for benchmarks: SVD start, then widths shrunk to a budget.

It imitates what training leaves behind (the projection search, ``gblr.project``, is a
different thing: it finds the best approximation, often low rank plus small blocks): all
``min(in, out)`` components start full width from the SVD of a target matrix, then
Adam on the factors and SGD on widths and locations fit the target while a reweighted
proximal L1 step pulls the widths down (its strength steered from the measured
evaluation-mode cost) until the layer's cost is within the budget; the structure is
then frozen and the factors fine-tuned. The result has components of many widths at many
locations, as in training.
"""

from __future__ import annotations

import torch

from gblr.core.boxes import fit_widths
from gblr.core.budget import budget_to_macs, check_budget
from gblr.layers.blocks import truncated_svd_factors
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
    lr: float = 5e-4,
    structure_lr: float = 1e-2,
    probes: int = 256,
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
        u, v = truncated_svd_factors(target, k)
        layer.U.copy_(u)
        layer.V.copy_(v)
        layer.widths.fill_(1.0)
        layer.locations.copy_((torch.arange(k) / k).expand(2, k))
    factors = [layer.U, layer.V]
    structure = [layer.widths, layer.locations]
    # Adam steps have the size of the learning rate: scale it to the factors' entries
    factor_lr = lr * float(layer.U.detach().pow(2).mean().sqrt())
    opt = torch.optim.Adam(factors, lr=factor_lr)
    # structure: SGD on gradients scaled to a largest entry of 1, so components that matter
    # resist the shrink more than those that do not (a per-entry Adam would move all alike)
    opt_s = torch.optim.SGD(
        [{"params": [layer.widths], "lr": structure_lr},
         {"params": [layer.locations], "lr": structure_lr / 5}]
    )
    gen = torch.Generator().manual_seed(0)

    def probe_loss() -> torch.Tensor:
        # ||(W_hat - W) X||^2 / ||W X||^2 on random probes: unbiased for the relative
        # squared Frobenius error, and cheaper than building W_hat
        x = torch.randn(probes, in_f, generator=gen)
        ref = x @ target.t()
        return (layer(x) - ref).pow(2).sum() / ref.pow(2).sum()

    lam = 0.1
    start_cost = layer.macs()
    bar = tqdm(range(2 * shrink_steps), desc="shrink", disable=not progress, mininterval=5)
    for step in bar:
        loss = probe_loss()
        opt.zero_grad()
        opt_s.zero_grad()
        loss.backward()
        for p in structure:
            p.grad.div_(p.grad.abs().max().clamp_min(1e-12))
        opt.step()
        opt_s.step()
        with torch.no_grad():
            # reweighted L1: a component shrinks in inverse proportion to its energy
            # |u_c| |v_c|, so weak components give way first
            energy = layer.U.norm(dim=0) * layer.V.norm(dim=1)
            energy = energy.view(k, -1).sum(dim=1)
            step_size = lam * structure_lr * energy.mean() / energy.clamp_min(1e-12)
            shrunk = layer.widths - step_size * torch.sign(layer.widths)
            layer.widths.copy_(torch.where(layer.widths.abs() > step_size, shrunk, 0.0))
            layer.widths.clamp_(0.0, 1.0)
            layer.locations.remainder_(1.0)
        cost = layer.macs()
        # follow a linear path from the starting cost to the budget over shrink_steps
        scheduled = max(limit, start_cost + (limit - start_cost) * (step + 1) / shrink_steps)
        lam = lam * 1.1 if cost > scheduled else lam * 0.8
        bar.set_postfix(loss=f"{loss.item():.4f}", cost=f"{cost / (in_f * out_f):.3f}",
                        refresh=False)
        if cost <= limit:
            break
    # freeze the structure at the budget and fit the factors to it
    with torch.no_grad():
        layer.widths.copy_(fit_widths(layer.widths, layer.sharp_macs, limit))
    for p in structure:
        p.requires_grad_(False)
    opt = torch.optim.Adam(factors, lr=5 * factor_lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(finetune_steps, 1))
    for _ in range(finetune_steps):
        loss = probe_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    for p in structure:
        p.requires_grad_(True)
    return layer.eval()
