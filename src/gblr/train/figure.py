"""Pictures of learned GBLR structure (matplotlib imported lazily)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from torch import nn

from gblr.train.groups import gblr_layers

__all__ = ["coverage", "plot_masks"]


@torch.no_grad()
def coverage(layer: nn.Module) -> torch.Tensor:
    """``(out, in)`` count of the components whose evaluation-mode box covers each entry."""
    sigma = layer.sigma
    layer.sigma = None
    try:
        m_in, m_out = layer.component_supports()
    finally:
        layer.sigma = sigma
    return m_out.float().t() @ m_in.float()


def plot_masks(model: nn.Module, path: str | os.PathLike | None = None, title: str = ""):
    """One panel per GBLR layer showing how many components cover each weight entry.

    Each panel is titled with the layer's cost as a fraction of its dense cost. Returns the
    matplotlib figure; saves it as PNG when ``path`` is given.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    layers = list(gblr_layers(model))
    if not layers:
        raise ValueError("model has no GBLR layer to plot")
    cols = min(6, len(layers))
    rows = math.ceil(len(layers) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.6 * rows), squeeze=False)
    for ax in axes.flat[len(layers):]:
        ax.axis("off")
    for ax, (name, layer) in zip(axes.flat, layers, strict=False):
        ax.imshow(coverage(layer).cpu().numpy(), cmap="viridis", aspect="auto",
                  interpolation="nearest")
        frac = layer.sharp_macs() / layer.dense_macs()
        ax.set_title(f"{name}\n{100 * frac:.1f}% of dense", fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
    return fig
