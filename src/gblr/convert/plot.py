"""Pictures of a compression: the learned masks (per layer, how many components cover each
weight entry) and the held-out quality during distillation."""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from torch import nn

from gblr.layers.base import StructuredLinear

__all__ = ["coverage", "plot_masks", "plot_curves"]

#: Measures drawn by :func:`plot_curves`, with their axis labels.
CURVE_MEASURES = {"cosine": "mean embedding cosine", "neighbours": "top-10 neighbour agreement"}


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
    plt = _pyplot()

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
        frac = layer.macs() / layer.dense_macs()
        short = name[len(prefix):] or name
        ax.set_title(f"{short}\n{frac:.2f} of dense", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def plot_curves(curves: dict[str, list[dict[str, float]]], path: str | Path,
                title: str = "") -> Path:
    """Held-out quality against distillation steps, one line per run, written to ``path``.

    ``curves`` maps a label (e.g. a structure) to ``DistillResult.curve``; one panel is drawn
    per measure of :data:`CURVE_MEASURES` that the curves hold.
    """
    plt = _pyplot()

    curves = {label: points for label, points in curves.items() if points}
    if not curves:
        raise ValueError("no curve points to draw (distil with an evaluate function)")
    measures = [m for m in CURVE_MEASURES if any(m in p for pts in curves.values() for p in pts)]
    if not measures:
        raise ValueError(f"the curves hold none of the measures {list(CURVE_MEASURES)}")
    fig, axes = plt.subplots(1, len(measures), figsize=(5.2 * len(measures), 3.8),
                             squeeze=False)
    for ax, measure in zip(axes[0], measures, strict=True):
        for label, points in curves.items():
            kept = [p for p in points if measure in p]
            ax.plot([p["step"] for p in kept], [p[measure] for p in kept], marker="o",
                    markersize=3, label=label)
        ax.set_xlabel("distillation step")
        ax.set_ylabel(CURVE_MEASURES[measure])
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def _pyplot():
    """``matplotlib.pyplot`` on the file-only Agg backend (imported on first use)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    """Lay out ``fig``, write it to ``path`` (folders made as needed) and close it."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path
