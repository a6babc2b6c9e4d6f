"""The learned-mask picture: per layer, how many components cover each weight entry."""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from torch import nn

from gblr.layers.base import StructuredLinear

__all__ = ["coverage", "plot_masks"]


@torch.no_grad()
def coverage(layer: StructuredLinear) -> torch.Tensor:
    """``(out, in)`` count of components whose evaluation-mode box covers each entry.

    For layers without components (the other structures) it is 1 where the dense matrix
    is nonzero, so every structure can be drawn the same way.
    """
    supports = getattr(layer, "component_supports", None)
    if callable(supports):
        in_support, out_support = supports()
        ranks = float(getattr(layer, "rank_per_component", 1))
        return (out_support.float().t() @ in_support.float()) * ranks
    was = layer.training
    layer.eval()
    try:
        return (layer.to_dense() != 0).float()
    finally:
        layer.train(was)


def plot_masks(model: nn.Module, path: str | Path, max_layers: int = 48, title: str = "") -> Path:
    """Write a grid of per-layer coverage images (brighter: more components overlap) to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, StructuredLinear)]
    if not layers:
        raise ValueError("model has no structured layers to draw")
    layers = layers[:max_layers]
    cols = min(6, len(layers))
    rows = math.ceil(len(layers) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.5 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    prefix = os.path.commonprefix([n for n, _ in layers])
    prefix = prefix[: prefix.rfind(".") + 1] if len(layers) > 1 else ""
    for ax, (name, layer) in zip(axes.flat, layers, strict=False):
        image = coverage(layer).cpu().numpy()
        ax.imshow(image, cmap="inferno", aspect="auto", interpolation="nearest",
                  vmin=0, vmax=max(1.0, float(image.max())))
        frac = layer.flops() / layer.dense_flops()
        short = name[len(prefix):] or name
        ax.set_title(f"{short}\n{frac:.2f} of dense", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
