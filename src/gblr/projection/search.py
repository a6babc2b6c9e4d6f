"""Search for a GBLR structure under an exact budget.

The search keeps a set of candidate GBLR layers that all meet the budget in evaluation
mode, and returns the one with the lowest error:

1. the truncated (or whitened) SVD at the budget, which is a valid GBLR layer;
2. "low rank + sparse blocks" starts: most of the budget in a truncated SVD, the rest in
   dense blocks placed where the residual has the most energy (alternating a few times);
3. gradient descent (Adam) from the SVD start on factors, widths and locations, with the
   masks' Gaussian low-pass annealed from smooth to sharp and an exact-cost projection
   after every step (all widths reduced by one shared threshold until the evaluation-mode
   cost fits);
4. a final refit of the factors with the structure frozen.

Every candidate is scored on the evaluation-mode matrix, so the result's error is never
above the SVD start's.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, fields

import torch

from gblr.core.boxes import fit_widths, integer_boxes
from gblr.core.budget import budget_to_macs, max_rank_for_budget
from gblr.core.progress import progress as progress_bar
from gblr.layers.gblr import GBLRLinear
from gblr.projection.calibration import Calibration, relative_error
from gblr.projection.svd import lowrank_factors

__all__ = ["SearchOptions", "component_boxes", "layer_cost", "fit_to_budget", "search_gblr"]


@dataclass
class SearchOptions:
    """Settings of :func:`search_gblr` (pass them to ``gblr.project`` as keywords).

    Attributes:
        lr_factors: Adam step of the factors, relative to their RMS value.
        lr_structure: Adam step of widths and locations (fractions of the axis).
        sigma_start, sigma_end: the masks' low-pass is annealed geometrically between them
            during the structure search, then removed (sharp boxes).
        refit_steps: Adam steps of the final factor refit with the structure frozen.
        sparse_fractions: budget shares kept by the truncated SVD in the
            "low rank + sparse blocks" starts (one start per share and block size).
        block_sizes: edge (on the smaller axis) of the dense blocks of those starts.
        alternations: SVD / block-selection alternations per such start.
        max_components: cap on the number of rank-1 components, as a multiple of
            ``min(in, out)``.
    """

    lr_factors: float = 0.02
    lr_structure: float = 0.005
    sigma_start: float = 20.0
    sigma_end: float = 400.0
    refit_steps: int = 20
    sparse_fractions: tuple[float, ...] = (0.2, 0.5, 0.65, 0.8)
    block_sizes: tuple[int, ...] = (2,)
    alternations: int = 6
    max_components: float = 64.0

    @classmethod
    def from_kwargs(cls, opts: dict) -> SearchOptions:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(opts) - known)
        if unknown:
            raise TypeError(
                f"unknown projection option(s) {unknown}; known options: {sorted(known)}"
            )
        out = cls(**opts)
        if out.lr_factors <= 0 or out.lr_structure < 0:
            raise ValueError("lr_factors must be > 0 and lr_structure >= 0")
        if not 0 < out.sigma_start <= out.sigma_end:
            raise ValueError("need 0 < sigma_start <= sigma_end")
        if out.refit_steps < 0 or out.alternations < 1:
            raise ValueError("refit_steps must be >= 0 and alternations >= 1")
        if any(not 0 < f < 1 for f in out.sparse_fractions):
            raise ValueError("sparse_fractions must lie in (0, 1)")
        if any(int(b) < 2 for b in out.block_sizes):
            raise ValueError("block_sizes must be integers >= 2")
        return out


# -- structure bookkeeping ---------------------------------------------------------------------
def component_boxes(
    layer: GBLRLinear, widths: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Integer boxes ``(in_len, in_start, out_len, out_start)`` as the forward pass rounds them."""
    return integer_boxes(
        layer.widths if widths is None else widths, layer.locations, layer.in_features,
        layer.out_features,
    )


def layer_cost(layer: GBLRLinear, widths: torch.Tensor | None = None) -> int:
    """Evaluation-mode cost of a layer with sharp masks (``layer.sharp_macs``)."""
    return layer.sharp_macs(widths)


@torch.no_grad()
def fit_to_budget(layer: GBLRLinear, limit: float, iters: int = 30) -> int:
    """Reduce all widths by the smallest shared threshold that brings the cost under ``limit``.

    ``w <- clamp(w - t, 0, 1)`` on both axes (a proximal L1 step with the step found by
    bisection on the exact evaluation-mode cost, :func:`gblr.core.boxes.fit_widths`).
    Returns the resulting cost.
    """
    if layer.sharp_macs() <= limit:
        return layer.sharp_macs()
    layer.widths.copy_(fit_widths(layer.widths, layer.sharp_macs, limit, iters))
    return layer.sharp_macs()


