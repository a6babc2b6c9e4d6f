"""``gblr.export_onnx``: a deployed model as an ONNX file, checked against PyTorch.

The packed layers of :func:`gblr.deploy` run scratch buffers, ``out=`` GEMMs and cached
views in PyTorch; while an exporter traces them they take their plain path
(:meth:`PackedGBLRLinear.forward_plain`): the same GEMMs as functional ops, so each packed
layer becomes its few ``MatMul``/``Gemm`` nodes over its band weights, never a dense
``(out, in)`` matrix. :func:`onnx_gemms` lists those nodes of a file, with their weights'
shapes.

The exporter is ``torch.onnx.export(..., dynamo=True)`` (``torch.export`` then onnxscript),
or the TorchScript one with ``dynamo=False``. ``onnx``/``onnxscript``/``onnxruntime`` are
the optional extra ``gblr[onnx]``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from gblr.core.files import atomic_path
from gblr.deploy.packed import PackedGBLRLinear
from gblr.deploy.tiled import TiledGBLRLinear
from gblr.layers.conv import GBLRConv2d
from gblr.layers.gblr import GBLRLinear

__all__ = ["export_onnx", "onnx_gemms", "ExportReport", "GemmNode", "ExportMismatchError",
           "max_rel_error"]

#: Largest relative difference (``max |ort - torch| / max |torch|`` per output) accepted by
#: the check of :func:`export_onnx`.
RTOL = 1e-4
#: ONNX ops that are matrix products.
GEMM_OPS = ("MatMul", "Gemm")
_EXTRA = "pip install 'gblr[onnx]'"


class ExportMismatchError(ValueError):
    """The exported file's outputs (in onnxruntime) differ from the PyTorch model's."""


@dataclass(frozen=True)
class GemmNode:
    """One matrix product of an ONNX graph: its op, name, and the shape of its constant
    operand (the weight; ``None`` when both operands are computed, e.g. attention)."""

    op_type: str
    name: str
    weight_shape: tuple[int, ...] | None


@dataclass
class ExportReport:
    """What :func:`export_onnx` wrote: the file, its matrix products, the check."""

    path: Path
    gemms: list[GemmNode] = field(default_factory=list)
    #: largest relative difference of any output, onnxruntime vs PyTorch (None: not checked)
    max_rel_error: float | None = None
    input_names: list[str] = field(default_factory=list)

    @property
    def weight_gemms(self) -> list[GemmNode]:
        """The matrix products with a constant (weight) operand."""
        return [g for g in self.gemms if g.weight_shape is not None]

    def __str__(self) -> str:
        check = ("not checked" if self.max_rel_error is None
                 else f"max relative error vs PyTorch {self.max_rel_error:.2e}")
        return (f"{self.path}: {len(self.gemms)} matrix products "
                f"({len(self.weight_gemms)} with weights), {check}")


def _import_onnx():
    try:
        import onnx
        import onnxscript  # noqa: F401  (the dynamo exporter needs it)
    except ImportError as exc:
        raise ImportError(
            f"exporting to ONNX needs onnx and onnxscript ({exc.name} is missing): {_EXTRA}"
        ) from exc
    return onnx


def _import_ort():
    try:
        import onnxruntime
    except ImportError:
        return None
    return onnxruntime


def _check_inputs(example_inputs: object) -> tuple[tuple, dict]:
    """``example_inputs`` as ``(args, kwargs)``: a tensor, a tuple/list of tensors, or a
    mapping of argument names to tensors."""
    if isinstance(example_inputs, torch.Tensor):
        args, kwargs = (example_inputs,), {}
    elif isinstance(example_inputs, Mapping):
        args, kwargs = (), dict(example_inputs)
        bad = [k for k in kwargs if not isinstance(k, str)]
        if bad:
            raise TypeError(f"example_inputs keys must be argument names (str), got {bad!r}")
    elif isinstance(example_inputs, Sequence) and not isinstance(example_inputs, str | bytes):
        args, kwargs = tuple(example_inputs), {}
    else:
        raise TypeError(
            "example_inputs must be a tensor, a tuple or list of tensors, or a dict of "
            f"argument names to tensors, got {type(example_inputs).__name__}"
        )
    if not args and not kwargs:
        raise ValueError("example_inputs is empty: give the tensors the model is called with")
    named = [(f"example_inputs[{i}]", v) for i, v in enumerate(args)]
    named += [(f"example_inputs[{k!r}]", v) for k, v in kwargs.items()]
    for name, value in named:
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(value).__name__}")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ValueError(f"{name} holds NaN or Inf")
    return args, kwargs


def _check_model(model: nn.Module, dynamic: bool) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    # packed layers are inference forms whatever their flag (deploy creates them fresh)
    frozen = [n for n, m in model.named_modules()
              if isinstance(m, PackedGBLRLinear | TiledGBLRLinear)]
    training = [n or "(the model)" for n, m in model.named_modules()
                if m.training and not any(n == f or n.startswith(f + ".") for f in frozen)]
    if training:
        raise ValueError(
            f"model is in training mode ({', '.join(training[:3])}"
            f"{', …' if len(training) > 3 else ''}): call model.eval() before exporting"
        )
    undeployed = [n or "(the model)" for n, m in model.named_modules()
                  if isinstance(m, GBLRLinear | GBLRConv2d)]
    if undeployed:
        raise ValueError(
            f"model holds GBLR layers that are not deployed ({', '.join(undeployed[:3])}"
            f"{', …' if len(undeployed) > 3 else ''}): run gblr.deploy(model) first (it packs "
            "every GBLRLinear into the GEMMs of its bands; GBLRConv2d does not export)"
        )
    if dynamic:
        multi = [n for n, m in model.named_modules()
                 if isinstance(m, PackedGBLRLinear) and len(m.plans) > 1]
        if multi:
            raise ValueError(
                f"{', '.join(multi[:3])} hold one packing per token count; a file with "
                "dynamic shapes holds one graph: deploy with a single tokens value to export "
                "with dynamic_shapes"
            )


def _leaves(out: object) -> list[torch.Tensor]:
    """The tensors of a model's output, in the order the exporters flatten them."""
    if hasattr(out, "to_tuple"):  # transformers' ModelOutput: its set fields, in order
        out = out.to_tuple()
    leaves = torch.utils._pytree.tree_leaves(out)
    return [v for v in leaves if isinstance(v, torch.Tensor)]


