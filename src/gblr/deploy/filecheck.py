"""Validation of a packed file's packing before anything is built: every field, every slice.

:func:`check_packing` walks the JSON packing of every layer (types, ranges, GEMM slices
against the weight shapes and the layer's sizes, weight indices, intermediate columns that
nothing initialises, the permutation, sparse and tile indices) and the tensors that go with
it, and raises one ``ValueError`` naming the layer and field.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from typing import Any

import torch

from gblr.core.validate import check_finite, check_float_dtype
from gblr.deploy.executor import SPARSE_BUFFERS
from gblr.deploy.tiled import BACKENDS, TiledGBLRLinear

__all__ = ["check_packing"]

#: Attributes of a tiled layer stored in the metadata (its buffers are tensors).
_TILED_ATTRS = ("rank", "rank_tile", "in_tile", "out_tile", "direct", "backend")
#: Tensors of a tiled layer holding indices (the others hold values).
_TILE_INDEX = ("ptr1", "idx1", "dst1", "row1", "ptr2", "idx2", "row2")
_PLAN_KEYS = ("out", "in", "tokens", "stage1", "h_zero", "h_width", "stage2", "dense",
              "perm", "macs", "full", "n_weights")


# -- validation -----------------------------------------------------------------------------------
class _Check:
    """Field checks of one layer's entry; every error names the file, layer and field."""

    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, message: str) -> ValueError:
        return ValueError(f"{self.where}: {message}")

    def field(self, entry: dict, key: str, what: str = "") -> Any:
        if key not in entry:
            raise self.fail(f"field {key!r}{what} is missing")
        return entry[key]

    def int(self, value: Any, field: str, lo: int | None = None, hi: int | None = None) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(f"{field} must be an integer, got {value!r}")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            bounds = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
            raise self.fail(f"{field} must be {bounds}, got {value}")
        return value

    def flag(self, value: Any, field: str) -> bool:
        if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
            return bool(value)
        raise self.fail(f"{field} must be a boolean (or 0/1), got {value!r}")

    def tensor(self, tensors: dict[str, torch.Tensor], key: str, used: set[str], *,
               floating: bool | None = None, ndim: int | None = None,
               shape: tuple[int, ...] | None = None, why: str = "") -> torch.Tensor:
        if key not in tensors:
            raise self.fail(f"tensor {key!r} is missing{why}")
        t = tensors[key]
        used.add(key)
        if floating is True:
            try:
                check_float_dtype(f"tensor {key!r}", t.dtype)
            except ValueError as err:
                raise self.fail(str(err)) from None
            try:
                check_finite(repr(key), t)
            except ValueError as err:
                raise self.fail(str(err)) from None
        elif floating is False and (t.is_floating_point() or t.is_complex()
                                    or t.dtype == torch.bool):
            raise self.fail(f"tensor {key!r} holds indices but has dtype {t.dtype}")
        if ndim is not None and t.dim() != ndim:
            raise self.fail(f"tensor {key!r} must be {ndim}-D, got shape {tuple(t.shape)}")
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise self.fail(f"tensor {key!r} has shape {tuple(t.shape)}, expected {tuple(shape)}")
        return t