def _build(
    u: torch.Tensor,
    v: torch.Tensor,
    boxes: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    rank_per_component: int,
) -> GBLRLinear:
    out_features, in_features = u.shape[0], v.shape[1]
    i_len, i_start, o_len, o_start = (b.double().cpu() for b in boxes)
    widths = torch.stack([i_len / in_features, o_len / out_features]).float()
    locations = torch.stack([i_start / in_features, o_start / out_features]).float()
    return GBLRLinear._from_components(
        u, v, widths, locations, None, rank_per_component=rank_per_component
    )


# -- objective ---------------------------------------------------------------------------------
class _Objective:
    """Squared relative error, weight-space or data-aware, on a fixed target."""

    def __init__(self, weight: torch.Tensor, calibration: Calibration | None) -> None:
        self.weight = weight
        self.c = None
        if calibration is not None:
            self.c = calibration.second_moment.to(weight.device, weight.dtype)
            self.denom = float(((weight @ self.c) * weight).sum())
        else:
            self.denom = float(weight.pow(2).sum())
        self.denom = max(self.denom, 1e-30)

    def __call__(self, approx: torch.Tensor) -> torch.Tensor:
        d = approx - self.weight
        if self.c is None:
            return d.pow(2).sum() / self.denom
        return ((d @ self.c) * d).sum() / self.denom


def _refit(layer: GBLRLinear, objective: _Objective, steps: int, lr_rel: float) -> None:
    """Adam on the factors with the evaluation-mode masks frozen."""
    if steps <= 0:
        return
    m_in, m_out = layer.eval_masks()
    r = layer.rank_per_component
    m_in = m_in.repeat_interleave(r, 0).to(layer.V.dtype)
    m_out = m_out.repeat_interleave(r, 0).t().to(layer.U.dtype)
    u = (layer.U.detach() * m_out).clone().requires_grad_(True)
    v = (layer.V.detach() * m_in).clone().requires_grad_(True)
    scale = float(torch.cat([u.detach().flatten(), v.detach().flatten()]).pow(2).mean().sqrt())
    opt = torch.optim.Adam([u, v], lr=lr_rel * max(scale, 1e-12))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    best, best_uv = math.inf, None
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = objective((u * m_out) @ (v * m_in))
        if loss.item() < best:
            best, best_uv = loss.item(), (u.detach().clone(), v.detach().clone())
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        final = objective((u * m_out) @ (v * m_in)).item()
        if final < best:
            best_uv = (u.detach(), v.detach())
        layer.U.copy_(best_uv[0] * m_out)
        layer.V.copy_(best_uv[1] * m_in)


