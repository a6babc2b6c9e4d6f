"""``gblr.deploy(model)``: swap every GBLR layer of a model for its packed form, in place."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from gblr.core.surgery import replace_modules
from gblr.deploy.packed import PackedGBLRLinear, token_counts
from gblr.deploy.tiled import TiledGBLRLinear
from gblr.layers.base import StructuredLinear
from gblr.layers.conv import GBLRConv2d
from gblr.layers.gblr import GBLRLinear

__all__ = ["deploy", "DeployReport", "LayerReport", "FORMS"]

#: Inference forms of :func:`deploy`: grouped GEMMs (:class:`PackedGBLRLinear`, fastest on
#: CPU) or block-sparse tiles (:class:`TiledGBLRLinear`, two Triton kernels on CUDA).
FORMS = ("grouped", "tiled")


@dataclass
class LayerReport:
    """What one packed layer computes: MACs per token and GEMM calls."""

    name: str
    in_features: int
    out_features: int
    true_macs: int
    packed_macs: int
    gemms: int

    @property
    def dense_macs(self) -> int:
        return self.in_features * self.out_features


@dataclass
class DeployReport:
    """Per-layer and total costs of a deployment (MACs per token, bias excluded)."""

    layers: list[LayerReport] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @property
    def true_macs(self) -> int:
        return sum(r.true_macs for r in self.layers)

    @property
    def packed_macs(self) -> int:
        return sum(r.packed_macs for r in self.layers)

    @property
    def dense_macs(self) -> int:
        return sum(r.dense_macs for r in self.layers)

    def __str__(self) -> str:
        head = f"{'layer':<40} {'shape':>11} {'true/dense':>10} {'packed/dense':>12} {'gemms':>5}"
        lines = [head]
        for r in self.layers:
            lines.append(
                f"{r.name:<40} {f'{r.in_features}->{r.out_features}':>11} "
                f"{r.true_macs / r.dense_macs:>10.3f} {r.packed_macs / r.dense_macs:>12.3f} "
                f"{r.gemms:>5}"
            )
        if self.layers:
            lines.append(
                f"{'total':<40} {'':>11} {self.true_macs / self.dense_macs:>10.3f} "
                f"{self.packed_macs / self.dense_macs:>12.3f}"
            )
        if self.skipped:
            lines.append(f"left as they are (not GBLR): {', '.join(self.skipped)}")
        return "\n".join(lines)


@torch.no_grad()
def deploy(
    model: nn.Module,
    tokens: int | Sequence[int] = 64,
    dtype: torch.dtype | None = None,
    memory_tokens: int | None = None,
    overhead: float | None = None,
    io: float | None = None,
    tune: bool = False,
    form: str = "grouped",
) -> DeployReport:
    """Replace every :class:`~gblr.GBLRLinear` inside ``model`` by its inference form.

    ``form="grouped"`` (default) packs each layer as a :class:`PackedGBLRLinear`;
    ``form="tiled"`` as a :class:`TiledGBLRLinear` (one Triton kernel per stage on CUDA;
    ``tokens``, ``memory_tokens``, ``overhead``, ``io`` and ``tune`` do not apply to it).

    The evaluation-mode structure is packed whatever the current mode; other modules are
    left alone (other structured layers and GBLR convolutions are listed in the report as
    skipped). ``tokens`` is
    the tokens-per-call the grouping is tuned for (a sequence: one packing per entry);
    ``memory_tokens``, ``overhead`` and ``io`` override the device's time model
    (``gblr.core.timemodel.time_model``); ``tune`` times candidate packings of each layer
    on its device and keeps the fastest (see ``PackedGBLRLinear.from_gblr``).
    Returns a :class:`DeployReport`. To pack a lone layer use ``GBLRLinear.packed()``.
    """

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    tokens = token_counts(tokens)
    grouping = {"memory_tokens": memory_tokens, "overhead": overhead, "io": io}
    unused = [k for k, v in grouping.items() if v is not None] + (["tune"] if tune else [])
    if form == "tiled" and unused:
        raise ValueError(f"{unused} set the grouping of form='grouped'; form='tiled' has none")
    if isinstance(model, GBLRLinear):
        raise TypeError(
            "deploy() swaps layers inside a model in place; pack a lone layer with "
            "layer.packed()"
        )

    report = DeployReport()
    # a GBLR convolution computes from its GBLRLinear children's factors: it stays whole
    convs = [n for n, m in model.named_modules() if isinstance(m, GBLRConv2d)]
    targets = [
        (n, m) for n, m in model.named_modules()
        if isinstance(m, GBLRLinear) and not any(n.startswith(c + ".") for c in convs)
    ]
    report.skipped = [
        n for n, m in model.named_modules()
        if isinstance(m, StructuredLinear) and not isinstance(m, GBLRLinear)
    ] + convs
    if not targets:
        kinds = sorted({type(m).__name__ for n, m in model.named_modules()
                        if n in report.skipped})
        warnings.warn(
            "deploy(): the model has no GBLRLinear layer to pack, so nothing changed"
            + (f" ({len(report.skipped)} other structured layers, {', '.join(kinds)}, already "
               "run as they are)" if report.skipped else
               " (compress or train it with GBLR layers first)"),
            UserWarning, stacklevel=3,
        )

    def pack(name: str, layer: GBLRLinear) -> nn.Module:
        if form == "tiled":
            return TiledGBLRLinear.from_gblr(layer, dtype=dtype)
        return PackedGBLRLinear.from_gblr(
            layer, tokens=tokens, dtype=dtype, memory_tokens=memory_tokens,
            overhead=overhead, io=io, tune=tune,
        )

    created = replace_modules(model, targets, pack)
    for (name, layer), packed in zip(targets, created.values(), strict=True):
        report.layers.append(
            LayerReport(name, layer.in_features, layer.out_features, int(packed.true_macs),
                        packed.macs(), packed.num_gemms())
        )
    return report