def _merged(intervals: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for lo, hi in sorted(i for i in intervals if i[0] < i[1]):
        if out and lo <= out[-1][1]:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return [(a, b) for a, b in out]


def _covers(merged: list[tuple[int, int]], lo: int, hi: int) -> bool:
    if lo >= hi:
        return True
    k = bisect.bisect_right([a for a, _ in merged], lo) - 1
    return k >= 0 and merged[k][0] <= lo and hi <= merged[k][1]


def _check_plan(c: _Check, name: str, j: int, spec: Any, n_in: int, n_out: int,
                tensors: dict[str, torch.Tensor], used: set[str]) -> None:
    p = f"plan {j}"
    if not isinstance(spec, dict):
        raise c.fail(f"{p} must be a JSON object, got {type(spec).__name__}")
    for key in _PLAN_KEYS:
        c.field(spec, key, f" of {p}")
    if c.int(spec["in"], f"field 'in' of {p}") != n_in:
        raise c.fail(f"field 'in' of {p} is {spec['in']}, but the layer's in_features is {n_in}")
    if c.int(spec["out"], f"field 'out' of {p}") != n_out:
        raise c.fail(f"field 'out' of {p} is {spec['out']}, but the layer's out_features "
                     f"is {n_out}")
    c.int(spec["tokens"], f"field 'tokens' of {p}", lo=1)
    c.int(spec["macs"], f"field 'macs' of {p}", lo=0)
    full = c.flag(spec["full"], f"field 'full' of {p}")
    n_w = c.int(spec["n_weights"], f"field 'n_weights' of {p}", lo=0)
    h_width = c.int(spec["h_width"], f"field 'h_width' of {p}", lo=0)
    lists = {}
    for key in ("stage1", "h_zero", "stage2", "dense", "perm"):
        if not isinstance(spec[key], list):
            raise c.fail(f"field {key!r} of {p} must be a list, got {spec[key]!r}")
        lists[key] = spec[key]
    weights = []
    for i in range(n_w):
        why = f" (field 'n_weights' of {p} is {n_w})"
        weights.append(c.tensor(tensors, f"{name}/plan{j}.w{i}", used, floating=True, ndim=2,
                                why=why))
    perm = [c.int(v, f"field 'perm' of {p} entry {k}", 0, h_width - 1)
            for k, v in enumerate(lists["perm"])]
    hp_width = len(perm) if perm else h_width

    def ints(op: Any, n: int, key: str, k: int) -> list[int]:
        if not isinstance(op, list) or len(op) != n:
            raise c.fail(f"{key} GEMM {k} of {p} must be a list of {n} integers, got {op!r}")
        return [c.int(v, f"{key} GEMM {k} of {p}") if m < n - 1 or key != "stage1"
                else int(c.flag(v, f"{key} GEMM {k} of {p} (init)")) for m, v in enumerate(op)]

    def span(key: str, k: int, a: int, b: int, size: int, axis: str) -> None:
        if not 0 <= a <= b <= size:
            raise c.fail(f"{key} GEMM {k} of {p}: {axis} slice [{a}, {b}) is outside "
                         f"[0, {size})")

    def weight(key: str, k: int, i: int, shape: tuple[int, int]) -> None:
        if not 0 <= i < n_w:
            raise c.fail(f"{key} GEMM {k} of {p}: weight index {i} is outside [0, {n_w})")
        if tuple(weights[i].shape) != shape:
            raise c.fail(f"{key} GEMM {k} of {p}: tensor '{name}/plan{j}.w{i}' has shape "
                         f"{tuple(weights[i].shape)}, its slices need {shape}")

    zero = []
    for k, op in enumerate(lists["h_zero"]):
        if not isinstance(op, list) or len(op) != 2:
            raise c.fail(f"h_zero entry {k} of {p} must be a list of 2 integers, got {op!r}")
        lo, hi = (c.int(v, f"h_zero entry {k} of {p}") for v in op)
        if not 0 <= lo <= hi <= h_width:
            raise c.fail(f"h_zero entry {k} of {p}: [{lo}, {hi}) is outside [0, {h_width})")
        zero.append((lo, hi))
    started = list(zero)  # h columns written before a GEMM accumulates into them
    for k, op in enumerate(lists["stage1"]):
        a, b, lo, hi, i, init = ints(op, 6, "stage1", k)
        span("stage1", k, a, b, n_in, "input column")
        span("stage1", k, lo, hi, h_width, "intermediate")
        weight("stage1", k, i, (hi - lo, b - a))
        if init:
            started.append((lo, hi))
        elif not _covers(_merged(started), lo, hi):
            raise c.fail(f"stage1 GEMM {k} of {p} accumulates into intermediate columns "
                         f"[{lo}, {hi}) that nothing initialises")
    written = _merged(started)
    if any(not _covers(written, v, v + 1) for v in perm):
        raise c.fail(f"field 'perm' of {p} reads intermediate columns that nothing writes")
    for k, op in enumerate(lists["stage2"]):
        a, b, lo, hi, i = ints(op, 5, "stage2", k)
        span("stage2", k, a, b, n_out, "output row")
        span("stage2", k, lo, hi, hp_width, "intermediate")
        if not perm and not _covers(written, lo, hi):
            raise c.fail(f"stage2 GEMM {k} of {p} reads intermediate columns [{lo}, {hi}) "
                         "that nothing writes")
        weight("stage2", k, i, (hi - lo, b - a))
    for k, op in enumerate(lists["dense"]):
        ca, cb, ra, rb, i = ints(op, 5, "dense", k)
        span("dense", k, ca, cb, n_in, "input column")
        span("dense", k, ra, rb, n_out, "output row")
        weight("dense", k, i, (cb - ca, rb - ra))
    present = {key for key in SPARSE_BUFFERS if f"{name}/plan{j}.{key}" in tensors}
    if full:
        if n_w != 1 or tuple(weights[0].shape) != (n_out, n_in):
            raise c.fail(f"{p} is one dense GEMM (field 'full'), so it needs one weight of "
                         f"shape {(n_out, n_in)} (field 'n_weights' is {n_w})")
        if any(lists[key] for key in lists) or h_width or present:
            raise c.fail(f"{p} is one dense GEMM (field 'full') but also lists other GEMMs")
    if present:
        _check_sparse(c, f"{name}/plan{j}.", p, present, n_in, n_out, tensors, used)


def _check_sparse(c: _Check, prefix: str, p: str, present: set[str], n_in: int, n_out: int,
                  tensors: dict[str, torch.Tensor], used: set[str]) -> None:
    """The tiny dense blocks of a packing: one CSR or COO (coalesced) ``(out, in)`` matrix."""
    if present not in ({"sp_crow", "sp_col", "sp_val"}, {"sp_idx", "sp_val"}):
        raise c.fail(f"the sparse part of {p} has tensors {sorted(present)}; expected "
                     "sp_crow, sp_col and sp_val (CSR) or sp_idx and sp_val (COO)")
    val = c.tensor(tensors, prefix + "sp_val", used, floating=True, ndim=1)
    nnz = val.numel()
    if "sp_crow" in present:
        crow = c.tensor(tensors, prefix + "sp_crow", used, floating=False, shape=(n_out + 1,))
        col = c.tensor(tensors, prefix + "sp_col", used, floating=False, shape=(nnz,))
        crow64, col64 = crow.long(), col.long()
        if (int(crow64[0]) != 0 or int(crow64[-1]) != nnz or bool((crow64.diff() < 0).any())
                or bool(((col64 < 0) | (col64 >= n_in)).any())):
            raise c.fail(f"the sparse part of {p} (CSR) has indices out of range "
                         "(tensors sp_crow, sp_col)")
        return
    idx = c.tensor(tensors, prefix + "sp_idx", used, floating=False, shape=(2, nnz))
    rows, cols = idx.long()
    if bool(((rows < 0) | (rows >= n_out) | (cols < 0) | (cols >= n_in)).any()):
        raise c.fail(f"the sparse part of {p} (COO) has indices out of range (tensor sp_idx)")
    flat = rows * n_in + cols
    if nnz > 1 and not bool((flat.diff() > 0).all()):
        raise c.fail(f"the sparse part of {p} (COO) is not sorted and coalesced (tensor sp_idx)")


def _check_entry(c: _Check, name: str, entry: Any, tensors: dict[str, torch.Tensor],
                 used: set[str], legacy: bool) -> None:
    if not isinstance(entry, dict):
        raise c.fail(f"its entry must be a JSON object, got {type(entry).__name__}")
    form = entry.get("form", "grouped") if legacy else c.field(entry, "form")
    if form not in ("grouped", "tiled"):
        raise c.fail(f"field 'form' must be 'grouped' or 'tiled', got {form!r}")
    n_in = c.int(c.field(entry, "in_features"), "field 'in_features'", lo=1)
    n_out = c.int(c.field(entry, "out_features"), "field 'out_features'", lo=1)
    key = "true_flops" if legacy and "true_macs" not in entry else "true_macs"
    true_macs = c.field(entry, key)
    if true_macs is not None:
        c.int(true_macs, f"field {key!r}", lo=0)
    if c.flag(c.field(entry, "bias"), "field 'bias'"):
        c.tensor(tensors, f"{name}/bias", used, floating=True, shape=(n_out,))
    if form == "tiled":
        c.int(c.field(entry, "rank"), "field 'rank'", lo=0)
        for attr in ("rank_tile", "in_tile", "out_tile"):
            v = c.int(c.field(entry, attr), f"field {attr!r}", lo=16)
            if v & (v - 1):
                raise c.fail(f"field {attr!r} must be a power of two >= 16, got {v}")
        c.flag(c.field(entry, "direct"), "field 'direct'")
        backend = c.field(entry, "backend")
        if backend not in BACKENDS:
            raise c.fail(f"field 'backend' must be one of {BACKENDS}, got {backend!r}")
        for key in TiledGBLRLinear.TILE_BUFFERS:
            index = key in _TILE_INDEX
            c.tensor(tensors, f"{name}/{key}", used, floating=not index,
                     ndim=1 if index else 3)
        return
    plans = c.field(entry, "plans")
    if not isinstance(plans, list) or not plans:
        raise c.fail(f"field 'plans' must be a non-empty list, got {plans!r}")
    for j, spec in enumerate(plans):
        _check_plan(c, name, j, spec, n_in, n_out, tensors, used)
    tokens = [spec["tokens"] for spec in plans]
    if any(a >= b for a, b in zip(tokens[:-1], tokens[1:], strict=True)):
        raise c.fail(f"field 'tokens' of the plans must increase, got {tokens}")


def check_packing(where: str, meta: Any, tensors: dict[str, torch.Tensor],
                   legacy: bool = False) -> None:
    """Every layer's entry and tensors; no tensor left over."""
    if not isinstance(meta, dict) or not meta:
        raise ValueError(f"{where}: the packing must be a non-empty JSON object of layers")
    used: set[str] = set()
    for name, entry in meta.items():
        _check_entry(_Check(f"{where}: layer {name!r}"), name, entry, tensors, used, legacy)
    stray = sorted(set(tensors) - used)
    if stray:
        raise ValueError(f"{where}: unexpected tensors {stray[:4]} belong to no layer")
