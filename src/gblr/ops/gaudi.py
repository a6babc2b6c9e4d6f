"""The Gaudi mask: a differentiable cyclic box, built in the Fourier domain.

For an axis of length ``n``, a component with width ``w`` and location ``l``
(fractions) is meant to select the ``w*n`` indices starting at ``l*n``,
wrapping around the end. The box's DFT is a Dirichlet kernel in which ``w``
and ``l`` appear explicitly, so the mask is differentiable in both; an
optional Gaussian low-pass ``G_sigma(k) = exp(-k^2 / (2 sigma^2))`` smooths it.
"""

from __future__ import annotations

import functools
import math
from contextlib import nullcontext

import torch

from gblr.core.validate import check_positive

__all__ = ["gaudi_mask", "round_to_grid", "EVAL_MASK_THRESHOLD"]

#: Mask entries below this value are zero in evaluation mode.
EVAL_MASK_THRESHOLD = 1e-3


def _no_autocast(device: torch.device):
    if torch.is_autocast_enabled(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return nullcontext()


def _num_frequencies(n: int, sigma: float | None, dtype: torch.dtype) -> int:
    """How many frequencies ``k = 0, 1, ...`` can be nonzero in the spectrum.

    With a low-pass, ``G_sigma(k)`` underflows to exactly zero in ``dtype`` once
    ``k^2 / (2 sigma^2)`` exceeds ``-log`` of half the smallest subnormal; those terms
    (and their gradients) are zero, and ``irfft`` zero-pads a shorter spectrum, so they
    are skipped. This makes masks with a small ``sigma`` cheap to build.
    """
    full = n // 2 + 1
    if sigma is None:
        return full
    info = torch.finfo(dtype)
    underflow = math.log(2.0) - math.log(info.tiny) - math.log(info.eps)
    cut = int(math.floor(float(sigma) * math.sqrt(2.0 * underflow))) + 2
    return min(full, cut)


def gaudi_mask(
    width: torch.Tensor,
    location: torch.Tensor,
    n: int,
    sigma: float | None = None,
    *,
    check: bool = True,
    on_grid: bool = False,
) -> torch.Tensor:
    """Masks of ``K`` components on an axis of length ``n``: a ``(K, n)`` real tensor.

    ``width`` and ``location`` are 1-D tensors of ``K`` fractions. The result is
    the real inverse DFT of ``w sinc(k w) / sinc(k/n) e^{-2 pi i k l}
    e^{-pi i k (w - 1/n)} G_sigma(k)`` for ``k = 0 .. n//2``; it is an exact 0/1
    box when ``w*n`` and ``l*n`` are integers and ``sigma`` is None. Always
    computed in float32 or float64, also under autocast. Derivatives in reverse and forward
    mode are computed in closed form (one FFT of the incoming gradient or tangent), and
    ``torch.func`` transforms apply.

    With ``check`` the values are validated (finite, widths in ``[0, 1]``, and with
    ``on_grid`` on the grid), which reads them back from the device; callers that clamp,
    wrap and round them already (the GBLR layer's forward pass) skip it.

    ``on_grid`` promises widths in ``[0, 1]`` with ``w*n`` and ``l*n`` integers up to
    rounding (the layer rounds them to the grid; they are rounded here). Every mask is then
    a difference of two rotations of one edge profile per ``(n, sigma)``, and a sharp mask
    is the box itself, so masks and derivatives cost a few gathers instead of a transform
    per component. Values and first derivatives are the formula's; second derivatives are
    not available on this path (without ``on_grid`` the derivatives can be differentiated
    again).
    """
    if width.dim() != 1 or location.dim() != 1:
        raise ValueError(
            f"width and location must be 1-D, got shapes {tuple(width.shape)} "
            f"and {tuple(location.shape)}"
        )
    if width.shape != location.shape:
        raise ValueError(
            f"width and location must have the same length, got {width.shape[0]} "
            f"and {location.shape[0]}"
        )
    n = check_positive("n", n)
    if sigma is not None and not (float(sigma) > 0 and math.isfinite(float(sigma))):
        raise ValueError(f"sigma must be a positive finite number or None, got {sigma}")
    if not (width.is_floating_point() and location.is_floating_point()):
        raise TypeError(
            f"width and location must be floating point, got {width.dtype} and {location.dtype}"
        )
    if check and width.numel():
        if not bool(torch.isfinite(width).all() & torch.isfinite(location).all()):
            raise ValueError("width and location must be finite (got NaN or Inf)")
        if not bool(((width >= 0) & (width <= 1)).all()):
            raise ValueError("width must lie in [0, 1] (fractions of the axis)")
        if on_grid:
            off = [(v.detach() * n - torch.round(v.detach() * n)).abs().max()
                   for v in (width, location)]
            if float(max(off)) > 1e-3:
                raise ValueError(f"on_grid=True needs width * n and location * n to be "
                                 f"integers (n={n}); round them, or leave on_grid off")
    dtype = torch.float64 if width.dtype == torch.float64 else torch.float32
    if width.shape[0] == 0:  # no components (the FFT refuses an empty batch)
        return (width.to(dtype).unsqueeze(1) * location.to(dtype).unsqueeze(1)).expand(0, n)
    with _no_autocast(width.device):
        w, loc = width.to(dtype), location.to(dtype)
        if on_grid:
            return _GridMask.apply(w, loc, *_edges(w, loc, n), n, sigma)
        return _GaudiMask.apply(w, loc, n, sigma)


def _spectrum_terms(w: torch.Tensor, loc: torch.Tensor, n: int, sigma: float | None):
    """Frequencies ``k``, the amplitude's ``k``-only factor ``G_sigma(k) / sinc(k/n)``, the
    amplitudes ``A (K, F)`` and phases ``phi (K, F)`` of the spectrum ``A e^{i phi}``."""
    k = torch.arange(_num_frequencies(n, sigma, w.dtype), device=w.device, dtype=w.dtype)
    w, loc = w.unsqueeze(1), loc.unsqueeze(1)
    dirichlet = torch.sinc(k / n)
    amplitude = w * torch.sinc(k * w) / dirichlet
    scale = 1.0 / dirichlet
    if sigma is not None:
        gauss = torch.exp(-(k * k) / (2.0 * float(sigma) ** 2))
        amplitude = amplitude * gauss
        scale = scale * gauss
    phase = -2.0 * math.pi * k * loc - math.pi * k * (w - 1.0 / n)
    return k, scale, amplitude, phase


def _edge_tables(n: int, sigma: float | None, dtype: torch.dtype, device: torch.device):
    """The edge profile ``e`` and its slope ``q = n de/dt`` at the ``n`` integer offsets,
    each repeated twice (length ``2n``, the form :func:`_rows` reads).

    Writing ``w sinc(k w) e^{-i pi k (2 l + w)}`` as ``(e^{-2 pi i k a} - e^{-2 pi i k b}) /
    (2 pi i k)`` with the box's edges ``a = l`` and ``b = l + w`` splits the mask into
    ``m_j = w + E(j - a n) - E(j - b n)``, one profile ``E`` per axis length and low-pass:
    ``E(t) = sum_{k>=1} c_k G_sigma(k) sin(2 pi k (t + 1/2) / n) / (2 pi k sinc(k/n))``
    (``c_k`` the weights of a real inverse DFT). On the index grid ``t`` is an integer, so
    both tables come from one inverse FFT each, in float64. They depend on nothing but the
    arguments and are read only, so they are kept for reuse (the layers of a model share
    axis lengths and ``sigma``, and the backward pass needs the tables the forward built),
    except where tensors are placeholders (a compiler tracing, a fake-tensor mode).
    """
    return _tables(_compute_edge_tables, n, sigma, dtype, device)


def _offsets(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``0 .. n-1`` twice over, the form :func:`_rows` reads (kept like the edge tables)."""
    return _tables(_compute_offsets, n, dtype, device)


def _tables(compute, *key):
    if torch.compiler.is_compiling() or type(torch.empty(0, device=key[-1])) is not torch.Tensor:
        return compute(*key)  # placeholders: a compiler tracing, or a fake-tensor mode
    # normal tensors even when first asked for inside torch.inference_mode()
    with torch.inference_mode(False), torch.no_grad():
        return _KEPT[compute](*key)


def _compute_edge_tables(n: int, sigma: float | None, dtype: torch.dtype, device: torch.device):
    k = torch.arange(1, _num_frequencies(n, sigma, dtype), device=device, dtype=torch.float64)
    gain = 1.0 / torch.sinc(k / n)
    if sigma is not None:
        gain = gain * torch.exp(-(k * k) / (2.0 * float(sigma) ** 2))
    half_step = torch.polar(gain, math.pi * k / n)
    zero = torch.zeros(1, device=device, dtype=half_step.dtype)
    slope = torch.cat([zero, half_step])
    profile = torch.cat([zero, half_step / (2j * math.pi * k)])
    e = torch.fft.irfft(profile, n=n, norm="forward").to(dtype)
    q = torch.fft.irfft(slope, n=n, norm="forward").to(dtype)
    return torch.cat([e, e]), torch.cat([q, q])


def _compute_offsets(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    offsets = torch.arange(n, device=device, dtype=dtype)
    return torch.cat([offsets, offsets])


#: the kept tables: a bounded memo of each pure function above (64 axis lengths and sigmas)
_KEPT = {f: functools.lru_cache(maxsize=64)(f) for f in (_compute_edge_tables, _compute_offsets)}


def _rows(table: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``out[c, j] = t[(j - shift[c]) mod n]`` for a table ``t`` of length ``n`` given twice
    over (``table = cat([t, t])``): one row of the table per shift, rotated."""
    n = table.shape[0] // 2
    windows = table.unfold(0, n, 1)  # (n + 1, n): window s is t[s - n + j]
    return windows.index_select(0, n - shift)


def _edges(
    w: torch.Tensor, loc: torch.Tensor, n: int | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The integer edges ``a = round(l n)`` and ``b = a + round(w n)``, mod ``n`` (an int, or
    an integer tensor that broadcasts: one length per axis)."""
    a = torch.round(loc * n).long().remainder(n)
    return a, (a + torch.round(w * n).long()).remainder(n)


class _GridMask(torch.autograd.Function):
    """The mask of widths and locations on the index grid, from the edge tables.

    With the edges ``a = round(l n)`` and ``b = a + round(w n)`` (:func:`_edges`, passed
    in): ``m_j = w + e[j - a] - e[j - b]`` (indices mod ``n``; the exact 0/1 box when
    ``sigma`` is None, from the offsets ``(j - a) mod n``), ``dm_j/dw = 1 + q[j - b]`` and
    ``dm_j/dl = q[j - b] - q[j - a]``: two row gathers per mask and per derivative
    instead of a transform of every row. The derivatives are the formula's at the grid
    point, in reverse and forward mode; they are not differentiable again (the edges are
    integers here), which :func:`gaudi_mask` without ``on_grid`` is. A component whose
    width or location is not finite gets a row of NaN, as the formula gives it.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(w, loc, a, b, n: int, sigma: float | None):
        return grid_mask_values(w, loc, a, b, n, sigma)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, _, a, b, n, sigma = inputs
        ctx.n, ctx.sigma = n, sigma
        ctx.save_for_backward(a, b)
        ctx.save_for_forward(a, b)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        grad_w, grad_loc = grid_mask_grads(grad, a, b, ctx.n, ctx.sigma)
        return (grad_w if ctx.needs_input_grad[0] else None,
                grad_loc if ctx.needs_input_grad[1] else None, None, None, None, None)

    @staticmethod
    def jvp(ctx, tangent_w, tangent_loc, *_):
        a, b = ctx.saved_tensors
        return grid_mask_tangent(tangent_w, tangent_loc, a, b, ctx.n, ctx.sigma)


def grid_mask_values(w, loc, a, b, n: int, sigma: float | None) -> torch.Tensor:
    """The ``(K, n)`` masks of :class:`_GridMask` from widths, locations and their integer
    edges (:func:`_edges`); a row of NaN where ``w`` or ``loc`` is not finite."""
    # w, or NaN where w or l is not finite (0 * inf is NaN), at the cost of K elements
    level = (w + 0.0 * loc).unsqueeze(1)
    if sigma is None:
        # (j - a) mod n by a row gather of 0 .. n-1; with the box's length L (both integers)
        # clamp(L - (j - a) mod n, 0, 1) is 1 inside the box and 0 outside, and NaN where
        # L is. Plain float arithmetic: a comparison and a select run several times slower
        length = torch.round(w * n).unsqueeze(1) + (level - w.unsqueeze(1))  # L, or NaN
        return (length - _rows(_offsets(n, w.dtype, w.device), a)).clamp(0.0, 1.0)
    e = _edge_tables(n, sigma, w.dtype, w.device)[0]
    return level + _rows(e, a) - _rows(e, b)


def _slopes(a, b, n: int, sigma: float | None, dtype: torch.dtype) -> torch.Tensor:
    """The rows ``q[j - b]`` and ``q[j - a]``, stacked: ``(2, K, n)``."""
    q = _edge_tables(n, sigma, dtype, a.device)[1]
    return _rows(q, torch.cat([b, a])).view(2, a.shape[0], n)


def grid_mask_grads(grad, a, b, n: int, sigma: float | None):
    """``(dL/dw, dL/dl)`` of grid masks from the gradient ``(K, n)`` of the masks:
    ``sum_j g_j (1 + q[j - b])`` and ``sum_j g_j (q[j - b] - q[j - a])``."""
    grad = grad.contiguous()  # row-major like the slopes
    slopes = (_slopes(a, b, n, sigma, grad.dtype) * grad).sum(dim=2)
    return slopes[0] + grad.sum(dim=1), slopes[0] - slopes[1]


def grid_mask_tangent(tangent_w, tangent_loc, a, b, n: int, sigma: float | None):
    """The tangent ``(K, n)`` of grid masks for tangents of the widths and locations (either
    may be None)."""
    dtype = (tangent_w if tangent_w is not None else tangent_loc).dtype
    q_b, q_a = _slopes(a, b, n, sigma, dtype)
    out = torch.zeros_like(q_b)
    if tangent_w is not None:
        out = out + tangent_w.unsqueeze(1) * (q_b + 1.0)
    if tangent_loc is not None:
        out = out + tangent_loc.unsqueeze(1) * (q_b - q_a)
    return out


class _GaudiMask(torch.autograd.Function):
    """The mask with its derivatives in closed form.

    With ``m_j = sum_k c_k Re(S_k e^{2 pi i k j / n})`` (``c_k = 2`` except 1 at ``k = 0`` and
    at ``k = n/2``) and ``S_k = A_k e^{i phi_k}``, a gradient ``g`` of the mask gives
    ``dL/dw = sum_k c_k (dA_k/dw Re P_k + pi k A_k Im P_k)`` and
    ``dL/dl = sum_k c_k 2 pi k A_k Im P_k`` with ``P_k = e^{i phi_k} conj(rfft(g)_k)`` and
    ``dA_k/dw = cos(pi k w) G_sigma(k) / sinc(k/n)``: one forward FFT of the gradient and a few
    element-wise products, where differentiating the forward operations would run the
    trigonometric functions' backward passes and an FFT per mask. Forward mode is the
    inverse FFT of ``dS = e^{i phi} (dA/dw t_w - i pi k A (t_w + 2 t_l))``. The backward pass
    is made of differentiable operations, so it can be differentiated again.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(w, loc, n: int, sigma: float | None):
        _, _, amplitude, phase = _spectrum_terms(w, loc, n, sigma)
        spectrum = torch.complex(amplitude * torch.cos(phase), amplitude * torch.sin(phase))
        return torch.fft.irfft(spectrum, n=n, dim=-1, norm="forward")

    @staticmethod
    def setup_context(ctx, inputs, output):
        w, loc, n, sigma = inputs
        ctx.n, ctx.sigma = n, sigma
        ctx.save_for_backward(w, loc)
        ctx.save_for_forward(w, loc)

    @staticmethod
    def backward(ctx, grad):
        w, loc = ctx.saved_tensors
        if not (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
            return None, None, None, None
        n = ctx.n
        k, scale, amplitude, phase = _spectrum_terms(w, loc, n, ctx.sigma)
        # conj(rfft(g)) over the frequencies the spectrum uses
        spectrum = torch.fft.rfft(grad.to(w.dtype), dim=-1)[:, : k.shape[0]]
        cos_p, sin_p = torch.cos(phase), torch.sin(phase)
        re_h, im_h = spectrum.real, -spectrum.imag
        re_p = cos_p * re_h - sin_p * im_h
        im_p = sin_p * re_h + cos_p * im_h
        c = torch.full_like(k, 2.0)
        c[0] = 1.0
        if n % 2 == 0 and k.shape[0] == n // 2 + 1:
            c[-1] = 1.0
        weighted = c * math.pi * k * amplitude * im_p
        grad_w = grad_loc = None
        if ctx.needs_input_grad[0]:
            d_amplitude = torch.cos(math.pi * k * w.unsqueeze(1)) * scale
            grad_w = (c * d_amplitude * re_p + weighted).sum(dim=1)
        if ctx.needs_input_grad[1]:
            grad_loc = 2.0 * weighted.sum(dim=1)
        return grad_w, grad_loc, None, None

    @staticmethod
    def jvp(ctx, tangent_w, tangent_loc, *_):
        w, loc = ctx.saved_tensors
        k, scale, amplitude, phase = _spectrum_terms(w, loc, ctx.n, ctx.sigma)
        zero = torch.zeros_like(w)
        t_w = (zero if tangent_w is None else tangent_w).unsqueeze(1)
        t_l = (zero if tangent_loc is None else tangent_loc).unsqueeze(1)
        d_amplitude = torch.cos(math.pi * k * w.unsqueeze(1)) * scale * t_w
        d_phase = -math.pi * k * amplitude * (t_w + 2.0 * t_l)  # times i
        cos_p, sin_p = torch.cos(phase), torch.sin(phase)
        spectrum = torch.complex(d_amplitude * cos_p - d_phase * sin_p,
                                 d_amplitude * sin_p + d_phase * cos_p)
        return torch.fft.irfft(spectrum, n=ctx.n, dim=-1, norm="forward")


def round_to_grid(value: torch.Tensor, n: int) -> torch.Tensor:
    """Round fractions to multiples of ``1/n`` with a straight-through gradient."""
    rounded = torch.round(value * n) / n
    return value + (rounded - value).detach()
