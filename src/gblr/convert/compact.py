"""The compact saved form of GBLR layers: what the evaluation-mode structure uses.

A GBLR layer with sharp masks (``sigma=None``) keeps only its active components, and of each
only the rows of ``U_c`` inside its output box and the columns of ``V_c`` inside its input
box, stored as ``U (sum of box heights, r)`` and ``V (r, sum of box widths)``;
:func:`expand_compact` puts them back in place (zeros outside the boxes), so the
evaluation-mode outputs and ``macs()`` are those of the saved layer. A GBLR conv keeps every
component slot (its matrices share one component count), an inactive one with zero widths
and no factor entries. :mod:`gblr.convert.io` writes and reads the files.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from gblr.core.boxes import integer_boxes
from gblr.core.validate import check_finite
from gblr.layers.conv import GBLRConv2d
from gblr.layers.gblr import GBLRLinear

__all__ = ["compact_layer", "expand_compact"]


def _box_index(lengths: torch.Tensor, starts: torch.Tensor,
               n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(index along the axis, component)`` of every entry inside the cyclic boxes, the
    components one after the other, each box from its start (``(sum of lengths,)`` each)."""
    lengths = lengths.cpu()
    comp = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)
    first = torch.cumsum(lengths, 0) - lengths
    within = torch.arange(int(lengths.sum())) - first[comp] if comp.numel() else comp
    return (starts.cpu()[comp] + within) % n, comp


def _factor_columns(comp: torch.Tensor, rank: int) -> torch.Tensor:
    """Columns of ``U`` (rows of ``V``) of each entry's component: ``(entries, rank)``."""
    return comp[:, None] * rank + torch.arange(rank)


