"""The GBLR layer's masked factors in one differentiable operation, for masks on the grid.

``U_m = U * M_out^T`` and ``V_m = V * M_in``, the masks built from the raw widths and
locations as the layer builds them (clamped to ``[0, 1]``, wrapped, rounded to the index
grid, then :func:`gblr.ops.gaudi.gaudi_mask` with ``on_grid``). Written out in autograd
operations this is some forty small operations per layer and two element-wise products
with a transposed operand; here it is one node whose backward pass computes the factor
and mask gradients directly, which matters most for small layers, where the per-operation
overhead is the cost. Values and first derivatives are those of the operations it replaces.
"""

from __future__ import annotations

import torch

from gblr.core.boxes import INPUT_AXIS, OUTPUT_AXIS
from gblr.ops.gaudi import (
    _edges,
    grid_mask_grads,
    grid_mask_tangent,
    grid_mask_values,
    round_to_grid,
)

__all__ = ["grid_masked_factors"]


def _grids(widths: torch.Tensor, locations: torch.Tensor, n_in: int, n_out: int):
    """For the input and then the output axis: the rounded width and location in the mask
    dtype, their integer edges and where the clamp passes the width's gradient (no
    gradients; both axes at once, as ``(2, K)`` operations)."""
    dtype = torch.float64 if widths.dtype == torch.float64 else torch.float32
    raw, locs = widths.detach(), torch.remainder(locations.detach(), 1.0)
    lengths = torch.empty(2, 1, dtype=torch.long, device=raw.device)
    lengths[INPUT_AXIS], lengths[OUTPUT_AXIS] = n_in, n_out
    if raw.dtype in (torch.float32, torch.float64):
        n = lengths.to(raw.dtype)  # exact: lengths below 2**24
        w = torch.round(raw.clamp(0.0, 1.0) * n) / n
        loc = torch.round(locs * n) / n
    else:
        # lower precision may not hold the lengths: round each axis with its integer length
        axes = {INPUT_AXIS: n_in, OUTPUT_AXIS: n_out}
        w = torch.stack([round_to_grid(raw[a].clamp(0.0, 1.0), axes[a]) for a in sorted(axes)])
        loc = torch.stack([round_to_grid(locs[a], axes[a]) for a in sorted(axes)])
    w, loc = w.to(dtype), loc.to(dtype)
    a, b = _edges(w, loc, lengths)
    passes = (raw >= 0.0) & (raw <= 1.0)
    return tuple((w[axis], loc[axis], a[axis], b[axis], passes[axis])
                 for axis in (INPUT_AXIS, OUTPUT_AXIS))


def _expand(mask: torch.Tensor, rank: int) -> torch.Tensor:
    return mask if rank == 1 else mask.repeat_interleave(rank, dim=0)


def _per_component(grad: torch.Tensor, rank: int) -> torch.Tensor:
    """Sum the ``rank`` rows of each component: ``(K r, n) -> (K, n)``."""
    return grad if rank == 1 else grad.view(-1, rank, grad.shape[1]).sum(dim=1)


