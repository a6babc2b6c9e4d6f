"""The Gaudi mask: a differentiable cyclic box, built in the Fourier domain.

For an axis of length ``n``, a component with width ``w`` and location ``l``
(fractions) is meant to select the ``w*n`` indices starting at ``l*n``,
wrapping around the end. The box's DFT is a Dirichlet kernel in which ``w``
and ``l`` appear explicitly, so the mask is differentiable in both; an
optional Gaussian low-pass ``G_sigma(k) = exp(-k^2 / (2 sigma^2))`` smooths it.
"""

from __future__ import annotations

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
) -> torch.Tensor:
    """Masks of ``K`` components on an axis of length ``n``: a ``(K, n)`` real tensor.

    ``width`` and ``location`` are 1-D tensors of ``K`` fractions. The result is
    the real inverse DFT of ``w sinc(k w) / sinc(k/n) e^{-2 pi i k l}
    e^{-pi i k (w - 1/n)} G_sigma(k)`` for ``k = 0 .. n//2``; it is an exact 0/1
    box when ``w*n`` and ``l*n`` are integers and ``sigma`` is None. Always
    computed in float32 or float64, also under autocast; no rounding is applied.

    With ``check`` the values are validated (finite, widths in ``[0, 1]``), which reads
    them back from the device; callers that clamp and wrap them already (the GBLR layer's
    forward pass) skip it.
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
    dtype = torch.float64 if width.dtype == torch.float64 else torch.float32
    if width.shape[0] == 0:  # no components (the FFT refuses an empty batch)
        return (width.to(dtype).unsqueeze(1) * location.to(dtype).unsqueeze(1)).expand(0, n)
    with _no_autocast(width.device):
        w = width.to(dtype).unsqueeze(1)
        loc = location.to(dtype).unsqueeze(1)
        k = torch.arange(_num_frequencies(n, sigma, dtype), device=width.device, dtype=dtype)
        amplitude = w * torch.sinc(k * w) / torch.sinc(k / n)
        if sigma is not None:
            amplitude = amplitude * torch.exp(-(k * k) / (2.0 * float(sigma) ** 2))
        phase = -2.0 * math.pi * k * loc - math.pi * k * (w - 1.0 / n)
        spectrum = torch.complex(amplitude * torch.cos(phase), amplitude * torch.sin(phase))
        return torch.fft.irfft(spectrum, n=n, dim=-1, norm="forward")


def round_to_grid(value: torch.Tensor, n: int) -> torch.Tensor:
    """Round fractions to multiples of ``1/n`` with a straight-through gradient."""
    rounded = torch.round(value * n) / n
    return value + (rounded - value).detach()
