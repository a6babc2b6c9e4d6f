"""Per-layer cost report of a model: every structured layer and every dense Linear/Conv.

Costs follow :mod:`gblr.cost`: MACs per token for linear layers, MACs per output
position (one output pixel of one image) for convolutions, bias excluded, and the
evaluation-mode cost for GBLR layers. Given example inputs, the report also counts
how many tokens/positions each layer processes in one forward pass, and so the MACs
of that pass; ``torch.utils.flop_counter.FlopCounterMode`` reports twice that
(it counts FLOPs = 2 MACs), see :func:`gblr.accounting.count_flops`.

Beside the MACs each row gives three parameter counts (bias included): ``params``, what
the layer holds; ``eval_params``, what its evaluation-mode structure uses (for a GBLR
layer with sharp masks the rows of ``U_c`` and columns of ``V_c`` inside the boxes of its
active components, with their widths and locations: what ``gblr.save_compressed`` writes
by default); ``dense_params``, what the dense layer it stands for holds.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from gblr.core.boxes import integer_boxes
from gblr.layers.conv import GBLRConv2d
from gblr.layers.gblr import GBLRLinear

__all__ = ["LayerCost", "FlopsReport", "flops_report", "layer_cost", "eval_parameters"]


@dataclass(frozen=True)
class LayerCost:
    """Cost of one layer. ``macs`` and ``dense_macs`` are per token (per output position
    for convolutions); ``positions`` is how many it processed in the measured forward
    pass (None when no input was given). ``params`` is the parameters the layer holds,
    ``eval_params`` those its evaluation-mode structure uses (:func:`eval_parameters`),
    ``dense_params`` those of the dense layer it replaces (``params`` for a dense layer)."""

    name: str
    kind: str
    shape: str
    structure: str
    macs: int
    dense_macs: int
    params: int
    structured: bool
    positions: int | None = None
    eval_params: int | None = None
    dense_params: int | None = None

    @property
    def fraction(self) -> float:
        """Cost as a fraction of the dense layer's cost."""
        return self.macs / self.dense_macs if self.dense_macs else 0.0

    @property
    def total_macs(self) -> int | None:
        """MACs of the measured forward pass (``macs * positions``)."""
        return None if self.positions is None else self.macs * self.positions

    def to_dict(self) -> dict[str, Any]:
        row = asdict(self)
        row["fraction"] = self.fraction
        row["total_macs"] = self.total_macs
        return row


def _is_structured(module: nn.Module) -> bool:
    return callable(getattr(module, "macs", None)) and callable(
        getattr(module, "dense_macs", None)
    )


