"""Pictures of a compression: where each layer's boxes lie (per layer, how many boxed
components cover each weight entry) and the held-out quality during distillation."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from gblr.layers.base import StructuredLinear
from gblr.layers.conv import GBLRConv2d

__all__ = ["coverage", "LayerImage", "layer_image", "plot_masks", "plot_curves"]

#: Measures drawn by :func:`plot_curves`, with their axis labels.
CURVE_MEASURES = {"cosine": "mean embedding cosine", "neighbours": "top-10 neighbour agreement"}


@torch.no_grad()
def coverage(layer: StructuredLinear) -> torch.Tensor:
    """``(out, in)`` count of components whose evaluation-mode box covers each entry
    (``rank_per_component`` per component; full-width components included).

    For layers without components (the other structures) it is 1 where the dense matrix
    is nonzero, so every structure can be drawn the same way.
    """
    supports = getattr(layer, "component_supports", None)
    if callable(supports):
        in_support, out_support = supports()
        ranks = float(getattr(layer, "rank_per_component", 1))
        return (out_support.float().t() @ in_support.float()) * ranks
    return _nonzero(layer)


@torch.no_grad()
def _nonzero(layer: nn.Module) -> torch.Tensor:
    was = layer.training
    layer.eval()
    try:
        return (layer.to_dense() != 0).float()
    finally:
        layer.train(was)


@dataclass
class LayerImage:
    """What :func:`plot_masks` draws for one layer.

    ``image``: ``(out, in)`` float tensor (``(out, taps * in)`` for a per-tap GBLR conv, the
    taps side by side). For a GBLR layer it counts, at each weight entry, the rank of the
    active components whose box covers it, leaving out the components that cover the whole
    matrix (``full`` counts those components: they would only add the same number
    everywhere and hide the boxes); for the other structures it is 1 where the
    evaluation-mode matrix is nonzero. ``active``: the active components (None for other
    structures).
    """

    image: torch.Tensor
    label: str
    full: int = 0
    active: int | None = None


@torch.no_grad()
def _gblr_image(layer: nn.Module) -> tuple[torch.Tensor, int, int]:
    in_support, out_support = layer.component_supports()
    on = in_support.any(1) & out_support.any(1)
    full = on & in_support.all(1) & out_support.all(1)
    boxed = on & ~full
    rank = float(layer.rank_per_component)
    image = (out_support[boxed].float().t() @ in_support[boxed].float()) * rank
    return image, int(full.sum()), int(on.sum())


@torch.no_grad()
def layer_image(layer: nn.Module) -> LayerImage:
    """The image :func:`plot_masks` draws for ``layer`` (see :class:`LayerImage`)."""
    if isinstance(layer, GBLRConv2d):
        parts = [_gblr_image(linear) for linear in layer.linears]
        return LayerImage(torch.cat([p[0] for p in parts], dim=1), "rank of boxed components",
                          sum(p[1] for p in parts), sum(p[2] for p in parts))
    if callable(getattr(layer, "component_supports", None)):
        image, full, active = _gblr_image(layer)
        return LayerImage(image, "rank of boxed components", full, active)
    return LayerImage(_nonzero(layer), "nonzero entries")


def _drawn_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Structured layers and GBLR convs, not counting the matrices inside a conv."""
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if any(name.startswith(f"{outer}.") for outer, _ in found):
            continue
        if isinstance(module, StructuredLinear | GBLRConv2d):
            found.append((name, module))
    return found


def plot_masks(model: nn.Module, path: str | Path, max_layers: int = 48, title: str = "") -> Path:
    """Write a grid of per-layer images of where the boxes lie to ``path``.

    One panel per structured layer (the first ``max_layers``), rows of the weight
    (outputs) down and columns (inputs) across, in the layer's own proportions: the colour
    is the rank of the active components whose box covers the entry, full-width
    (low-rank) components left out and counted in the title, with the layer's cost as a
    fraction of its dense cost; each panel has its colour bar. Layers of other structures
    show where their matrix is nonzero.
    """
    plt = _pyplot()
    from matplotlib.colors import ListedColormap

    layers = _drawn_layers(model)
    if not layers:
        raise ValueError("model has no structured layers to draw")
    shown = layers[:max_layers]
    cols = min(6, len(shown))
    rows = math.ceil(len(shown) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.9 * cols, 2.7 * rows + 0.4),
                             squeeze=False, layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    prefix = os.path.commonprefix([n for n, _ in shown])
    prefix = prefix[: prefix.rfind(".") + 1] if len(shown) > 1 else ""
    cmap = plt.get_cmap("viridis").copy()
    for ax, (name, layer) in zip(axes.flat, shown, strict=False):
        drawn = layer_image(layer)
        image = drawn.image.float().cpu().numpy()
        top = float(image.max())
        if top <= 0:  # nothing boxed: a plain panel, the title says what is there
            im = ax.imshow(image, cmap=ListedColormap(["#d9d9d9"]), vmin=0, vmax=1,
                           interpolation="nearest")
        else:
            im = ax.imshow(image, cmap=cmap, vmin=0, vmax=top, interpolation="nearest")
        ax.axis("on")
        ax.set_xticks([])
        ax.set_yticks([])
        frac = layer.macs() / layer.dense_macs()
        short = name[len(prefix):] or name
        out_n, in_n = image.shape
        detail = f"{out_n}x{in_n}, {frac:.2f} of dense"
        if drawn.active is not None:
            detail += f"\n{drawn.active} components, {drawn.full} full-width"
        ax.set_title(f"{short}\n{detail}", fontsize=7)
        bar = fig.colorbar(im, ax=ax, shrink=0.8, pad=0.02)
        bar.ax.tick_params(labelsize=6)
        bar.set_label(drawn.label, fontsize=6)
        if top <= 0:
            bar.set_ticks([])
            ax.text(0.5, 0.5, "full-width only" if drawn.full else "empty",
                    transform=ax.transAxes, ha="center", va="center", fontsize=7)
    note = ("GBLR layers: rank of the boxed components covering each weight entry "
            "(full-width, low-rank components left out, counted in each title)")
    if len(layers) > len(shown):
        note += f"; first {len(shown)} of {len(layers)} layers"
    fig.suptitle(f"{title}\n{note}" if title else note, fontsize=9)
    return _save(fig, path, layout=False)


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


def _save(fig, path: str | Path, layout: bool = True) -> Path:
    """Lay out ``fig`` (unless it has its own layout), write it to ``path`` (folders made as
    needed) and close it."""
    if layout:
        fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path