@torch.no_grad()
def _compact_factors(layer: GBLRLinear, widths: torch.Tensor, locations: torch.Tensor,
                     columns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The box parts of the factor columns ``columns`` (``(K', r)``, one row per kept
    component), whose boxes are ``widths`` and ``locations`` (``(2, K')``):
    ``U (sum of box heights, r)`` and ``V (r, sum of box widths)``."""
    n_in, n_out, r = layer.in_features, layer.out_features, layer.rank_per_component
    in_len, in_start, out_len, out_start = integer_boxes(widths, locations, n_in, n_out)
    rows, comp = _box_index(out_len, out_start, n_out)
    u = layer.U.detach()[rows[:, None].to(layer.U.device), columns[comp].to(layer.U.device)]
    cols, comp = _box_index(in_len, in_start, n_in)
    v = layer.V.detach()[columns[comp].to(layer.V.device), cols[:, None].to(layer.V.device)]
    return u.reshape(-1, r), v.reshape(-1, r).t()


def _expand_factors(u: torch.Tensor, v: torch.Tensor, widths: torch.Tensor,
                    locations: torch.Tensor, n_in: int, n_out: int,
                    rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`_compact_factors`: full ``U (out, K r)`` and ``V (K r, in)``,
    zero outside the boxes."""
    k = widths.shape[1]
    in_len, in_start, out_len, out_start = integer_boxes(widths, locations, n_in, n_out)
    full_u = u.new_zeros(n_out, k * rank)
    rows, comp = _box_index(out_len, out_start, n_out)
    full_u[rows[:, None], _factor_columns(comp, rank)] = u
    full_v = v.new_zeros(k * rank, n_in)
    cols, comp = _box_index(in_len, in_start, n_in)
    full_v[_factor_columns(comp, rank), cols[:, None]] = v.t()
    return full_u, full_v


def _compact_shapes(widths: torch.Tensor, locations: torch.Tensor, n_in: int, n_out: int,
                    rank: int) -> tuple[tuple[int, int], tuple[int, int]]:
    in_len, _, out_len, _ = integer_boxes(widths, locations, n_in, n_out)
    return (int(out_len.sum()), rank), (rank, int(in_len.sum()))


@torch.no_grad()
def _boxes_are_supports(layer: GBLRLinear, keep: torch.Tensor) -> bool:
    """Whether the evaluation-mode masks of the components ``keep`` are exactly their
    integer boxes (they are with sharp masks; checked, never assumed)."""
    m_in, m_out = layer.eval_masks()
    in_len, in_start, out_len, out_start = integer_boxes(
        layer.widths[:, keep], layer.locations[:, keep], layer.in_features, layer.out_features)
    for mask, lengths, starts, n in ((m_in[keep], in_len, in_start, layer.in_features),
                                     (m_out[keep], out_len, out_start, layer.out_features)):
        box = torch.zeros(mask.shape, dtype=torch.bool)
        index, comp = _box_index(lengths, starts, n)
        box[comp, index] = True
        if not torch.equal(mask.cpu() != 0, box):
            return False
    return True


@torch.no_grad()
def _compact_linear(layer: GBLRLinear, drop: bool) -> dict[str, torch.Tensor] | None:
    """The compact tensors of a GBLR matrix, ``{"U", "V", "widths", "locations"}``, or
    None when it is kept whole (smooth masks, or masks that are not exactly the boxes).

    With ``drop`` the inactive components are left out (a placeholder of zero width
    stands in when none is active: a layer has at least one component); without, they
    stay as components of zero width (a GBLR conv's matrices share one count)."""
    if layer.sigma is not None:
        return None
    active = layer.active_components().cpu()
    keep = active.nonzero().squeeze(1) if drop else torch.arange(layer.num_components)
    if not _boxes_are_supports(layer, active.nonzero().squeeze(1)):
        return None
    widths = layer.widths.detach()[:, keep.to(layer.widths.device)].clone()
    locations = layer.locations.detach()[:, keep.to(layer.widths.device)].clone()
    if not drop:
        widths[:, ~active.to(widths.device)] = 0.0
    if keep.numel() == 0:
        widths = layer.widths.new_zeros(2, 1)
        locations = layer.locations.new_zeros(2, 1)
    columns = _factor_columns(keep, layer.rank_per_component)
    if keep.numel() == 0:
        columns = _factor_columns(torch.zeros(1, dtype=torch.long), layer.rank_per_component)
    u, v = _compact_factors(layer, widths, locations, columns)
    return {"U": u, "V": v, "widths": widths, "locations": locations}


def compact_layer(module: nn.Module) -> dict[str, torch.Tensor] | None:
    """State-dict tensors (names relative to ``module``) that replace its own in the
    compact form, or None when the layer is saved whole."""
    if isinstance(module, GBLRLinear):
        return _compact_linear(module, drop=True)
    if isinstance(module, GBLRConv2d):
        tensors: dict[str, torch.Tensor] = {}
        for t, linear in enumerate(module.linears):
            part = _compact_linear(linear, drop=False)
            if part is None:
                return None
            tensors.update({f"linears.{t}.{name}": x for name, x in part.items()})
        return tensors
    return None


def _compact_matrices(name: str, module: nn.Module) -> list[tuple[str, GBLRLinear]]:
    """``(state-dict prefix, GBLR matrix)`` of a layer saved in the compact form."""
    if isinstance(module, GBLRConv2d):
        return [(f"{name}.linears.{t}", lin) for t, lin in enumerate(module.linears)]
    if isinstance(module, GBLRLinear):
        return [(name, module)]
    raise ValueError(f"layer {name!r}: the compact form is for GBLR layers, not "
                     f"{type(module).__name__}")


def expand_compact(weights: Path, name: str, module: nn.Module,
                    state: dict[str, torch.Tensor]) -> None:
    """Replace, in ``state``, the compact factors of the layer ``name`` (rebuilt as
    ``module``, unattached) by full ones; every tensor they depend on is checked first."""
    for prefix, linear in _compact_matrices(name, module):
        k, r = linear.num_components, linear.rank_per_component
        tensors = {}
        for part in ("U", "V", "widths", "locations"):
            key = f"{prefix}.{part}"
            tensor = state[key]
            if not tensor.is_floating_point():
                raise ValueError(f"{weights}: tensor {key} is {tensor.dtype}, not floating point")
            try:
                check_finite(key, tensor)
            except ValueError as err:
                raise ValueError(f"{weights}: {err}") from None
            tensors[part] = tensor
        for part in ("widths", "locations"):
            if tuple(tensors[part].shape) != (2, k):
                raise ValueError(
                    f"{weights} does not fit the rebuilt model: tensor {prefix}.{part} has "
                    f"shape {tuple(tensors[part].shape)}, the model's is {(2, k)}")
        shapes = _compact_shapes(tensors["widths"], tensors["locations"], linear.in_features,
                                 linear.out_features, r)
        for part, shape in zip(("U", "V"), shapes, strict=True):
            if tuple(tensors[part].shape) != shape:
                raise ValueError(
                    f"{weights} does not fit the rebuilt model: compact tensor {prefix}.{part} "
                    f"has shape {tuple(tensors[part].shape)}, its boxes need {shape}")
        state[f"{prefix}.U"], state[f"{prefix}.V"] = _expand_factors(
            tensors["U"], tensors["V"], tensors["widths"], tensors["locations"],
            linear.in_features, linear.out_features, r)