# -- starts ------------------------------------------------------------------------------------
def svd_start(
    weight: torch.Tensor,
    budget: float,
    rank_per_component: int,
    calibration: Calibration | None,
    keep_off: bool = True,
) -> GBLRLinear:
    """The truncated (whitened) SVD at ``budget`` as a GBLR layer.

    With ``keep_off`` all ``min(in, out) // r`` components are kept, those beyond the
    budget at width 0 (they cost nothing but can regrow during a search).
    """
    out_features, in_features = weight.shape
    r = rank_per_component
    rank = max_rank_for_budget(in_features, out_features, budget) // r * r
    k = (min(in_features, out_features) // r) if keep_off else rank // r
    u, v = lowrank_factors(weight, k * r, calibration)
    on = rank // r
    zeros = torch.zeros(k, dtype=torch.long)
    full_in = torch.full((k,), in_features, dtype=torch.long)
    full_out = torch.full((k,), out_features, dtype=torch.long)
    idx = torch.arange(k)
    boxes = (
        torch.where(idx < on, full_in, zeros),
        (idx * in_features) // k,
        torch.where(idx < on, full_out, zeros),
        (idx * out_features) // k,
    )
    return _build(u, v, boxes, r)


def _grid(n: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    starts = torch.arange(0, n, size)
    lens = torch.clamp(n - starts, max=size)
    return starts, lens


def sparse_start(
    weight: torch.Tensor,
    budget: float,
    rank_per_component: int,
    calibration: Calibration | None,
    lowrank_share: float,
    block: int,
    alternations: int,
    max_components: int,
) -> GBLRLinear | None:
    """Low rank plus dense blocks on a grid where the residual is largest (None if none fit)."""
    out_features, in_features = weight.shape
    r = rank_per_component
    limit = budget_to_macs(budget, in_features, out_features)
    rank = int(max_rank_for_budget(in_features, out_features, budget) * lowrank_share) // r * r
    if rank < r:
        return None
    mind = min(in_features, out_features)
    bo = max(2, round(block * out_features / mind))
    bi = max(2, round(block * in_features / mind))
    o_starts, o_lens = _grid(out_features, bo)
    i_starts, i_lens = _grid(in_features, bi)
    bh = o_lens[:, None].expand(-1, len(i_lens)).flatten()
    bw = i_lens[None, :].expand(len(o_lens), -1).flatten()
    comps = -(-torch.minimum(bh, bw) // r)  # components of rank r that fill a block
    valid = (bh > 1) & (bw > 1)
    spare = limit - rank * (in_features + out_features)
    spare_comps = max_components - rank // r
    if spare <= 0 or spare_comps <= 0:
        return None
    w = weight.detach().double()
    col_weight = None
    if calibration is not None:
        col_weight = calibration.second_moment.diagonal().to(w.device)
    low = torch.zeros_like(w)
    chosen = None
    for _ in range(alternations):
        resid = w - low
        energy_map = resid.pow(2) if col_weight is None else resid.pow(2) * col_weight
        # block energies on the grid (pad to whole blocks)
        pad = torch.zeros(len(o_lens) * bo, len(i_lens) * bi, dtype=w.dtype, device=w.device)
        pad[:out_features, :in_features] = energy_map
        energy = pad.reshape(len(o_lens), bo, len(i_lens), bi).sum((1, 3)).flatten().cpu()
        cost = (bh * bw).double()
        score = torch.where(valid, energy / cost, torch.full_like(energy, -1.0))
        order = torch.argsort(score, descending=True)
        order = order[valid[order]]
        fits = (cost[order].cumsum(0) <= spare) & (comps[order].cumsum(0) <= spare_comps)
        take = order[fits]
        if take.numel() == 0:
            return None
        chosen = take
        mask = torch.zeros(len(o_lens), len(i_lens), dtype=torch.bool)
        mask.view(-1)[chosen] = True
        full = mask.repeat_interleave(bo, 0).repeat_interleave(bi, 1)[:out_features, :in_features]
        sparse_part = resid * full.to(w.device)
        u, v = lowrank_factors((w - sparse_part).to(weight.dtype), rank, calibration)
        low = (u.double() @ v.double())
    resid = w - low
    n_i = len(i_lens)
    chosen = chosen.to(torch.long)
    rows_idx, cols_idx = chosen // n_i, chosen % n_i
    k_lr = rank // r
    k_blocks = comps[chosen]
    total = k_lr + int(k_blocks.sum())
    dev = w.device
    big_u = torch.zeros(out_features, total * r, dtype=w.dtype, device=dev)
    big_v = torch.zeros(total * r, in_features, dtype=w.dtype, device=dev)
    big_u[:, :rank] = u.double()
    big_v[:rank] = v.double()
    i_len = [torch.full((k_lr,), in_features)]
    i_start = [torch.zeros(k_lr, dtype=torch.long)]
    o_len = [torch.full((k_lr,), out_features)]
    o_start = [torch.zeros(k_lr, dtype=torch.long)]
    offset = rank
    # dense blocks, grouped by shape: unit vectors on the block's shorter side and the
    # residual's rows (or columns) on the other, an exact factorization without an SVD
    shapes = torch.stack([o_lens[rows_idx], i_lens[cols_idx]], 1)
    for h, wd in torch.unique(shapes, dim=0).tolist():
        sel = (shapes[:, 0] == h) & (shapes[:, 1] == wd)
        rs = o_starts[rows_idx[sel]].to(dev)
        cs = i_starts[cols_idx[sel]].to(dev)
        n_sel, k = rs.numel(), -(-min(h, wd) // r)
        base = offset + torch.arange(n_sel, device=dev) * (k * r)
        if h <= wd:
            span = cs[:, None] + torch.arange(wd, device=dev)
            for t in range(h):
                big_u[rs + t, base + t] = 1.0
                big_v[(base + t)[:, None], span] = resid[(rs + t)[:, None], span]
        else:
            span = rs[:, None] + torch.arange(h, device=dev)
            for t in range(wd):
                big_v[base + t, cs + t] = 1.0
                big_u[span, (base + t)[:, None]] = resid[span, (cs + t)[:, None]]
        offset += n_sel * k * r
        i_len.append(torch.full((n_sel * k,), wd))
        i_start.append(cs.cpu().repeat_interleave(k))
        o_len.append(torch.full((n_sel * k,), h))
        o_start.append(rs.cpu().repeat_interleave(k))
    boxes = tuple(torch.cat(x) for x in (i_len, i_start, o_len, o_start))
    return _build(big_u.to(weight.dtype), big_v.to(weight.dtype), boxes, r)


# -- the search --------------------------------------------------------------------------------
def _error(layer: GBLRLinear, weight: torch.Tensor, calibration: Calibration | None) -> float:
    with torch.no_grad():
        layer.eval()
        return relative_error(layer.to_dense(), weight, calibration)


def _structure_descent(
    layer: GBLRLinear,
    objective: _Objective,
    limit: float,
    steps: int,
    opts: SearchOptions,
    progress: bool,
) -> None:
    layer.train()
    scale = float(torch.cat([layer.U.detach().flatten(), layer.V.detach().flatten()])
                  .pow(2).mean().sqrt())
    opt = torch.optim.Adam(
        [
            {"params": [layer.U, layer.V], "lr": opts.lr_factors * max(scale, 1e-12)},
            {"params": [layer.widths, layer.locations], "lr": opts.lr_structure,
             "betas": (0.0, 0.999)},
        ]
    )
    bar = None
    if progress:
        bar = progress_bar(total=steps, desc="structure search", unit="step", leave=False)
    ratio = opts.sigma_end / opts.sigma_start
    for step in range(steps):
        layer.sigma = opts.sigma_start * ratio ** (step / max(steps - 1, 1))
        opt.zero_grad(set_to_none=True)
        loss = objective(layer.to_dense())
        loss.backward()
        opt.step()
        with torch.no_grad():
            layer.widths.clamp_(0.0, 1.0)
            layer.locations.remainder_(1.0)
        fit_to_budget(layer, limit)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
    if bar is not None:
        bar.close()
    layer.sigma = None
    layer.eval()


def search_gblr(
    weight: torch.Tensor,
    budget: float,
    *,
    rank_per_component: int = 1,
    steps: int = 100,
    calibration: Calibration | None = None,
    progress: bool = False,
    opts: SearchOptions | None = None,
) -> tuple[GBLRLinear, dict]:
    """Project ``weight`` (already validated, on its compute device) onto GBLR at ``budget``.

    Returns the layer (evaluation mode, sharp masks, cost <= ``budget * in * out``) and a
    dict with ``error``, ``svd_error``, ``start`` (the chosen candidate) and ``time``.
    ``steps=0`` returns the SVD start.
    """
    opts = opts or SearchOptions()
    t0 = time.perf_counter()
    out_features, in_features = weight.shape
    limit = budget_to_macs(budget, in_features, out_features)
    w = weight.detach().float()
    start = svd_start(w, budget, rank_per_component, calibration).to(w.device)
    svd_error = _error(start, weight, calibration)
    best, best_err, best_name = start, svd_error, "svd"
    if steps > 0:
        objective = _Objective(w, calibration)
        max_comp = int(opts.max_components * min(in_features, out_features))
        starts = []
        for share in opts.sparse_fractions:
            for blk in opts.block_sizes:
                cand = sparse_start(
                    w, budget, rank_per_component, calibration, share, int(blk),
                    opts.alternations, max_comp,
                )
                if cand is not None:
                    starts.append((f"lowrank{share:g}+blocks{blk}", cand.to(w.device)))
        scored = [(name, c, _error(c, weight, calibration)) for name, c in starts]
        scored.sort(key=lambda t: t[2])
        if scored and scored[0][2] < best_err:
            best_name, best, best_err = scored[0]
        # gradient search of the structure from the SVD start (its components beyond the
        # budget start at width 0 and may regrow), then a frozen-structure refit
        searched = svd_start(w, budget, rank_per_component, calibration).to(w.device)
        _structure_descent(searched, objective, limit, steps, opts, progress)
        _refit(searched, objective, opts.refit_steps, opts.lr_factors)
        err = _error(searched, weight, calibration)
        if err < best_err:
            best, best_err, best_name = searched, err, "svd+search"
    best.eval()
    best.sigma = None
    return best, {
        "error": best_err,
        "svd_error": svd_error,
        "start": best_name,
        "time": time.perf_counter() - t0,
    }
