"""Data-aware projection: the second moment of a layer's inputs and the error it defines.

With calibration inputs ``X (N, in)`` the quantity that matters is the output error
``||(W_hat - W) X^T||_F``, whose square is ``N * tr(D C D^T)`` with ``D = W_hat - W``
and ``C = X^T X / N``. Everything here works from ``C``; the weight-space error is the
special case ``C = I``.
"""

from __future__ import annotations

import torch

from gblr.layers.blocks import sqrt_and_pinv_sqrt

__all__ = ["Calibration", "as_calibration", "relative_error"]


class Calibration:
    """The input second moment ``C = X^T X / N`` (``(in, in)``, symmetric PSD) of one layer.

    Build it with :meth:`from_inputs` (calibration inputs ``X`` of shape ``(..., in)``) or
    :meth:`from_second_moment` (a precomputed ``C``). Functions that take ``calibration=``
    also accept a bare tensor, which is always read as inputs ``X``; a second moment must
    be wrapped with :meth:`from_second_moment`, so the two can never be confused.
    """

    def __init__(self, second_moment: torch.Tensor) -> None:
        if not isinstance(second_moment, torch.Tensor):
            raise TypeError(
                f"second_moment must be a torch.Tensor, got {type(second_moment).__name__}"
            )
        c = second_moment
        if c.dim() != 2 or c.shape[0] != c.shape[1]:
            raise ValueError(
                f"second_moment must be a square (in, in) matrix, got {tuple(c.shape)}"
            )
        if not c.is_floating_point():
            raise TypeError(f"second_moment must be floating point, got {c.dtype}")
        if not bool(torch.isfinite(c).all()):
            raise ValueError("second_moment contains NaN or Inf")
        c = c.detach().double()
        scale = c.abs().max().clamp_min(1e-300)
        if not torch.allclose(c, c.t(), atol=1e-6 * float(scale), rtol=0):
            raise ValueError("second_moment must be symmetric")
        self.second_moment = (c + c.t()) / 2
        self._root: torch.Tensor | None = None
        self._pinv_root: torch.Tensor | None = None

    @classmethod
    def from_inputs(cls, inputs: torch.Tensor) -> Calibration:
        """``C = X^T X / N`` from inputs of shape ``(..., in)`` (leading dims are tokens)."""
        if not isinstance(inputs, torch.Tensor):
            raise TypeError(
                f"calibration inputs must be a torch.Tensor, got {type(inputs).__name__}"
            )
        if inputs.dim() < 2:
            raise ValueError(
                f"calibration inputs must have shape (N, in), got {tuple(inputs.shape)}"
            )
        if not inputs.is_floating_point():
            raise TypeError(f"calibration inputs must be floating point, got {inputs.dtype}")
        x = inputs.detach().reshape(-1, inputs.shape[-1]).double()
        if x.shape[0] == 0:
            raise ValueError("calibration inputs are empty")
        if not bool(torch.isfinite(x).all()):
            raise ValueError("calibration inputs contain NaN or Inf")
        return cls(x.t() @ x / x.shape[0])

    @classmethod
    def from_second_moment(cls, second_moment: torch.Tensor) -> Calibration:
        """Wrap a precomputed second moment ``C (in, in)``."""
        return cls(second_moment)

    @property
    def in_features(self) -> int:
        return int(self.second_moment.shape[0])

    def to(self, device: torch.device | str | None) -> Calibration:
        """A copy whose tensors live on ``device``."""
        return Calibration(self.second_moment.to(device))

    def _eig(self) -> None:
        self._root, self._pinv_root = sqrt_and_pinv_sqrt(self.second_moment)

    def root(self) -> torch.Tensor:
        """The symmetric square root ``C^{1/2}`` (float64)."""
        if self._root is None:
            self._eig()
        return self._root

    def pinv_root(self) -> torch.Tensor:
        """The pseudo-inverse of ``C^{1/2}`` (float64; directions with no input energy are 0)."""
        if self._pinv_root is None:
            self._eig()
        return self._pinv_root

    def check_width(self, in_features: int, name: str = "calibration") -> None:
        if self.in_features != in_features:
            raise ValueError(
                f"{name} has width {self.in_features} but the weight has in_features={in_features}"
            )

    def __repr__(self) -> str:
        return f"Calibration(in_features={self.in_features})"


def as_calibration(
    calibration: Calibration | torch.Tensor | None, in_features: int, name: str = "calibration"
) -> Calibration | None:
    """Normalise a ``calibration=`` argument: None, a :class:`Calibration`, or inputs ``X``."""
    if calibration is None:
        return None
    if isinstance(calibration, torch.Tensor):
        if calibration.dim() < 2:
            raise ValueError(
                f"{name} as a tensor means inputs X of shape (N, in), "
                f"got {tuple(calibration.shape)}"
            )
        if calibration.shape[-1] != in_features:
            raise ValueError(
                f"{name} inputs have width {calibration.shape[-1]} but the weight has "
                f"in_features={in_features}"
            )
        if (
            calibration.dim() == 2
            and calibration.shape[0] == calibration.shape[1]
            and torch.equal(calibration, calibration.transpose(0, 1))
        ):
            raise ValueError(
                f"{name} is a symmetric (in, in) tensor, which looks like a second moment: "
                "a bare tensor means inputs X (N, in); wrap a second moment C as "
                "Calibration.from_second_moment(C) (or pass second_moment=C to "
                "GBLRLinear.from_dense)"
            )
        calibration = Calibration.from_inputs(calibration)
    if not isinstance(calibration, Calibration):
        raise TypeError(
            f"{name} must be None, inputs X (a tensor of shape (N, in)) or a Calibration, "
            f"got {type(calibration).__name__}"
        )
    calibration.check_width(in_features, name)
    return calibration


def relative_error(
    approx: torch.Tensor, weight: torch.Tensor, calibration: Calibration | None = None
) -> float:
    """``||(approx - W) C^{1/2}||_F / ||W C^{1/2}||_F`` (plain relative Frobenius error if None)."""
    d = (approx.detach().double() - weight.detach().double())
    w = weight.detach().double()
    if calibration is None:
        num, den = d.pow(2).sum(), w.pow(2).sum()
    else:
        c = calibration.second_moment.to(d.device)
        num, den = ((d @ c) * d).sum().clamp_min(0), ((w @ c) * w).sum().clamp_min(0)
    if float(den) == 0.0:
        return 0.0 if float(num) == 0.0 else float("inf")
    return float((num / den).sqrt())
