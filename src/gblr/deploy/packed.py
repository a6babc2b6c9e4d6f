"""Packed inference form of a GBLR layer: dense GEMMs over grouped bands.

A GBLR layer in evaluation mode is ``y = U_m (V_m x)`` where row ``c`` of ``V_m``
is nonzero on one cyclic band of input columns and column ``c`` of ``U_m`` on one
cyclic band of output rows (the mask values, 0/1 or smooth when ``sigma`` is set,
are folded into the factors, so the packed form is exact). Computing only the
bands turns the cost reduction into wall-clock time:

- **stage 1** groups components whose column bands are close; each group is one
  GEMM ``h_g = x[:, cols_g] @ V_g^T`` over the union band ``cols_g``;
- **stage 2** groups components (independently of stage 1) whose row bands are
  close; each group is one GEMM ``y[:, rows_g] += h[:, comps_g] @ U_g^T``;
- components sharing one box whose summed rank makes a dense block cheaper
  (``h * w < rank * (h + w)``) become one dense GEMM ``y[:, R] += x[:, C] @ B^T``.

Groups are chosen per stage by agglomerative merging under a time model:
``max(tokens, MEMORY_TOKENS) * (MACs + IO_MACS * activations moved) + OP_OVERHEAD_MACS *
GEMM calls``, so that a
decode step (1 token) uses few large GEMMs and a long prompt many tight ones. A band
that wraps around the end of an axis is split into two GEMMs on contiguous slices
(no gather of the input). Every slice is precomputed at packing time.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gblr.cost import block_cost

__all__ = [
    "PackedGBLRLinear",
    "cyclic_band",
    "group_bands",
    "MEMORY_TOKENS",
    "OP_OVERHEAD_MACS",
    "IO_MACS",
    "ALIGN",
    "TIME_MODELS",
    "SPARSE_BLOCK_AREA",
]

#: Below this many tokens a GEMM is bound by reading its weights: it costs as if it had
#: this many tokens (CPU: ~4 bytes per weight at memory speed vs. MACs at compute speed).
MEMORY_TOKENS = 16
#: Fixed cost of one GEMM call (dispatch, slicing) in MAC-equivalents (~10 us at ~30 GMAC/s).
OP_OVERHEAD_MACS = 300_000
#: Cost of moving one activation element in or out of a GEMM, in MAC-equivalents: a GEMM
#: with a few rank-1 rows is bound by reading its input band (stage 1) or updating its
#: output band (stage 2), so a group of rank ``r`` over ``L`` indices costs ``(r + IO) L``.
#: Measured on CPU (MKL, 768x3072 layers): 32 beats 8 by 3x at 4096 tokens.
IO_MACS = 32
#: Time model per device type: ``(memory_tokens, overhead, io)``. The CPU entry is
#: measured (MKL, 1-2 threads); the CUDA entry is an estimate (a ~5 us launch at tens of
#: TMAC/s; GEMMs below a few hundred tokens bound by weight reads), not yet calibrated.
TIME_MODELS: dict[str, tuple[int, float, float]] = {
    "cpu": (MEMORY_TOKENS, OP_OVERHEAD_MACS, IO_MACS),
    "cuda": (256, 1e8, 64),
}
#: Dense blocks of at most this many entries (e.g. the 2x2 blocks of a "low rank +
#: blocks" projection) are not one GEMM each: they are gathered into one sparse matrix.
SPARSE_BLOCK_AREA = 16
#: Packings for at most this many tokens hold that sparse matrix as CSR (25x faster than
#: COO at 1 token on CPU), the others as COO (1.4x faster than CSR at 4096 tokens).
SPARSE_CSR_TOKENS = 256
#: Buffer names of the sparse part of a packing.
SPARSE_BUFFERS = ("sp_idx", "sp_crow", "sp_col", "sp_val")
#: Band edges that do not wrap are widened to multiples of this many indices (64 bytes
#: of float32), which makes the sliced GEMMs faster.
ALIGN = 16


def cyclic_band(support: np.ndarray) -> tuple[int, int]:
    """Smallest cyclic interval ``(start, length)`` that covers the ``True`` entries of ``support``.

    An all-false support gives ``(0, 0)``; a support with no zero gives ``(0, n)``.
    Zeros inside the band are allowed (they are zeros of the folded factors).
    """
    support = np.asarray(support, dtype=bool)
    n = support.shape[0]
    nz = np.flatnonzero(support)
    if nz.size == 0:
        return 0, 0
    if nz.size == n:
        return 0, n
    # gap after nz[j]: the number of zeros between it and the next nonzero (cyclically)
    steps = np.diff(nz, append=nz[0] + n)
    j = int(np.argmax(steps))
    start = int(nz[(j + 1) % nz.size])
    length = n - (int(steps[j]) - 1)
    return start, length


def _pieces(start: int, length: int, n: int) -> list[tuple[int, int, int]]:
    """Contiguous ``[a, b)`` slices of a cyclic interval: one, or two when it wraps.

    Each comes with its offset ``o`` in the interval: ``[a, b)`` is ``[o, o + b - a)`` of
    ``(arange(length) + start) % n``.
    """
    if start + length <= n:
        return [(start, start + length, 0)]
    return [(start, n, 0), (0, start + length - n, n - start)]


def _snap(start: int, length: int, n: int, tile: int) -> tuple[int, int]:
    """Widen a band that does not wrap so that both its ends sit on multiples of ``tile``.

    Aligned slices make faster GEMMs (measured ~10% on CPU); the extra indices hold zeros
    of the packed factors, so results are unchanged and the MACs are counted.
    """
    if tile <= 1 or length >= n or start + length > n:
        return start, length
    a = start - start % tile
    b = min(n, -(-(start + length) // tile) * tile)
    return a, b - a


def _cover(a1, l1, a2, l2, n: int):
    """Vectorised smallest cyclic interval covering ``[a1, a1+l1)`` and ``[a2, a2+l2)``."""
    c1 = np.maximum(l1, (a2 - a1) % n + l2)  # starting at a1
    c2 = np.maximum(l2, (a1 - a2) % n + l1)  # starting at a2
    start = np.where(c1 <= c2, a1, a2)
    length = np.minimum(c1, c2)
    full = length >= n
    return np.where(full, 0, start), np.where(full, n, length)


def group_bands(
    starts: Sequence[int],
    lengths: Sequence[int],
    ranks: Sequence[int],
    n: int,
    tokens: int,
    memory_tokens: int = MEMORY_TOKENS,
    overhead: float = OP_OVERHEAD_MACS,
    io: float = IO_MACS,
) -> list[tuple[int, int, list[int]]]:
    """Group cyclic bands so that one GEMM per group over the union band is cheapest.

    Each item is a band ``(start, length)`` on an axis of length ``n`` carrying ``rank``
    rows of a factor. A group costs ``max(tokens, memory_tokens) * (rank_sum + io) *
    union_length + overhead * pieces`` (``pieces`` is 2 when the union wraps around the
    end). Groups are merged greedily, cheapest merge first, while merging lowers the total.
    Returns ``(start, length, member indices)`` per group, sorted by start.
    """
    a = np.asarray(starts, dtype=np.int64).copy()
    ln = np.asarray(lengths, dtype=np.int64).copy()
    rk = np.asarray(ranks, dtype=np.float64).copy()
    k = a.shape[0]
    if k == 0:
        return []
    teff = float(max(int(tokens), int(memory_tokens)))
    members: list[list[int]] = [[i] for i in range(k)]

    def cost(s, l, r):
        return teff * (r + io) * l + overhead * (1.0 + ((s + l) > n))

    own = cost(a, ln, rk)
    alive = np.ones(k, dtype=bool)

    def merge_deltas(i: int) -> np.ndarray:
        s, l = _cover(a[i], ln[i], a, ln, n)
        d = cost(s, l, rk[i] + rk) - own[i] - own
        d[~alive] = np.inf
        d[i] = np.inf
        return d

    delta = np.empty((k, k))
    for i in range(k):
        delta[i] = merge_deltas(i)
    best = delta.min(axis=1)
    arg = delta.argmin(axis=1)
    while True:
        i = int(np.argmin(best))
        if not best[i] < 0:
            break
        j = int(arg[i])
        s, l = _cover(a[i], ln[i], a[j], ln[j], n)
        a[i], ln[i], rk[i] = int(s), int(l), rk[i] + rk[j]
        own[i] = cost(a[i], ln[i], rk[i])
        members[i].extend(members[j])
        members[j] = []
        alive[j] = False
        delta[j, :] = np.inf
        delta[:, j] = np.inf
        best[j] = np.inf
        row = merge_deltas(i)
        delta[i, :] = row
        delta[:, i] = row
        stale = ((arg == i) | (arg == j)) & alive
        stale[i] = True
        idx = np.flatnonzero(stale)
        best[idx] = delta[idx].min(axis=1)
        arg[idx] = delta[idx].argmin(axis=1)
        better = alive & (row < best)
        better[i] = False
        best[better] = row[better]
        arg[better] = i
    groups = [(int(a[i]), int(ln[i]), sorted(members[i])) for i in np.flatnonzero(alive)]
    return sorted(groups, key=lambda g: (g[0], g[1]))


class _Plan(nn.Module):
    """One packing of a layer (one grouping), as weight buffers plus integer slices."""

    def __init__(
        self,
        spec: dict,
        weights: Sequence[torch.Tensor],
        sparse: dict[str, torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.spec = spec
        for i, w in enumerate(weights):
            self.register_buffer(f"w{i}", w)
        self._weights_n = len(weights)
        self._names = tuple(f"w{i}" for i in range(len(weights)))
        # stage 1: list of groups, each a list of (col_a, col_b, weight index)
        self._s1 = [tuple(tuple(p) for p in g) for g in spec["stage1"]]
        # stage 2: list of (h_a, h_b, [(row_a, row_b, weight index), ...])
        self._s2 = [(g[0], g[1], tuple(tuple(p) for p in g[2])) for g in spec["stage2"]]
        # dense blocks: list of (col_a, col_b, row_a, row_b, weight index)
        self._dense = [tuple(p) for p in spec["dense"]]
        perm = spec["perm"]
        device = weights[0].device if len(weights) else None
        self.register_buffer(
            "perm", torch.tensor(perm, dtype=torch.long, device=device) if perm else None
        )
        self.out_features = spec["out"]
        self.in_features = spec.get("in", 0)
        self.macs = int(spec["macs"])
        # tiny dense blocks, all in one sparse (out, in) matrix: CSR (sp_crow, sp_col, sp_val;
        # fastest for few tokens) or COO (sp_idx, sp_val; fastest for many), see SPARSE_CSR_TOKENS
        sparse = sparse or {}
        for name in SPARSE_BUFFERS:
            self.register_buffer(name, sparse.get(name))

    def weights(self) -> list[torch.Tensor]:
        """Weight buffers in index order: stage 1 ``(r, cols)``, stage 2 ``(r, rows)``,
        dense blocks ``(cols, rows)`` (laid out as each GEMM reads them fastest)."""
        return [getattr(self, f"w{i}") for i in range(self._weights_n)]

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        buffers = self._buffers  # direct lookups: a decode step is only a few GEMVs long
        w = [buffers[name] for name in self._names]
        hs = []
        for group in self._s1:
            a, b, i = group[0]
            h = F.linear(x[:, a:b], w[i])
            for a, b, i in group[1:]:
                h = h.addmm(x[:, a:b], w[i].t())
            hs.append(h)
        y = None
        if hs:
            h = hs[0] if len(hs) == 1 else torch.cat(hs, dim=1)
            if self.perm is not None:
                h = h.index_select(1, self.perm)
            first = self._s2[0]
            if first[2][0][0] == 0 and first[2][0][1] == self.out_features:
                # a group spanning every output row starts y (with the bias) in one call
                a, b, ((_, _, i),) = first
                y = h[:, a:b] @ w[i] if bias is None else torch.addmm(bias, h[:, a:b], w[i])
                rest = self._s2[1:]
            else:
                rest = self._s2
        else:
            rest = []
        if y is None:
            out_shape = (x.shape[0], self.out_features)
            y = x.new_zeros(out_shape) if bias is None else bias.expand(out_shape).clone()
        for a, b, pieces in rest:
            hg = h[:, a:b]
            for ra, rb, i in pieces:
                y[:, ra:rb].addmm_(hg, w[i])
        for ca, cb, ra, rb, i in self._dense:
            y[:, ra:rb].addmm_(x[:, ca:cb], w[i])
        if self.sp_val is not None:
            size = (self.out_features, self.in_features)
            val = self.sp_val
            if val.dtype not in (torch.float32, torch.float64):
                val = val.float()  # CPU sparse kernels lack bfloat16/float16
            if self.sp_crow is not None:
                s = torch.sparse_csr_tensor(
                    self.sp_crow, self.sp_col, val, size, check_invariants=False
                )
            else:
                s = torch.sparse_coo_tensor(
                    self.sp_idx, val, size, is_coalesced=True, check_invariants=False
                )
            xt = x.t().contiguous().to(val.dtype)
            y.add_(torch.sparse.mm(s, xt).t().to(y.dtype))
        return y


def _build_plan(
    u_m: torch.Tensor,
    v_m: torch.Tensor,
    ranks: list[int],
    col_bands: list[tuple[int, int]],
    row_bands: list[tuple[int, int]],
    tokens: int,
    dtype: torch.dtype,
    memory_tokens: int,
    overhead: float,
    io: float,
) -> _Plan:
    """Group components and slice the folded factors ``u_m (out, R)``, ``v_m (R, in)``."""
    out_f, in_f = u_m.shape[0], v_m.shape[1]
    offsets = np.concatenate([[0], np.cumsum(ranks)]).astype(int)
    comps = [c for c in range(len(ranks)) if col_bands[c][1] > 0 and row_bands[c][1] > 0]
    weights: list[torch.Tensor] = []
    macs = 0

    def add(w: torch.Tensor) -> int:
        weights.append(w.to(dtype).contiguous())
        return len(weights) - 1

    def rank_index(cs: list[int]) -> torch.Tensor:
        """Positions in the folded rank axis of the components ``cs``, in that order."""
        return torch.cat([torch.arange(offsets[c], offsets[c + 1]) for c in cs])

    # identical boxes whose summed rank makes a dense block cheaper
    boxes: dict[tuple[int, int, int, int], list[int]] = {}
    for c in comps:
        boxes.setdefault(col_bands[c] + row_bands[c], []).append(c)
    dense_specs = []
    lowrank = []
    sp_rows, sp_cols, sp_vals = [], [], []
    for (ca, cl, ra, rl), members in boxes.items():
        r = sum(ranks[c] for c in members)
        if len(members) > 1 and rl * cl < r * (rl + cl):
            idx = rank_index(members)
            rows = (torch.arange(rl) + ra) % out_f
            cols = (torch.arange(cl) + ca) % in_f
            block = u_m[rows][:, idx] @ v_m[idx][:, cols]
            macs += block_cost(r, rl, cl)
            if rl * cl <= SPARSE_BLOCK_AREA:
                sp_rows.append(rows[:, None].expand(rl, cl).reshape(-1))
                sp_cols.append(cols[None, :].expand(rl, cl).reshape(-1))
                sp_vals.append(block.reshape(-1))
                continue
            for pa, pb, ro in _pieces(ra, rl, out_f):
                for qa, qb, co in _pieces(ca, cl, in_f):
                    i = add(block[ro : ro + pb - pa, co : co + qb - qa].t())
                    dense_specs.append((qa, qb, pa, pb, i))
        else:
            lowrank.extend(members)
    lowrank.sort()
    sparse = None
    if sp_vals:
        coo = torch.sparse_coo_tensor(
            torch.stack([torch.cat(sp_rows), torch.cat(sp_cols)]), torch.cat(sp_vals),
            (out_f, in_f), check_invariants=True,
        ).coalesce()
        if tokens <= SPARSE_CSR_TOKENS:
            with warnings.catch_warnings():  # "CSR support is in beta": known, and tested
                warnings.simplefilter("ignore", UserWarning)
                csr = coo.to_sparse_csr()
            sparse = {"sp_crow": csr.crow_indices().contiguous(),
                      "sp_col": csr.col_indices().contiguous(),
                      "sp_val": csr.values().to(dtype).contiguous()}
        else:
            sparse = {"sp_idx": coo.indices().contiguous(),
                      "sp_val": coo.values().to(dtype).contiguous()}

    stage1, stage2, perm = [], [], []
    if lowrank:
        lr_ranks = [ranks[c] for c in lowrank]
        g1 = group_bands(
            [col_bands[c][0] for c in lowrank], [col_bands[c][1] for c in lowrank], lr_ranks,
            in_f, tokens, memory_tokens, overhead, io,
        )
        g2 = group_bands(
            [row_bands[c][0] for c in lowrank], [row_bands[c][1] for c in lowrank], lr_ranks,
            out_f, tokens, memory_tokens, overhead, io,
        )
        # a group spanning every output row goes first: it starts y with the bias
        g2.sort(key=lambda g: g[1] < out_f)
        if len(g1) == 1:
            # one stage-1 GEMM: order its outputs as stage 2 wants them, no permutation
            g1 = [(g1[0][0], g1[0][1], [m for g in g2 for m in g[2]])]
        # stage 1: h columns in the order of the stage-1 groups
        h_pos: dict[int, int] = {}
        pos = 0
        for start, length, members in g1:
            start, length = _snap(start, length, in_f, ALIGN)
            idx = rank_index([lowrank[m] for m in members])
            cols = (torch.arange(length) + start) % in_f
            vg = v_m[idx][:, cols]
            stage1.append([(a, b, add(vg[:, o : o + b - a]))
                           for a, b, o in _pieces(start, length, in_f)])
            macs += int(idx.numel()) * length
            for m in members:
                h_pos[m] = pos
                pos += lr_ranks[m]
        # stage 2: h columns gathered into stage-2 group order
        hpos = 0
        for start, length, members in g2:
            start, length = _snap(start, length, out_f, ALIGN)
            idx = rank_index([lowrank[m] for m in members])
            rows = (torch.arange(length) + start) % out_f
            ug = u_m[rows][:, idx]
            pieces = [(a, b, add(ug[o : o + b - a].t()))
                      for a, b, o in _pieces(start, length, out_f)]
            stage2.append((hpos, hpos + int(idx.numel()), pieces))
            hpos += int(idx.numel())
            macs += int(idx.numel()) * length
            for m in members:
                perm.extend(range(h_pos[m], h_pos[m] + lr_ranks[m]))
        if perm == list(range(len(perm))):
            perm = []
    spec = {
        "out": out_f,
        "in": in_f,
        "tokens": int(tokens),
        "stage1": stage1,
        "stage2": stage2,
        "dense": dense_specs,
        "perm": perm,
        "macs": macs,
    }
    return _Plan(spec, weights, sparse)


class PackedGBLRLinear(nn.Module):
    """Frozen inference form of a :class:`~gblr.GBLRLinear` that computes only its bands.

    Build it with :meth:`from_gblr` (or ``GBLRLinear.packed()``). ``tokens`` is the number
    of tokens per call the grouping is tuned for; a sequence gives one packing per entry,
    chosen at run time by the input's token count (each packing stores its own weights).
    Inputs of any leading shape ``(..., in_features)``; outputs equal the masked layer's to
    float rounding. :meth:`flops` is the MACs per token it actually computes (band unions
    included), :attr:`true_flops` the evaluation-mode cost of the layer it came from.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        plans: Sequence[_Plan],
        bias: torch.Tensor | None = None,
        true_flops: int | None = None,
    ) -> None:
        super().__init__()
        if not plans:
            raise ValueError("plans must hold at least one packing")
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.plans = nn.ModuleList(plans)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        tok = [p.spec["tokens"] for p in plans]
        if tok != sorted(tok):
            raise ValueError(f"plans must be sorted by their token count, got {tok}")
        # switch between consecutive packings at the geometric mean of their token counts
        pairs = zip(tok[:-1], tok[1:], strict=True)
        self._switch = [float(np.sqrt(max(a, 1) * max(b, 1))) for a, b in pairs]
        self.true_flops = int(true_flops) if true_flops is not None else None

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
    ) -> PackedGBLRLinear:
        """Pack a GBLR layer's evaluation-mode structure (whatever its current mode).

        ``memory_tokens``, ``overhead`` and ``io`` are the time model of the grouping
        (see :func:`group_bands`); by default the entry of :data:`TIME_MODELS` for the
        layer's device type.
        """
        from gblr.layers.gblr import GBLRLinear

        if not isinstance(layer, GBLRLinear):
            raise TypeError(f"layer must be a GBLRLinear, got {type(layer).__name__}")
        token_list = [tokens] if isinstance(tokens, int) else list(tokens)
        if not token_list or any(not isinstance(t, int) or t < 1 for t in token_list):
            raise ValueError(f"tokens must be a positive int or a sequence of them, got {tokens}")
        dtype = dtype or layer.U.dtype
        model = TIME_MODELS.get(layer.U.device.type, TIME_MODELS["cpu"])
        memory_tokens = model[0] if memory_tokens is None else memory_tokens
        overhead = model[1] if overhead is None else overhead
        io = model[2] if io is None else io
        m_in, m_out = layer.eval_masks()
        r = layer.rank_per_component
        k = layer.num_components
        # fold the mask values into the factors in float64, so the packed form is exact
        u_m = layer.U.detach().double() * m_out.double().repeat_interleave(r, dim=0).t()
        v_m = layer.V.detach().double() * m_in.double().repeat_interleave(r, dim=0)
        in_sup = (m_in != 0).cpu().numpy()
        out_sup = (m_out != 0).cpu().numpy()
        col_bands = [cyclic_band(in_sup[c]) for c in range(k)]
        row_bands = [cyclic_band(out_sup[c]) for c in range(k)]
        plans = [
            _build_plan(u_m, v_m, [r] * k, col_bands, row_bands, t, dtype, memory_tokens,
                        overhead, io)
            for t in sorted(set(token_list))
        ]
        bias = None if layer.bias is None else layer.bias.detach().to(dtype)
        packed = cls(layer.in_features, layer.out_features, plans, bias, layer.flops())
        return packed.to(layer.U.device)

    def plan_for(self, tokens: int) -> _Plan:
        """The packing used for ``tokens`` tokens per call."""
        i = 0
        while i < len(self._switch) and tokens > self._switch[i]:
            i += 1
        return self.plans[i]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"PackedGBLRLinear expects inputs of shape (..., {self.in_features}), "
                f"got {tuple(x.shape)}"
            )
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        plan = self.plan_for(x2.shape[0])
        bias = None if self.bias is None else self.bias.to(x2.dtype)
        return plan(x2, bias).reshape(*lead, self.out_features)

    def flops(self, tokens: int | None = None) -> int:
        """MACs per token this module computes (for the packing used at ``tokens``)."""
        plan = self.plans[0] if tokens is None else self.plan_for(tokens)
        return plan.macs

    def num_gemms(self, tokens: int | None = None) -> int:
        """GEMM calls per forward (for the packing used at ``tokens``; the sparse part is one)."""
        plan = self.plans[0] if tokens is None else self.plan_for(tokens)
        spec = plan.spec
        return (
            sum(len(g) for g in spec["stage1"])
            + sum(len(g[2]) for g in spec["stage2"])
            + len(spec["dense"])
            + (plan.sp_val is not None)
        )

    @torch.no_grad()
    def to_dense(self) -> torch.Tensor:
        """The ``(out, in)`` matrix applied (bias excluded), from the first packing."""
        ref = next(self.plans[0].buffers(), None)
        kw = {} if ref is None else {"dtype": ref.dtype, "device": ref.device}
        if ref is not None and not ref.is_floating_point():
            kw = {"device": ref.device}
        eye = torch.eye(self.in_features, **kw)
        return self.plans[0](eye, None).t()

    def extra_repr(self) -> str:
        tok = [p.spec["tokens"] for p in self.plans]
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, macs={self.flops()}, true_flops={self.true_flops}, "
            f"gemms={self.num_gemms()}, tokens={tok}"
        )
