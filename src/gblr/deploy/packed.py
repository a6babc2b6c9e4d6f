"""Packed inference form of a GBLR layer: dense GEMMs over grouped bands.

A GBLR layer in evaluation mode is ``y = U_m (V_m x)`` where row ``c`` of ``V_m``
is nonzero on one cyclic band of input columns and column ``c`` of ``U_m`` on one
cyclic band of output rows (the mask values, 0/1 or smooth when ``sigma`` is set,
are folded into the factors, so the packed form is exact). Computing only the
bands turns the cost reduction into wall-clock time:

- **stage 1** groups components whose column bands are close; a group's union band
  ``cols_g`` is cut into segments, each one GEMM ``h[:, ranks] = x[:, seg] @ V^T`` over
  the group's ranks from the first to the last member meeting the segment (so nested
  bands cost little more than their true MACs);
- **stage 2** does the same on the output side, grouped independently:
  ``y[:, seg] += h[:, ranks] @ U^T``;
- components sharing one box whose summed rank makes a dense block cheaper
  (``h * w < rank * (h + w)``) become one dense GEMM ``y[:, R] += x[:, C] @ B^T``.

The pieces: band geometry in :mod:`gblr.deploy.bands`, the grouping and segmenting under
the time model of :mod:`gblr.core.timemodel` in :mod:`gblr.deploy.planner`, running a
packing in :mod:`gblr.deploy.executor`, and timing candidates (``tune=True``) in
:mod:`gblr.deploy.tune`. This module holds the layer that ties them together.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from gblr.core.deprecation import FlopsAliases
from gblr.core.timemodel import time_model
from gblr.core.validate import check_float_dtype
from gblr.deploy.bands import banded_factors
from gblr.deploy.executor import CHUNK_TOKENS, _Plan
from gblr.deploy.planner import _build_plan
from gblr.deploy.tune import TUNE_VARIANTS, _fastest
from gblr.layers.gblr import GBLRLinear

__all__ = ["PackedGBLRLinear", "token_counts"]


def _token_count(value: object, tokens: object) -> int:
    """One token count: a positive integer (numpy and 0-d integer tensors included)."""
    if isinstance(value, torch.Tensor) and value.ndim == 0 and not value.is_floating_point() \
            and value.dtype is not torch.bool and not value.is_complex():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"tokens must be a positive int or a sequence of them, got {tokens!r} "
            f"({value!r} is a {type(value).__name__}, not an int)"
        )
    if value < 1:
        raise ValueError(f"tokens must be a positive int or a sequence of them, got {tokens!r}")
    return int(value)


def token_counts(tokens: object) -> int | list[int]:
    """``tokens`` of a packing checked: an int, or a non-empty sequence of ints."""
    if isinstance(tokens, str | bytes) or not isinstance(tokens, Sequence):
        return _token_count(tokens, tokens)
    counts = [_token_count(t, tokens) for t in tokens]
    if not counts:
        raise ValueError(f"tokens must be a positive int or a non-empty sequence of them, "
                         f"got {tokens!r}")
    return counts



class PackedGBLRLinear(FlopsAliases, nn.Module):
    """Frozen inference form of a :class:`~gblr.GBLRLinear` that computes only its bands.

    Build it with :meth:`from_gblr` (or ``GBLRLinear.packed()``). ``tokens`` is the number
    of tokens per call the grouping is tuned for; a sequence gives one packing per entry,
    chosen at run time by the input's token count (each packing stores its own weights).
    Inputs of any leading shape ``(..., in_features)``; outputs equal the masked layer's to
    float rounding. :meth:`macs` is the MACs per token it actually computes (band unions
    included), :attr:`true_macs` the evaluation-mode cost of the layer it came from.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        plans: Sequence[_Plan],
        bias: torch.Tensor | None = None,
        true_macs: int | None = None,
    ) -> None:
        super().__init__()
        if not plans:
            raise ValueError("plans must hold at least one packing")
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.plans = nn.ModuleList(plans)
        self._plan_seq = tuple(plans)  # plain references: indexing a ModuleList is slower
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        tok = [p.spec["tokens"] for p in plans]
        if tok != sorted(tok):
            raise ValueError(f"plans must be sorted by their token count, got {tok}")
        # switch between consecutive packings at the geometric mean of their token counts
        pairs = zip(tok[:-1], tok[1:], strict=True)
        self._switch = [float(np.sqrt(max(a, 1) * max(b, 1))) for a, b in pairs]
        self.true_macs = int(true_macs) if true_macs is not None else None

    @classmethod
    @torch.no_grad()
    def from_gblr(
        cls,
        layer: nn.Module,
        tokens: int | Sequence[int] = 64,
        dtype: torch.dtype | None = None,
        memory_tokens: int | None = None,
        overhead: float | None = None,
        io: float | None = None,
        tune: bool = False,
        allow_dense: bool = True,
    ) -> PackedGBLRLinear:
        """Pack a GBLR layer's evaluation-mode structure (whatever its current mode).

        ``memory_tokens``, ``overhead`` and ``io`` override the time model of the grouping
        (:func:`gblr.core.timemodel.time_model` for the layer's device type and each token
        count). With ``tune`` the
        candidate packings of :data:`TUNE_VARIANTS` are timed for each token count on the
        layer's device, on random inputs, and the fastest is kept (packing is slower: a few
        forwards of each candidate). With ``allow_dense`` a packing may be the layer's dense
        matrix as one GEMM, where that is modelled (or, tuned, measured) faster: small
        layers with many scattered bands.
        """

        if not isinstance(layer, GBLRLinear):
            raise TypeError(f"layer must be a GBLRLinear, got {type(layer).__name__}")
        counts = token_counts(tokens)
        token_list = [counts] if isinstance(counts, int) else counts
        dtype = layer.U.dtype if dtype is None else check_float_dtype("dtype", dtype)
        args = banded_factors(layer)
        plans = []
        for t in sorted(set(token_list)):
            # a decode step has its own per-call costs where it runs as prepared GEMVs
            model = time_model(layer.U.device.type, t, memory_tokens, overhead, io)
            if not tune:
                plans.append(_build_plan(*args, t, dtype, model,
                                         dense=None if allow_dense else False))
                continue
            candidates = [
                _build_plan(*args, t, dtype, model.scaled(f, g), split, merge,
                            dense).to(layer.U.device)
                for split, merge, f, g, dense in TUNE_VARIANTS
                if allow_dense or not dense
            ]
            plans.append(_fastest(candidates, t, layer.in_features, dtype, layer.U.device))
        bias = None if layer.bias is None else layer.bias.detach().to(dtype)
        packed = cls(layer.in_features, layer.out_features, plans, bias, layer.macs())
        return packed.to(layer.U.device)

    def plan_for(self, tokens: int) -> _Plan:
        """The packing used for ``tokens`` tokens per call."""
        i = 0
        for switch in self._switch:
            if tokens <= switch:
                break
            i += 1
        return self._plan_seq[i]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        if len(shape) == 0 or shape[-1] != self.in_features:
            raise ValueError(
                f"PackedGBLRLinear expects inputs of shape (..., {self.in_features}), "
                f"got {tuple(shape)}"
            )
        bias = self._buffers["bias"]  # (not through Module.__getattr__: a decode step is short)
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        if len(shape) == 2:  # the common case, without reshapes
            return self.plan_for(shape[0]).forward(x, bias)
        x2 = x.reshape(-1, self.in_features)
        return self.plan_for(x2.shape[0]).forward(x2, bias).reshape(*shape[:-1], self.out_features)

    def forward_plain(self, x: torch.Tensor) -> torch.Tensor:
        """The same outputs as :meth:`forward` through plain, functional ops: the path a
        graph exporter traces (``torch.onnx.export``, ``torch.export``), where
        :meth:`forward` takes it by itself (see :meth:`_Plan.forward_plain`).

        Args:
            x: inputs of shape ``(..., in_features)``.

        Returns:
            The outputs, ``(..., out_features)``.

        Example:
            >>> import gblr, torch
            >>> layer = gblr.GBLRLinear.from_dense(torch.randn(64, 32), 0.5, steps=0)
            >>> packed = layer.packed(tokens=8)
            >>> x = torch.randn(8, 32)
            >>> torch.allclose(packed.forward_plain(x), packed(x), atol=1e-5)
            True
        """
        if x.ndim == 0 or x.shape[-1] != self.in_features:
            return self(x)  # its error names the expected shape
        bias = None if self.bias is None else self.bias.to(x.dtype)
        x2 = x.reshape(-1, self.in_features)
        y = self.plan_for(x2.shape[0]).forward_plain(x2, bias)
        return y.reshape(*x.shape[:-1], self.out_features)

    def macs(self, tokens: int | None = None) -> int:
        """MACs per token this module computes (for the packing used at ``tokens``)."""
        plan = self.plans[0] if tokens is None else self.plan_for(tokens)
        return plan.macs

    def gemms(self, tokens: int | None = None) -> list[tuple[int, int, int]]:
        """The GEMM calls of the packing used at ``tokens`` as ``(batch, rows, cols)`` weights,
        per chunk of at most ``CHUNK_TOKENS`` tokens (see :attr:`sparse_nnz` for the sparse
        part)."""
        return (self.plans[0] if tokens is None else self.plan_for(tokens)).gemms()

    #: inputs longer than this run chunk by chunk (the time model counts each chunk)
    chunk_tokens = CHUNK_TOKENS

    def sparse_nnz(self, tokens: int | None = None) -> int:
        """Stored entries of the packing's sparse part (0 without one)."""
        plan = self.plans[0] if tokens is None else self.plan_for(tokens)
        return 0 if plan.sp_val is None else int(plan.sp_val.numel())

    def num_gemms(self, tokens: int | None = None) -> int:
        """GEMM calls per forward (for the packing used at ``tokens``, per chunk of
        :data:`CHUNK_TOKENS` tokens; the sparse part counts as one)."""
        plan = self.plans[0] if tokens is None else self.plan_for(tokens)
        return plan.num_gemms()

    @torch.no_grad()
    def to_dense(self) -> torch.Tensor:
        """The ``(out, in)`` matrix applied (bias excluded), from the first packing."""
        ref = next((b for b in self.plans[0].buffers() if b.is_floating_point()), None)
        if ref is None:  # every component off: no weight, the bias (if any) says the dtype
            ref = self.bias
        kw = {} if ref is None else {"dtype": ref.dtype, "device": ref.device}
        eye = torch.eye(self.in_features, **kw)
        return self.plans[0](eye, None).t()

    def extra_repr(self) -> str:
        tok = [p.spec["tokens"] for p in self.plans]
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, macs={self.macs()}, true_macs={self.true_macs}, "
            f"gemms={self.num_gemms()}, tokens={tok}"
        )