def _is_hf_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2): a linear layer whose weight is stored ``(in, out)``."""
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__ == "Conv1D"
        and isinstance(weight, torch.Tensor)
        and weight.dim() == 2
        and hasattr(module, "nf")
    )


_DENSE_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _out_dim(module: nn.Module) -> tuple[int, int]:
    """``(output feature count, dim that holds it)`` used to count tokens/positions."""
    if isinstance(module, _DENSE_CONVS) or hasattr(module, "out_channels"):
        return module.out_channels, 1
    if _is_hf_conv1d(module):
        return module.nf, -1
    return module.out_features, -1


@torch.no_grad()
def _gblr_box_parameters(layer: GBLRLinear) -> int | None:
    """Factor entries inside the boxes of the active components, plus their widths and
    locations (``4`` per component); None with smooth masks (``sigma`` set), whose
    evaluation uses the factors beyond the boxes."""
    if layer.sigma is not None:
        return None
    on = layer.active_components().cpu()
    in_len, _, out_len, _ = integer_boxes(layer.widths, layer.locations, layer.in_features,
                                          layer.out_features)
    boxes = int((in_len.cpu() + out_len.cpu())[on].sum()) * layer.rank_per_component
    return boxes + 4 * max(1, int(on.sum()))


def eval_parameters(module: nn.Module) -> int:
    """Parameters (bias included) that ``module``'s evaluation-mode structure uses.

    For a :class:`~gblr.GBLRLinear` with sharp masks (``sigma=None``): the rows of each
    active component's ``U_c`` inside its output box and the columns of ``V_c`` inside its
    input box, with the widths and locations of the active components (of one placeholder
    when none is active) and the bias. A :class:`~gblr.GBLRConv2d` counts its matrices the
    same way but keeps the widths and locations of every component slot. With smooth
    masks (``sigma`` set) and for every other layer: all its parameters. This is what
    ``gblr.save_compressed`` writes by default (its compact form).
    """
    held = sum(p.numel() for p in module.parameters())
    if isinstance(module, GBLRLinear):
        boxes = _gblr_box_parameters(module)
        if boxes is not None:
            return boxes + (0 if module.bias is None else module.bias.numel())
    if isinstance(module, GBLRConv2d):
        counts = [_gblr_box_parameters(linear) for linear in module.linears]
        if all(c is not None for c in counts):
            slots = sum(4 * (linear.num_components - max(1, int(linear.active_components().sum())))
                        for linear in module.linears)
            return sum(counts) + slots + (0 if module.bias is None else module.bias.numel())
    return held


def _dense_parameters(module: nn.Module) -> int:
    """Parameters of the dense layer a structured ``module`` stands for, bias included."""
    bias = getattr(module, "bias", None)
    return int(module.dense_macs()) + (0 if bias is None else bias.numel())


def layer_cost(name: str, module: nn.Module) -> LayerCost | None:
    """The :class:`LayerCost` of ``module``, or None if it is not a layer the report covers."""
    params = sum(p.numel() for p in module.parameters())
    counts = {"eval_params": params, "dense_params": params}
    if _is_structured(module):
        macs, dense = int(module.macs()), int(module.dense_macs())
        counts = {"eval_params": eval_parameters(module),
                  "dense_params": _dense_parameters(module)}
        structure = getattr(module, "structure_name", type(module).__name__)
        if hasattr(module, "out_channels"):
            k = "x".join(str(s) for s in module.kernel_size)
            shape = f"{module.in_channels}->{module.out_channels} k{k}"
            if getattr(module, "per_tap", False):
                structure = f"{structure} (per tap)"
        else:
            shape = f"{module.in_features}->{module.out_features}"
        return LayerCost(name, type(module).__name__, shape, structure, macs, dense, params, True,
                         **counts)
    if isinstance(module, nn.Linear):
        macs = module.in_features * module.out_features
        shape = f"{module.in_features}->{module.out_features}"
        return LayerCost(name, "Linear", shape, "dense", macs, macs, params, False, **counts)
    if _is_hf_conv1d(module):
        n_in, n_out = module.weight.shape
        macs = n_in * n_out
        return LayerCost(name, "Conv1D", f"{n_in}->{n_out}", "dense", macs, macs, params, False,
                         **counts)
    if isinstance(module, _DENSE_CONVS):
        macs = module.out_channels * (module.in_channels // module.groups)
        macs *= math.prod(module.kernel_size)
        k = "x".join(str(s) for s in module.kernel_size)
        shape = f"{module.in_channels}->{module.out_channels} k{k}"
        if module.groups != 1:
            shape += f" g{module.groups}"
        return LayerCost(name, type(module).__name__, shape, "dense", macs, macs, params, False,
                         **counts)
    return None


class FlopsReport:
    """The rows of :func:`flops_report` and their totals; ``str()`` gives a table."""

    def __init__(self, rows: list[LayerCost], measured: bool) -> None:
        self.rows = rows
        self.measured = measured

    @property
    def total_macs_per_token(self) -> int:
        """Sum of the listed layers' per-token (per-position) costs."""
        return sum(r.macs for r in self.rows)

    @property
    def dense_macs_per_token(self) -> int:
        """The same sum with every structured layer replaced by its dense layer."""
        return sum(r.dense_macs for r in self.rows)

    @property
    def structured_macs(self) -> int:
        """Per-token cost of the structured layers."""
        return sum(r.macs for r in self.rows if r.structured)

    @property
    def replaced_dense_macs(self) -> int:
        """Per-token dense cost of the layers that the structured layers replace."""
        return sum(r.dense_macs for r in self.rows if r.structured)

    @property
    def structured_fraction(self) -> float:
        """Cost of the structured layers as a fraction of their dense cost (the budget)."""
        dense = self.replaced_dense_macs
        return self.structured_macs / dense if dense else 1.0

    @property
    def fraction(self) -> float:
        """Cost of all listed layers as a fraction of the all-dense model."""
        dense = self.dense_macs_per_token
        return self.total_macs_per_token / dense if dense else 1.0

    @property
    def total_macs(self) -> int | None:
        """MACs of the measured forward pass over all listed layers (None without inputs)."""
        if not self.measured:
            return None
        return sum(r.total_macs or 0 for r in self.rows)

    @property
    def dense_total_macs(self) -> int | None:
        """MACs of the measured forward pass if every structured layer were dense."""
        if not self.measured:
            return None
        return sum(r.dense_macs * (r.positions or 0) for r in self.rows)

    @property
    def parameters(self) -> int:
        """Parameters the listed layers hold (bias included)."""
        return sum(r.params for r in self.rows)

    @property
    def eval_parameters(self) -> int:
        """Parameters the listed layers' evaluation-mode structures use (what
        ``gblr.save_compressed`` writes of them by default)."""
        return sum(r.params if r.eval_params is None else r.eval_params for r in self.rows)

    @property
    def dense_parameters(self) -> int:
        """Parameters of the listed layers with every structured layer dense."""
        return sum(r.params if r.dense_params is None else r.dense_params for r in self.rows)

    def totals(self) -> dict[str, Any]:
        return {
            "layers": len(self.rows),
            "structured_layers": sum(r.structured for r in self.rows),
            "macs_per_token": self.total_macs_per_token,
            "dense_macs_per_token": self.dense_macs_per_token,
            "fraction": self.fraction,
            "structured_macs_per_token": self.structured_macs,
            "replaced_dense_macs_per_token": self.replaced_dense_macs,
            "structured_fraction": self.structured_fraction,
            "total_macs": self.total_macs,
            "dense_total_macs": self.dense_total_macs,
            "parameters": self.parameters,
            "eval_parameters": self.eval_parameters,
            "dense_parameters": self.dense_parameters,
        }

    def to_dict(self) -> dict[str, Any]:
        return {"layers": [r.to_dict() for r in self.rows], "totals": self.totals()}

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self):
        return iter(self.rows)

    def __str__(self) -> str:
        header = ["layer", "type", "shape", "structure", "MACs/token", "of dense", "params",
                  "eval params"]
        if self.measured:
            header += ["tokens", "MACs"]
        table = [header]
        for r in self.rows:
            used = r.params if r.eval_params is None else r.eval_params
            line = [
                r.name or "(model)", r.kind, r.shape, r.structure, f"{r.macs:,}",
                f"{r.fraction:.3f}", f"{r.params:,}", f"{used:,}",
            ]
            if self.measured:
                line += [f"{r.positions or 0:,}", f"{r.total_macs or 0:,}"]
            table.append(line)
        widths = [max(len(row[i]) for row in table) for i in range(len(header))]
        left = {0, 1, 2, 3}

        def fmt(row: list[str]) -> str:
            cells = [c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in
                     enumerate(zip(row, widths, strict=True))]
            return "  ".join(cells).rstrip()

        lines = [fmt(table[0]), "  ".join("-" * w for w in widths)]
        lines += [fmt(row) for row in table[1:]]
        lines.append("")
        lines.append(
            f"total: {self.total_macs_per_token:,} MACs/token, "
            f"{self.fraction:.3f} of dense ({self.dense_macs_per_token:,})"
        )
        lines.append(
            f"structured layers: {self.structured_macs:,} MACs/token, dense cost of the "
            f"replaced layers {self.replaced_dense_macs:,}, fraction {self.structured_fraction:.3f}"
        )
        lines.append(
            f"parameters: {self.parameters:,} held, {self.eval_parameters:,} used in "
            f"evaluation (what gblr.save_compressed writes), {self.dense_parameters:,} if dense"
        )
        if self.measured:
            lines.append(
                f"forward pass: {self.total_macs:,} MACs ({2 * self.total_macs:,} FLOPs), "
                f"dense: {self.dense_total_macs:,} MACs"
            )
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (
            f"FlopsReport(layers={len(self.rows)}, macs_per_token={self.total_macs_per_token}, "
            f"fraction={self.fraction:.4f})"
        )