def max_rel_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """``max |got - ref| / max |ref|`` (the absolute difference where ``ref`` is zero)."""
    got, ref = got.double(), ref.double()
    if got.numel() == 0:
        return 0.0
    diff = float((got - ref).abs().max())
    scale = float(ref.abs().max())
    return diff / scale if scale > 0 else diff


def _run_ort(ort, file: Path, inputs: list[torch.Tensor], threads: int = 1) -> list:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    if len(names) != len(inputs):
        raise ExportMismatchError(
            f"the exported graph takes {len(names)} inputs ({names}), the model was called "
            f"with {len(inputs)}"
        )
    feed = {n: v.detach().cpu().numpy() for n, v in zip(names, inputs, strict=True)}
    return session.run(None, feed)


def _compare(ort_out: list, ref: list[torch.Tensor], rtol: float) -> float:
    if len(ort_out) != len(ref):
        raise ExportMismatchError(
            f"the exported graph has {len(ort_out)} outputs, the model {len(ref)}")
    worst = 0.0
    for i, (got, want) in enumerate(zip(ort_out, ref, strict=True)):
        got = torch.from_numpy(got)
        if tuple(got.shape) != tuple(want.shape):
            raise ExportMismatchError(
                f"output {i}: shape {tuple(got.shape)} in onnxruntime, {tuple(want.shape)} in "
                "PyTorch")
        err = max_rel_error(got, want)
        if not err <= rtol:  # NaN fails too
            raise ExportMismatchError(
                f"output {i} differs between onnxruntime and PyTorch: max relative error "
                f"{err:.3g} > {rtol:g}; nothing was written (pass check=False to skip the check)"
            )
        worst = max(worst, err)
    return worst