class _MaskedFactors(torch.autograd.Function):
    """``widths`` and ``locations`` are inputs for their gradients; their rounded values
    and edges (:func:`_grids`, computed once by the caller) define the masks."""

    generate_vmap_rule = True

    @staticmethod
    def forward(u, v, widths, locations, w_in, l_in, a_in, b_in, pass_in,
                w_out, l_out, a_out, b_out, pass_out, sigma: float | None, rank: int):
        n_out, n_in = u.shape[0], v.shape[1]
        m_in = _expand(grid_mask_values(w_in, l_in, a_in, b_in, n_in, sigma), rank)
        m_out = _expand(grid_mask_values(w_out, l_out, a_out, b_out, n_out, sigma), rank)
        # the output mask in U's (out, K r) layout: a product with a transposed operand (and
        # the two of its backward pass) runs several times slower than this one copy
        m_out_t = m_out.t().to(u.dtype).contiguous()
        m_in = m_in.to(v.dtype)
        return u * m_out_t, v * m_in, m_in, m_out_t

    @staticmethod
    def setup_context(ctx, inputs, output):
        u, v, *_ = inputs
        sigma, rank = inputs[-2:]
        _, _, m_in, m_out_t = output
        ctx.sigma, ctx.rank, ctx.mask_dtype = sigma, rank, inputs[4].dtype
        ctx.mark_non_differentiable(m_in, m_out_t)
        # the edges and clamp pass-throughs of both axes
        saved = (u, v, m_in, m_out_t, *inputs[6:9], *inputs[11:14])
        ctx.save_for_backward(*saved)
        ctx.save_for_forward(*saved)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_u_m, grad_v_m, _grad_m_in, _grad_m_out):
        u, v, m_in, m_out_t, a_in, b_in, pass_in, a_out, b_out, pass_out = ctx.saved_tensors
        rank, sigma = ctx.rank, ctx.sigma
        grad_u = grad_v = grad_widths = grad_locations = None
        if ctx.needs_input_grad[0]:
            grad_u = grad_u_m * m_out_t
        if ctx.needs_input_grad[1]:
            grad_v = grad_v_m * m_in
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            # in the mask dtype before the rank's rows are summed, as the cast of the masks
            # to the factors' dtype does in the operations this replaces
            g_in = _per_component((grad_v_m * v).to(ctx.mask_dtype), rank)
            g_out = _per_component((grad_u_m * u).t().to(ctx.mask_dtype), rank)
            gw_in, gl_in = grid_mask_grads(g_in, a_in, b_in, v.shape[1], sigma)
            gw_out, gl_out = grid_mask_grads(g_out, a_out, b_out, u.shape[0], sigma)
            # the clamp to [0, 1] passes the width's gradient only inside the interval
            by_axis = {INPUT_AXIS: (torch.where(pass_in, gw_in, 0.0), gl_in),
                       OUTPUT_AXIS: (torch.where(pass_out, gw_out, 0.0), gl_out)}
            grad_widths = torch.stack([by_axis[0][0], by_axis[1][0]])
            grad_locations = torch.stack([by_axis[0][1], by_axis[1][1]])
        return (grad_u, grad_v, grad_widths, grad_locations) + (None,) * 12

    @staticmethod
    def jvp(ctx, t_u, t_v, t_widths, t_locations, *_):
        u, v, m_in, m_out_t, a_in, b_in, pass_in, a_out, b_out, pass_out = ctx.saved_tensors
        rank, sigma = ctx.rank, ctx.sigma
        t_u_m = torch.zeros_like(u) if t_u is None else t_u * m_out_t
        t_v_m = torch.zeros_like(v) if t_v is None else t_v * m_in
        if t_widths is not None or t_locations is not None:
            def tangent(axis, a, b, passes, n):
                tw = None if t_widths is None else torch.where(passes, t_widths[axis], 0.0)
                tl = None if t_locations is None else t_locations[axis]
                return _expand(grid_mask_tangent(tw, tl, a, b, n, sigma), rank)
            dm_in = tangent(INPUT_AXIS, a_in, b_in, pass_in, v.shape[1])
            dm_out = tangent(OUTPUT_AXIS, a_out, b_out, pass_out, u.shape[0])
            t_u_m = t_u_m + u * dm_out.t().to(u.dtype)
            t_v_m = t_v_m + v * dm_in.to(v.dtype)
        return t_u_m, t_v_m, None, None


def grid_masked_factors(
    u: torch.Tensor, v: torch.Tensor, widths: torch.Tensor, locations: torch.Tensor,
    sigma: float | None, rank: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U_m, V_m)`` of components with masks on the index grid, in one operation.

    Args:
        u: ``(out, K r)`` output factors.
        v: ``(K r, in)`` input factors.
        widths, locations: ``(2, K)`` raw fractions, row ``INPUT_AXIS`` and ``OUTPUT_AXIS``;
            widths are clamped to ``[0, 1]`` and locations wrapped, both rounded to the grid
            of their axis with a straight-through gradient.
        sigma: the Gaussian low-pass of the masks, or None for sharp boxes.
        rank: ``r``, the rank of each component (its ``r`` columns share a mask).

    Returns ``U * M_out^T`` and ``V * M_in`` (``M`` the ``(K r, n)`` masks). First
    derivatives in reverse and forward mode; not differentiable twice.
    """
    grid_in, grid_out = _grids(widths, locations, v.shape[1], u.shape[0])
    u_m, v_m, _, _ = _MaskedFactors.apply(u, v, widths, locations, *grid_in, *grid_out, sigma,
                                          rank)
    return u_m, v_m