def _covered_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Reported modules in order; the children of a reported module are not reported."""
    found: list[tuple[str, nn.Module]] = []
    skip: list[str] = []
    for name, module in model.named_modules():
        if any(name == s or name.startswith(s + ".") for s in skip):
            continue
        if layer_cost(name, module) is not None:
            found.append((name, module))
            skip.append(name)
    return found


@torch.no_grad()
def flops_report(model: nn.Module, *inputs: Any, **kwargs: Any) -> FlopsReport:
    """Cost of every structured layer and dense Linear/Conv in ``model``.

    Without inputs, rows give per-token (per output position) costs. With example
    ``inputs`` (and ``kwargs``) for ``model(*inputs, **kwargs)``, one forward pass runs
    under ``torch.no_grad()`` in the model's current mode, and each row also records the
    tokens/positions it processed (summed over calls), so totals give the MACs of that pass.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    covered = _covered_modules(model)
    positions: dict[str, int] = {}
    measured = bool(inputs or kwargs)
    if measured:
        handles = []
        for name, module in covered:
            out_features, dim = _out_dim(module)

            def hook(mod, args, output, name=name, n=out_features, dim=dim):
                if isinstance(output, torch.Tensor) and output.shape[dim] == n:
                    positions[name] = positions.get(name, 0) + output.numel() // n

            handles.append(module.register_forward_hook(hook))
        try:
            model(*inputs, **kwargs)
        finally:
            for handle in handles:
                handle.remove()
    rows = []
    for name, module in covered:
        row = layer_cost(name, module)
        if measured:
            row = LayerCost(**{**asdict(row), "positions": positions.get(name, 0)})
        rows.append(row)
    return FlopsReport(rows, measured)