def onnx_gemms(model: str | os.PathLike | object) -> list[GemmNode]:
    """The matrix products (``MatMul``/``Gemm`` nodes) of an ONNX graph, with the shape of
    their constant operand as stored (initializer or ``Constant`` node).

    Args:
        model: an ONNX file's path, or a loaded ``onnx.ModelProto``.

    Returns:
        One :class:`GemmNode` per matrix product, in graph order.

    Example:
        >>> from gblr.deploy.export import onnx_gemms
        >>> [g.weight_shape for g in onnx_gemms("model.onnx")]  # doctest: +SKIP
        [(384, 96), (96, 384), ...]
    """
    onnx = _import_onnx()
    proto = onnx.load(str(model)) if isinstance(model, str | os.PathLike) else model
    graph = proto.graph
    shapes = {t.name: tuple(t.dims) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    shapes[node.output[0]] = tuple(attr.t.dims)
    out = []
    for node in graph.node:
        if node.op_type in GEMM_OPS:
            weight = next((shapes[i] for i in node.input[:2] if i in shapes), None)
            out.append(GemmNode(node.op_type, node.name, weight))
    return out


@torch.no_grad()
def export_onnx(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor] | Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    *,
    overwrite: bool = False,
    check: bool = True,
    rtol: float = RTOL,
    dynamic_shapes: object = None,
    opset_version: int | None = None,
    dynamo: bool = True,
) -> ExportReport:
    """Export a deployed model to an ONNX file and check it against PyTorch.

    The model must be in evaluation mode and hold no trainable GBLR layer: run
    :func:`gblr.deploy` first (each ``PackedGBLRLinear`` then exports as the few GEMMs over
    its band weights it runs in PyTorch; low-rank and the other structured layers export as
    their own products). The graph is traced at ``example_inputs``' shapes; a layer with
    several packings uses the one of the example's token count. With ``check`` the file
    runs in onnxruntime (when installed) on ``example_inputs`` and every output must agree
    with PyTorch's to ``rtol`` (``max |ort - torch| / max |torch|``). The file is written
    beside ``path`` under a temporary name and renamed into place once exported and
    checked: on any failure nothing is written and a previous file is left intact.

    Args:
        model: the deployed model (``nn.Module`` in eval mode).
        example_inputs: what the model is called with: a tensor, a tuple or list of
            tensors (positional arguments) or a dict of argument names to tensors.
        path: the ONNX file to write (weights inside it, so under 2 GB).
        overwrite: replace an existing file (otherwise it is an error).
        check: run the file in onnxruntime and compare with PyTorch (skipped, with a
            warning, when onnxruntime is not installed).
        rtol: largest accepted relative difference of the check.
        dynamic_shapes: passed to ``torch.onnx.export`` (e.g. a dynamic batch axis); every
            packed layer must then hold a single packing.
        opset_version: ONNX opset (the exporter's default when None).
        dynamo: ``torch.export``-based exporter (default) or, False, the TorchScript one.

    Returns:
        An :class:`ExportReport`: the path, the graph's matrix products (:func:`onnx_gemms`)
        and the largest relative error of the check.

    Raises:
        ImportError: onnx or onnxscript is missing (``pip install 'gblr[onnx]'``).
        ExportMismatchError: onnxruntime's outputs differ from PyTorch's.

    Example:
        >>> import torch, gblr
        >>> from torch import nn
        >>> model = nn.Sequential(gblr.GBLRLinear.from_dense(torch.randn(64, 32), 0.5, steps=0),
        ...                       nn.GELU()).eval()
        >>> _ = gblr.deploy(model, tokens=8)
        >>> report = gblr.export_onnx(model, torch.randn(8, 32), "model.onnx")  # doctest: +SKIP
        >>> [g.weight_shape for g in report.gemms]  # doctest: +SKIP
        [(32, 16), (16, 64)]
    """
    onnx = _import_onnx()
    path = Path(path)
    if path.is_dir():
        raise FileExistsError(f"{str(path)!r} is a directory")
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise FileExistsError(f"{str(path)!r} already exists; pass overwrite=True to replace it")
    if not (isinstance(rtol, int | float) and rtol >= 0):
        raise ValueError(f"rtol must be a non-negative number, got {rtol!r}")
    if dynamic_shapes is not None and not dynamo:
        raise ValueError("dynamic_shapes needs the dynamo exporter (dynamo=True)")
    args, kwargs = _check_inputs(example_inputs)
    _check_model(model, dynamic_shapes is not None)
    try:
        ref = _leaves(model(*args, **kwargs))
    except Exception as exc:
        raise ValueError(f"the model does not run on example_inputs: {exc}") from exc
    ort = _import_ort() if check else None
    if check and ort is None:
        warnings.warn(f"onnxruntime is not installed: the exported file is not checked "
                      f"against PyTorch ({_EXTRA})", UserWarning, stacklevel=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        _export(model, args, kwargs, tmp, dynamic_shapes, opset_version, dynamo)
        proto = onnx.load(str(tmp))
        report = ExportReport(path, onnx_gemms(proto), None,
                              [i.name for i in proto.graph.input])
        if ort is not None:
            inputs = [*args, *kwargs.values()]
            report.max_rel_error = _compare(_run_ort(ort, tmp, inputs), ref, rtol)
    return report


def _export(model, args, kwargs, file: Path, dynamic_shapes, opset_version, dynamo) -> None:
    """Run the exporter into ``file``, its progress lines and notes kept off the console
    (an error raised by the exporter still carries its own message)."""
    options = {"kwargs": kwargs or None, "opset_version": opset_version}
    if dynamic_shapes is not None:
        options["dynamic_shapes"] = dynamic_shapes
    log = io.StringIO()
    logger = logging.getLogger("torch.onnx")  # (notes on missing torchvision ops)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(log), \
                contextlib.redirect_stderr(log):
            warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter's
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            if dynamo:
                program = torch.onnx.export(model, args, None, dynamo=True, verbose=False,
                                            **options)
                if program is None:
                    raise RuntimeError(f"torch.onnx.export returned nothing\n{log.getvalue()}")
                program.save(str(file), external_data=False)
            else:
                torch.onnx.export(model, args, str(file), dynamo=False, **options)
    finally:
        logger.setLevel(level)
