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
def _kernel(u: Tensor, v: Tensor, in_channels: int, kernel_size: list[int], per_tap: bool):
    """Conv kernel ``(out, in, kh, kw)`` from ``T`` factor pairs ``u (T, out, R)``, ``v (T, R, n)``.

    ``per_tap``: tap ``t = i * kw + j`` holds ``weight[:, :, i, j] = u[t] @ v[t]``; otherwise
    ``T = 1`` and ``u[0] @ v[0]`` is the ``out x (in*kh*kw)`` kernel matrix.
    """
    mats = torch.bmm(u, v)
    out = u.shape[1]
    if per_tap:
        return mats.permute(1, 2, 0).reshape(out, in_channels, *kernel_size)
    return mats[0].reshape(out, in_channels, *kernel_size)


def _kernel_grad(grad_w: Tensor, per_tap: bool) -> Tensor:
    """The gradient of :func:`_kernel` with respect to its ``(T, out, n)`` matrices."""
    out, in_channels = grad_w.shape[:2]
    if per_tap:
        return grad_w.reshape(out, in_channels, -1).permute(2, 0, 1)
    return grad_w.reshape(1, out, -1)


@torch.library.custom_op("gblr::costed_conv2d", mutates_args=())
def _costed_conv2d(
    x: Tensor,
    u: Tensor,
    v: Tensor,
    kernel_size: list[int],
    per_tap: bool,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    macs_per_position: int,
) -> Tensor:
    weight = _kernel(u, v, x.shape[1], kernel_size, per_tap)
    return F.conv2d(x, weight, None, stride, padding, dilation)


@_costed_conv2d.register_fake
def _(x, u, v, kernel_size, per_tap, stride, padding, dilation, macs_per_position):
    n, _, h, w = x.shape
    kh, kw = kernel_size
    ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return x.new_empty(n, u.shape[1], ho, wo)


def _conv_setup(ctx, inputs, output) -> None:
    x, u, v, kernel_size, per_tap, stride, padding, dilation, _ = inputs
    ctx.save_for_backward(x, u, v)
    ctx.conv_args = (kernel_size, per_tap, stride, padding, dilation)


def _conv_backward(ctx, grad: Tensor):
    x, u, v = ctx.saved_tensors
    kernel_size, per_tap, stride, padding, dilation = ctx.conv_args
    weight = _kernel(u, v, x.shape[1], kernel_size, per_tap)
    gx = gu = gv = None
    if ctx.needs_input_grad[0]:
        gx = torch.nn.grad.conv2d_input(x.shape, weight, grad, stride, padding, dilation)
    if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
        gw = torch.nn.grad.conv2d_weight(x, weight.shape, grad, stride, padding, dilation)
        gm = _kernel_grad(gw, per_tap)
        gu = torch.bmm(gm, v.transpose(1, 2)) if ctx.needs_input_grad[1] else None
        gv = torch.bmm(u.transpose(1, 2), gm) if ctx.needs_input_grad[2] else None
    return gx, gu, gv, None, None, None, None, None, None


_costed_conv2d.register_autograd(_conv_backward, setup_context=_conv_setup)


@register_flop_formula(torch.ops.gblr.costed_conv2d)
def _conv_flops(x_shape, u_shape, v_shape, *args, out_shape=None, **kw):
    positions = int(out_shape[0]) * int(out_shape[2]) * int(out_shape[3])
    return 2 * positions * int(args[-1])


def costed_conv2d(
    x: Tensor,
    u: Tensor,
    v: Tensor,
    kernel_size: tuple[int, int],
    per_tap: bool,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    macs_per_position: int,
) -> Tensor:
    """``conv2d`` (no bias, ``groups=1``) of a 4-D input with the kernel built from factors,
    counted as ``macs_per_position`` MACs per output position (``N * H_out * W_out``).

    ``u`` is ``(T, out, R)`` and ``v`` is ``(T, R, n)``: ``T = 1`` with ``n = in*kh*kw`` for
    one kernel matrix, or ``T = kh*kw`` with ``n = in`` for one matrix per tap (``per_tap``).
    """
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    x, u, v = _autocast_inputs(x, u, v)
    return _costed_conv2d(
        x, u, v, list(kernel_size), bool(per_tap), list(stride), list(padding), list(dilation),
        int(macs_per_position),
    )
