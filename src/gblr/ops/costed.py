"""Custom ops that carry their layer's cost, so that ``FlopCounterMode`` counts it.

A GBLR layer in evaluation mode computes ``y = U_m (V_m x)`` (or ``(U_m V_m) x``) with
factor matrices that still hold the components that are off, and it may group
components with identical boxes into one dense block when deployed. The FLOPs of the
aten matmuls it happens to run are therefore not its cost. These ops run the same
computation but are opaque to dispatch modes, and their registered flop formula is
``2 * positions * macs_per_position`` (FlopCounterMode counts FLOPs = 2 MACs), where
``macs_per_position`` is the layer's evaluation-mode cost passed by the layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

__all__ = ["costed_linear", "costed_conv2d"]


# -- linear ------------------------------------------------------------------------------------
@torch.library.custom_op("gblr::costed_linear", mutates_args=())
def _costed_linear(x: Tensor, u: Tensor, v: Tensor, macs_per_token: int, dense: bool) -> Tensor:
    if dense:
        return F.linear(x, u @ v)
    return F.linear(F.linear(x, v), u)


@_costed_linear.register_fake
def _(x: Tensor, u: Tensor, v: Tensor, macs_per_token: int, dense: bool) -> Tensor:
    return x.new_empty(x.shape[0], u.shape[0])


def _linear_setup(ctx, inputs, output) -> None:
    x, u, v, _, _ = inputs
    ctx.save_for_backward(x, u, v)


def _linear_backward(ctx, grad: Tensor):
    x, u, v = ctx.saved_tensors
    gz = grad @ u  # (tokens, K r)
    gx = gz @ v if ctx.needs_input_grad[0] else None
    gu = grad.t() @ (x @ v.t()) if ctx.needs_input_grad[1] else None
    gv = gz.t() @ x if ctx.needs_input_grad[2] else None
    return gx, gu, gv, None, None


_costed_linear.register_autograd(_linear_backward, setup_context=_linear_setup)


@register_flop_formula(torch.ops.gblr.costed_linear)
def _linear_flops(x_shape, u_shape, v_shape, macs_per_token, dense, *, out_shape=None, **kw):
    return 2 * int(x_shape[0]) * int(macs_per_token)


def _autocast_inputs(*tensors: Tensor) -> tuple[Tensor, ...]:
    """Cast to the autocast dtype when autocast is on, as ``F.linear``/``F.conv2d`` would."""
    device_type = tensors[0].device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        return tuple(t.to(dtype) for t in tensors)
    return tensors


def costed_linear(
    x: Tensor, u: Tensor, v: Tensor, macs_per_token: int, dense: bool = False
) -> Tensor:
    """``x @ (u @ v)^T`` for ``x`` of shape ``(tokens, in)``, counted as ``macs_per_token``.

    ``dense`` picks ``F.linear(x, u @ v)`` over ``F.linear(F.linear(x, v), u)``; both
    give the same result up to rounding. Differentiable in ``x``, ``u`` and ``v``.
    """
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (tokens, in), got shape {tuple(x.shape)}")
    x, u, v = _autocast_inputs(x, u, v)
    return _costed_linear(x, u, v, int(macs_per_token), bool(dense))


# -- conv2d ------------------------------------------------------------------------------------
@torch.library.custom_op("gblr::costed_conv2d", mutates_args=())
def _costed_conv2d(
    x: Tensor,
    weight: Tensor,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    macs_per_position: int,
) -> Tensor:
    return F.conv2d(x, weight, None, stride, padding, dilation)


@_costed_conv2d.register_fake
def _(x, weight, stride, padding, dilation, macs_per_position):
    n, _, h, w = x.shape
    kh, kw = weight.shape[-2:]
    ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return x.new_empty(n, weight.shape[0], ho, wo)


def _conv_setup(ctx, inputs, output) -> None:
    x, weight, stride, padding, dilation, _ = inputs
    ctx.save_for_backward(x, weight)
    ctx.conv_args = (stride, padding, dilation)


def _conv_backward(ctx, grad: Tensor):
    x, weight = ctx.saved_tensors
    stride, padding, dilation = ctx.conv_args
    gx = gw = None
    if ctx.needs_input_grad[0]:
        gx = torch.nn.grad.conv2d_input(x.shape, weight, grad, stride, padding, dilation)
    if ctx.needs_input_grad[1]:
        gw = torch.nn.grad.conv2d_weight(x, weight.shape, grad, stride, padding, dilation)
    return gx, gw, None, None, None, None


_costed_conv2d.register_autograd(_conv_backward, setup_context=_conv_setup)


@register_flop_formula(torch.ops.gblr.costed_conv2d)
def _conv_flops(x_shape, w_shape, stride, padding, dilation, macs, *, out_shape=None, **kw):
    positions = int(out_shape[0]) * int(out_shape[2]) * int(out_shape[3])
    return 2 * positions * int(macs)


def costed_conv2d(
    x: Tensor,
    weight: Tensor,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    macs_per_position: int,
) -> Tensor:
    """``F.conv2d`` (no bias, ``groups=1``) on a 4-D input, counted as ``macs_per_position``
    MACs per output position (``N * H_out * W_out`` positions)."""
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    x, weight = _autocast_inputs(x, weight)
    return _costed_conv2d(
        x, weight, list(stride), list(padding), list(dilation), int(macs_per_position)
    )
