"""GBLR convolutions: a ``k x k`` conv whose kernel is a GBLR matrix.

A conv with weight ``(out, in, kh, kw)`` is the linear map ``out x (in*kh*kw)``
applied to every input patch. ``GBLRConv2d`` holds that matrix as one
:class:`~gblr.layers.gblr.GBLRLinear` (one structure for the whole kernel, columns
in PyTorch's ``(in, kh, kw)`` order), or with ``per_tap=True`` as one ``out x in``
GBLR per kernel tap. Masks, factors and costs come from those ``GBLRLinear``
modules; this class only arranges them as a convolution.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from gblr.core.deprecation import FlopsAliases
from gblr.core.validate import check_positive
from gblr.layers.base import init_uniform_
from gblr.layers.blocks import truncated_svd_factors
from gblr.layers.gblr import GBLRLinear, _check_path
from gblr.ops.costed import costed_conv2d

__all__ = ["GBLRConv2d"]


def _pair(name: str, value: int | tuple[int, int], minimum: int = 1) -> tuple[int, int]:
    """Validate an int or a pair of ints, each ``>= minimum``."""
    def is_int(v: object) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if is_int(value):
        pair = (value, value)
    elif isinstance(value, tuple | list) and len(value) == 2 and all(map(is_int, value)):
        pair = tuple(value)
    else:  # a float (stride=1.5, or 2.0), a bool, a string, None, a triple...
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if any(v < minimum for v in pair):
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return pair  # type: ignore[return-value]


class GBLRConv2d(FlopsAliases, nn.Module):
    """Drop-in replacement for ``nn.Conv2d`` (``groups=1``, zero padding) with a GBLR kernel.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, bias: as for
            ``nn.Conv2d``; ``padding`` is an int, a pair, ``"valid"`` or ``"same"``
            (``"same"`` needs ``stride=1`` and an even ``dilation * (kernel - 1)``).
        groups: must be 1.
        per_tap: one GBLR ``out x in`` matrix per kernel tap instead of one
            ``out x (in*kh*kw)`` matrix for the whole kernel.
        path: ``"dense"`` (materialize the kernel, one ``conv2d``), ``"lowrank"``
            (``conv2d`` with ``V`` as kernel, then a 1x1 conv with ``U``) or ``"auto"``
            (fewer MACs for the input at hand). Evaluation always materializes the kernel.
        num_components, rank_per_component, rank_fraction, sigma, init, init_fraction,
            location_init: passed to each :class:`GBLRLinear` (``budget=`` is
            ``init_fraction``'s deprecated name).

    Cost: :meth:`macs` is the evaluation-mode MACs per *output position* (one output
    pixel of one image, all output channels), the sum of the GBLR costs; :meth:`macs`
    multiplies it by the number of output positions of an input size.
    """

    structure_name: ClassVar[str] = "gblr"

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        per_tap: bool = False,
        num_components: int | None = None,
        rank_per_component: int = 1,
        rank_fraction: float | None = None,
        sigma: float | None = None,
        init: str = "svd",
        init_fraction: float | None = None,
        location_init: str = "even",
        path: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        budget: float | None = None,
    ) -> None:
        super().__init__()
        self.in_channels = check_positive("in_channels", in_channels)
        self.out_channels = check_positive("out_channels", out_channels)
        self.kernel_size = _pair("kernel_size", kernel_size)
        self.stride = _pair("stride", stride)
        self.dilation = _pair("dilation", dilation)
        if groups != 1:
            raise ValueError(f"GBLRConv2d supports groups=1 only, got groups={groups!r}")
        self.groups = 1
        self.padding = self._resolve_padding(padding)
        self.per_tap = bool(per_tap)
        self.path = path
        kh, kw = self.kernel_size
        n_in = self.in_channels if self.per_tap else self.in_channels * kh * kw
        n_linears = kh * kw if self.per_tap else 1
        self.linears = nn.ModuleList(
            GBLRLinear(
                n_in,
                self.out_channels,
                num_components=num_components,
                rank_per_component=rank_per_component,
                rank_fraction=rank_fraction,
                bias=False,
                sigma=sigma,
                init=init,
                init_fraction=init_fraction,
                location_init=location_init,
                budget=budget,
                device=device,
                dtype=dtype,
            )
            for _ in range(n_linears)
        )
        if bias:
            self.bias = nn.Parameter(torch.empty(self.out_channels, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)
        self._reset_scale_and_bias()

    # -- settings ------------------------------------------------------------------------------
    def _resolve_padding(self, padding: int | tuple[int, int] | str) -> tuple[int, int]:
        if isinstance(padding, str):
            if padding == "valid":
                return (0, 0)
            if padding != "same":
                raise ValueError(
                    f"padding must be an int, a pair, 'valid' or 'same', got {padding!r}"
                )
            if self.stride != (1, 1):
                raise ValueError("padding='same' needs stride=1")
            total = [d * (k - 1) for d, k in zip(self.dilation, self.kernel_size, strict=True)]
            if any(t % 2 for t in total):
                raise ValueError(
                    "padding='same' needs an even dilation * (kernel_size - 1) on both axes, "
                    f"got {tuple(total)}"
                )
            return (total[0] // 2, total[1] // 2)
        return _pair("padding", padding, minimum=0)

    @property
    def path(self) -> str:
        """Training forward path: ``"auto"``, ``"dense"`` or ``"lowrank"``."""
        return self._path

    @path.setter
    def path(self, value: str) -> None:
        self._path = _check_path(value)

    @property
    def sigma(self) -> float | None:
        """Gaussian low-pass of the masks, shared by all GBLR matrices of the kernel."""
        return self.linears[0].sigma

    @sigma.setter
    def sigma(self, value: float | None) -> None:
        for linear in self.linears:
            linear.sigma = value

    @property
    def num_taps(self) -> int:
        return self.kernel_size[0] * self.kernel_size[1]

    # -- initialisation ------------------------------------------------------------------------
    def reset_parameters(self) -> None:
        """Re-initialise every GBLR matrix (``init`` scheme) and the bias as ``nn.Conv2d`` does."""
        for linear in self.linears:
            linear.reset_parameters()
        self._reset_scale_and_bias()

    @torch.no_grad()
    def _reset_scale_and_bias(self) -> None:
        if self.per_tap:
            # each tap was initialised with fan-in ``in``; the conv's fan-in is ``in * kh * kw``
            scale = self.num_taps ** -0.25
            for linear in self.linears:
                linear.U.mul_(scale)
                linear.V.mul_(scale)
        if self.bias is not None:
            init_uniform_(self.bias, self.in_channels * self.num_taps)

    # -- the kernel ----------------------------------------------------------------------------
    def _kernel_from(self, matrices: list[torch.Tensor]) -> torch.Tensor:
        kh, kw = self.kernel_size
        if self.per_tap:  # tap t = i * kw + j holds weight[:, :, i, j]
            return torch.stack(matrices, dim=-1).reshape(
                self.out_channels, self.in_channels, kh, kw
            )
        return matrices[0].reshape(self.out_channels, self.in_channels, kh, kw)

    def to_dense(self) -> torch.Tensor:
        """The ``(out, in, kh, kw)`` kernel applied in the current mode (masks included)."""
        return self._kernel_from([linear.to_dense() for linear in self.linears])

    # -- cost ----------------------------------------------------------------------------------
    def macs(self, input_hw: tuple[int, int] | None = None) -> int:
        """Evaluation-mode MACs per output position (one output pixel, all channels), or,
        given ``input_hw``, for one image of that spatial size."""
        per_position = sum(linear.macs() for linear in self.linears)
        if input_hw is None:
            return per_position
        ho, wo = self.output_size(input_hw)
        return per_position * ho * wo

    def dense_macs(self) -> int:
        """MACs per output position of the dense ``nn.Conv2d`` this layer replaces."""
        return self.out_channels * self.in_channels * self.num_taps

    def output_size(self, input_hw: tuple[int, int]) -> tuple[int, int]:
        """``(H_out, W_out)`` for an input of spatial size ``input_hw``."""
        h, w = _pair("input_hw", tuple(input_hw))
        sizes = []
        for n, k, s, p, d in zip(
            (h, w), self.kernel_size, self.stride, self.padding, self.dilation, strict=True
        ):
            size = (n + 2 * p - d * (k - 1) - 1) // s + 1
            if size <= 0:
                raise ValueError(f"input_hw={tuple(input_hw)} is smaller than the kernel")
            sizes.append(size)
        return sizes[0], sizes[1]

    def num_parameters(self) -> int:
        """Number of stored parameters, bias included."""
        return sum(p.numel() for p in self.parameters())

    # -- forward -------------------------------------------------------------------------------
    def _choose_path(self, positions: int) -> str:
        if self.path != "auto":
            return self.path
        n_in, n_out = self.linears[0].in_features, self.out_channels
        kr = sum(lin.num_components * lin.rank_per_component for lin in self.linears)
        lowrank = positions * kr * (n_in + n_out)
        dense = kr * n_in * n_out + positions * self.dense_macs()
        return "lowrank" if lowrank <= dense else "dense"

    def _lowrank_forward(self, x: torch.Tensor) -> torch.Tensor:
        factors = [linear.masked_factors() for linear in self.linears]
        u = torch.cat([f[0] for f in factors], dim=1)[:, :, None, None]
        if not self.per_tap:
            v = factors[0][1].reshape(-1, self.in_channels, *self.kernel_size)
            z = F.conv2d(x, v, None, self.stride, self.padding, self.dilation)
            return F.conv2d(z, u, self.bias)
        x = F.pad(x, (self.padding[1], self.padding[1], self.padding[0], self.padding[0]))
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        ho = (x.shape[-2] - dh * (kh - 1) - 1) // sh + 1
        wo = (x.shape[-1] - dw * (kw - 1) - 1) // sw + 1
        parts = []
        for t, (_, v) in enumerate(factors):
            i, j = divmod(t, kw)
            rows = slice(i * dh, i * dh + sh * (ho - 1) + 1, sh)
            cols = slice(j * dw, j * dw + sw * (wo - 1) + 1, sw)
            parts.append(F.conv2d(x[:, :, rows, cols], v[:, :, None, None]))
        return F.conv2d(torch.cat(parts, dim=1), u, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() not in (3, 4) or x.shape[-3] != self.in_channels:
            raise ValueError(
                f"GBLRConv2d expects input of shape (N, {self.in_channels}, H, W) or "
                f"({self.in_channels}, H, W), got {tuple(x.shape)}"
            )
        unbatched = x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
        if not self.training:
            factors = [linear.masked_factors() for linear in self.linears]
            u = torch.stack([f[0] for f in factors])
            v = torch.stack([f[1] for f in factors])
            y = costed_conv2d(
                x, u, v, self.kernel_size, self.per_tap, self.stride, self.padding,
                self.dilation, self.macs(),
            )
            if self.bias is not None:
                y = y + self.bias.to(y.dtype)[:, None, None]
        else:
            ho, wo = self.output_size(x.shape[-2:])
            if self._choose_path(x.shape[0] * ho * wo) == "dense":
                kernel = self.to_dense()
                y = F.conv2d(x, kernel, self.bias, self.stride, self.padding, self.dilation)
            else:
                y = self._lowrank_forward(x)
        return y.squeeze(0) if unbatched else y

    def extra_repr(self) -> str:
        lin = self.linears[0]
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
            f"bias={self.bias is not None}, per_tap={self.per_tap}, "
            f"num_components={lin.num_components}, rank_per_component={lin.rank_per_component}, "
            f"path={self.path!r}"
        )

    # -- constructors --------------------------------------------------------------------------
    @classmethod
    def from_conv(
        cls,
        conv: nn.Conv2d,
        budget: float | None = None,
        per_tap: bool = False,
        rank_per_component: int = 1,
        **kwargs: Any,
    ) -> GBLRConv2d:
        """GBLR start from a trained ``nn.Conv2d``: the SVD of its kernel matrix (or matrices).

        ``budget=None`` keeps the full rank with all widths 1, so the layer computes exactly
        the same conv; a budget in ``(0, 1]`` keeps the leading singular vectors that fit it
        (``GBLRLinear.from_dense``), the others off but able to regrow in training.
        ``kwargs`` (``sigma``, ``path``) go to the GBLR matrices.
        """
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
        if conv.groups != 1:
            raise ValueError(f"conv.groups must be 1 for GBLRConv2d, got {conv.groups}")
        if conv.padding_mode != "zeros":
            raise ValueError(f"conv.padding_mode must be 'zeros', got {conv.padding_mode!r}")
        out_c, in_c, kh, kw = conv.weight.shape
        weight = conv.weight.detach()
        if per_tap:
            matrices = [weight[:, :, i, j] for i in range(kh) for j in range(kw)]
        else:
            matrices = [weight.reshape(out_c, -1)]
        path = kwargs.pop("path", "auto")
        kwargs["rank_per_component"] = rank_per_component
        linears = []
        for m in matrices:
            if budget is None:
                k = min(m.shape) // rank_per_component * rank_per_component
                u, v = truncated_svd_factors(m, k)
                lin = GBLRLinear.from_low_rank(u, v, **kwargs)
            else:
                lin = GBLRLinear.from_dense(m, budget, **kwargs)
            linears.append(lin)
        layer = cls(
            in_c,
            out_c,
            (kh, kw),
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            bias=conv.bias is not None,
            per_tap=per_tap,
            num_components=linears[0].num_components,
            rank_per_component=rank_per_component,
            sigma=linears[0].sigma,
            init="random",
            path=path,
            device=weight.device,
            dtype=weight.dtype,
        )
        layer.linears = nn.ModuleList(linears)
        if conv.bias is not None:
            with torch.no_grad():
                layer.bias.copy_(conv.bias)
        return layer
