"""Packed inference form of a GBLR layer: dense GEMMs over grouped bands.

A GBLR layer in evaluation mode is ``y = U_m (V_m x)`` where row ``c`` of ``V_m``
is nonzero on one cyclic band of input columns and column ``c`` of ``U_m`` on one
cyclic band of output rows (the mask values, 0/1 or smooth when ``sigma`` is set,
are folded into the factors, so the packed form is exact). Computing only the
bands turns the cost reduction into wall-clock time:

- **stage 1** groups components whose column bands are close; a group's union band
  ``cols_g`` is cut into segments, each one GEMM ``h[:, ranks] = x[:, seg] @ V^T`` over
  the group's ranks from the first to the last member meeting the segment (so nested
  bands cost little more than their true MACs);
- **stage 2** does the same on the output side, grouped independently:
  ``y[:, seg] += h[:, ranks] @ U^T``;
- components sharing one box whose summed rank makes a dense block cheaper
  (``h * w < rank * (h + w)``) become one dense GEMM ``y[:, R] += x[:, C] @ B^T``.

Groups are chosen per stage by agglomerative merging, and segments by dynamic
programming, under a time model in MAC-equivalents: per GEMM ``max(tokens,
MEMORY_TOKENS) * MACs + IO_MACS * tokens * activations moved + OP_OVERHEAD_MACS``, so that
a decode step (1 token) uses few large GEMMs and a long prompt many tight ones; several
merge strengths are tried and the cheapest kept (``tune=True`` times candidates instead).
Segments never cross the end of an axis (a wrapping band needs no gather). From a few
tokens on, stage-1 rank ranges are padded to multiples of :data:`RANK_ALIGN` (MKL's
narrow GEMMs are much faster at such widths), and inputs longer than
:data:`CHUNK_TOKENS` run chunk by chunk. Every slice is precomputed at packing time, and
the intermediate ``h`` is one buffer written by ``out=`` GEMMs.

A decode step (one token) runs as matrix-vector products. On CPU its input, intermediate
and output live in per-thread scratch buffers whose slices are created once, so a GEMV
costs one call (~1 us) and the time model of a one-token packing
(:data:`VECTOR_TIME_MODELS`) affords more, tighter GEMVs; short inputs (up to
:data:`VIEW_TOKENS` tokens) likewise keep their intermediate's slices. Outputs are always
fresh tensors, and threads never share a buffer.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gblr.core.cost import block_cost
from gblr.core.deprecation import FlopsAliases
from gblr.layers.gblr import GBLRLinear

__all__ = [
    "PackedGBLRLinear",
    "cyclic_band",
    "banded_factors",
    "group_bands",
    "MEMORY_TOKENS",
    "OP_OVERHEAD_MACS",
    "IO_MACS",
    "ALIGN",
    "TIME_MODELS",
    "VECTOR_TIME_MODELS",
    "SPARSE_BLOCK_AREA",
    "CHUNK_TOKENS",
    "VIEW_TOKENS",
    "RANK_ALIGN",
    "MERGE_FACTORS",
    "TUNE_VARIANTS",
]

#: Below this many tokens a GEMM is bound by reading its weights: it costs as if it had
#: this many tokens (measured on CPU, 1 thread: weights stream at ~11 G floats/s, MACs
#: run at ~40 G/s).
MEMORY_TOKENS = 4
#: Fixed cost of one GEMM call (dispatch, slicing) in MAC-equivalents (~4 us at ~40 GMAC/s;
#: measured: the best packings of two 768x3072 layers at 1 and 64 tokens).
OP_OVERHEAD_MACS = 150_000
#: Cost of moving one activation element in or out of a GEMM, in MAC-equivalents: a GEMM
#: with a few rank-1 rows is bound by reading its input band (stage 1) or updating its
#: output band (stage 2), so a group of rank ``r`` over ``L`` indices costs ``(r + IO) L``.
#: Measured on CPU (MKL, 768x3072 layers): 32 beats 8 by 3x at 4096 tokens.
IO_MACS = 32
#: Time model per device type: ``(memory_tokens, overhead, io)``. The CPU entry is
#: measured (MKL, 1-2 threads). On CUDA (an H200, float32 and bfloat16, 1 to 4096 tokens)
#: no grouped packing of the speed benchmark's layers (768x3072 and 3072x768 at 30% cost,
#: MiniLM-L6 layers at 30% and 50%) was measured faster than one dense GEMM: a GEMM there
#: costs tens of microseconds of launch and tail whatever its size. An overhead of 1e9
#: MACs per GEMM reproduces those choices (3e8 is the least that does), so on CUDA a layer
#: is packed only where that saves more than about that much per GEMM.
TIME_MODELS: dict[str, tuple[int, float, float]] = {
    "cpu": (MEMORY_TOKENS, OP_OVERHEAD_MACS, IO_MACS),
    "cuda": (256, 1e9, 64),
}
#: Time model of a one-token packing per device type, ``(overhead, io)``: on CPU a decode
#: step runs its GEMVs through views prepared once per thread (:meth:`_Plan._vector_steps`),
#: so a call costs ~1 us (measured: 13-17 GEMVs beat the 7-8 that :data:`OP_OVERHEAD_MACS`
#: picks, 768x3072 and 3072x768 layers at 30% cost), and a GEMV reads its input band once,
#: at about the cost of a weight (``memory_tokens`` MAC-equivalents), not per token of a GEMM.
VECTOR_TIME_MODELS: dict[str, tuple[float, float]] = {"cpu": (40_000, 8)}
#: Dense blocks of at most this many entries (e.g. the 2x2 blocks of a "low rank +
#: blocks" projection) are not one GEMM each: they are gathered into one sparse matrix.
SPARSE_BLOCK_AREA = 16
#: Packings for at most this many tokens hold that sparse matrix as CSR (25x faster than
#: COO at 1 token on CPU), the others as COO (1.4x faster than CSR at 4096 tokens).
SPARSE_CSR_TOKENS = 256
#: CPU sparse kernels run at about this fraction of the dense GEMM's MACs per second
#: (measured: ~9 vs ~45 GMAC/s at ~11% density): the time model charges sparse MACs 5x.
SPARSE_MAC_FACTOR = 5
#: Buffer names of the sparse part of a packing.
SPARSE_BUFFERS = ("sp_idx", "sp_crow", "sp_col", "sp_val")
#: Band edges that do not wrap are widened to multiples of this many indices (64 bytes
#: of float32), which makes the sliced GEMMs faster.
ALIGN = 16
#: Stage-1 GEMMs (for at least ``memory_tokens`` tokens) write rank ranges whose widths are
#: multiples of this (groups padded with zero rows): MKL runs a GEMM with 16 output
#: columns 2.7x faster than one with 15, 32 1.3x faster than 33 (1 thread, 512 tokens).
RANK_ALIGN = 16
#: Inputs with more tokens than this run in chunks of this many tokens, so that a chunk's
#: input, intermediate and output stay in cache across the GEMMs (measured ~10% faster at
#: 4096 tokens on CPU); the grouping is chosen for this many tokens.
CHUNK_TOKENS = 512
#: Inputs of at most this many tokens (on CPU) run through views of a per-thread scratch
#: intermediate prepared once (see :meth:`_Plan._gemm_scratch`); one token always does
#: (:meth:`_Plan._vector_steps`). Larger intermediates are not kept between calls.
VIEW_TOKENS = 64


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
    rows of a factor. A group costs ``(max(tokens, memory_tokens) * rank_sum + io * tokens)
    * union_length + overhead * pieces`` (``pieces`` is 2 when the union wraps around the
    end): weights are read once per call, activations once per token. Groups are merged
    greedily, cheapest merge first, while merging lowers the total.
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
        return (teff * r + io * tokens) * l + overhead * (1.0 + ((s + l) > n))

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


def banded_factors(layer) -> tuple[torch.Tensor, torch.Tensor, list[int], list, list]:
    """A GBLR layer's evaluation-mode structure as packing input: ``(U_m, V_m, ranks,
    col_bands, row_bands)``, the mask values folded into the factors in float64 (so the
    packed form is exact) and each component's cyclic ``(start, length)`` band per axis."""
    m_in, m_out = layer.eval_masks()
    r = layer.rank_per_component
    k = layer.num_components
    u_m = layer.U.detach().double() * m_out.double().repeat_interleave(r, dim=0).t()
    v_m = layer.V.detach().double() * m_in.double().repeat_interleave(r, dim=0)
    in_sup = (m_in != 0).cpu().numpy()
    out_sup = (m_out != 0).cpu().numpy()
    col_bands = [cyclic_band(in_sup[c]) for c in range(k)]
    row_bands = [cyclic_band(out_sup[c]) for c in range(k)]
    return u_m, v_m, [r] * k, col_bands, row_bands


def _rank_pad(rank: int, tile: int) -> int:
    """Ranks of a stage-1 group padded to a multiple of ``tile`` (below ``tile / 2``, where
    a narrow GEMM is as fast as the padded one, left as they are)."""
    return rank if rank < tile // 2 else -(-rank // tile) * tile


def _segment(
    offs: np.ndarray,
    lens: np.ndarray,
    cum: np.ndarray,
    start: int,
    length: int,
    n: int,
    tokens: int,
    teff: float,
    io: float,
    overhead: float,
    tile: int,
    rank_tile: int = 1,
) -> tuple[float, list[tuple[int, int, int, int]]]:
    """Split one group's union band into segments, each one GEMM over the members meeting it.

    The members, in their order along the rank axis (member ``i`` holds ranks
    ``[cum[i], cum[i+1])``), have bands ``[offs[i], offs[i] + lens[i])`` relative to the
    union band ``[start, start + length)`` of an axis of length ``n``. A segment
    ``[a, b)`` of the band is one GEMM over the ranks from the first to the last member
    that meets it (members in between that do not are zeros of the packed factors). The
    segments minimise the time model exactly (dynamic programming over the band edges,
    snapped down to multiples of ``tile``; a segment never crosses the end of the axis).
    With ``rank_tile`` a GEMM's rank range is widened to multiples of it (see
    :data:`RANK_ALIGN`; the group's ranks are padded with zero rows to a multiple, and
    ``cum[-1]`` must be a multiple or ``rank_tile`` 1).
    Returns the modelled time and ``(a, b, lo, hi)`` per GEMM: ``a, b`` offsets in the
    band, ``lo, hi`` rank positions (widened).
    """
    m = len(offs)
    ends = (offs + lens) % n  # a member may wrap around the band's end when it is the axis
    wrap = n - start if start + length > n else None
    cuts = {0, length}
    if wrap is not None:
        cuts.add(wrap)
    for c in np.concatenate([offs, ends]):
        c = int(c)
        if 0 < c < length and c != wrap:
            c -= ((start + c) % n) % tile
            low = wrap if wrap is not None and c > wrap else 0
            cuts.add(max(c, low))
    cut = np.array(sorted(cuts), dtype=np.int64)
    p = cut.shape[0] - 1
    # elementary segment [c0, c1) meets the cyclic band [o, o + l) when c0 lies in the band
    # or o lies in the segment
    c0, c1 = cut[:-1, None], cut[1:, None]
    cov = ((c0 - offs[None, :]) % n < lens[None, :]) | ((offs[None, :] - c0) % n < c1 - c0)
    any_cov = cov.any(axis=1)
    first = np.where(any_cov, cov.argmax(axis=1), m)
    last = np.where(any_cov, m - 1 - cov[:, ::-1].argmax(axis=1), -1)
    wrap_i = int(np.searchsorted(cut, wrap)) if wrap is not None else p
    best = np.full(p + 1, np.inf)
    best[0] = 0.0
    back = np.zeros(p + 1, dtype=np.int64)
    for i in range(p):
        stop = wrap_i if i < wrap_i else p  # j in (i, stop]
        lo = np.minimum.accumulate(first[i:stop])
        hi = np.maximum.accumulate(last[i:stop])
        ok = hi >= lo
        r_hi = -(-cum[np.minimum(hi + 1, m)] // rank_tile) * rank_tile
        r_lo = cum[np.minimum(lo, m - 1)] // rank_tile * rank_tile
        r = np.where(ok, r_hi - r_lo, 0)
        seg = cut[i + 1 : stop + 1] - cut[i]
        cost = np.where(ok, teff * r * seg + io * tokens * (seg + r) + overhead, 0.0)
        total = best[i] + cost
        tail = best[i + 1 : stop + 1]
        better = total < tail
        tail[better] = total[better]
        back[i + 1 : stop + 1][better] = i
    rects = []
    j = p
    while j > 0:
        i = int(back[j])
        lo, hi = int(first[i:j].min()), int(last[i:j].max())
        if hi >= lo:
            r_lo = int(cum[lo]) // rank_tile * rank_tile
            r_hi = -(-int(cum[hi + 1]) // rank_tile) * rank_tile
            rects.append((int(cut[i]), int(cut[j]), r_lo, r_hi))
        j = i
    return float(best[p]), rects[::-1]


#: Merges of band groups tried before segmenting: the time model's overhead and io scaled
#: by these factors (larger: fewer, wider groups, which segmenting then trims), and one
#: group holding every component.
MERGE_FACTORS = (1.0, 4.0, None)


def _stage_groups(
    starts: Sequence[int],
    lengths: Sequence[int],
    ranks: Sequence[int],
    n: int,
    tokens: int,
    memory_tokens: int,
    overhead: float,
    io: float,
    split: bool = True,
    merge: float | None | str = "best",
    rank_tile: int = 1,
) -> tuple[float, list[tuple[list[int], list[tuple[int, int, int, int]]]]]:
    """Groups of one stage and the GEMMs of each: ``(modelled time, [(members, rects)])``.

    Bands are grouped by :func:`group_bands` (with the overhead and io scaled by each of
    :data:`MERGE_FACTORS`, or one group, when ``merge="best"``); each group lists its
    members in their rank order and its GEMMs ``(a, b, lo, hi)``: the contiguous slice
    ``[a, b)`` of the axis times the group's ranks ``[lo, hi)``. With ``split`` a group's
    union band is segmented (:func:`_segment`, members ordered by decreasing band length
    or by start, whichever models faster); without, it is one GEMM (two when it wraps).
    The variant with the lowest modelled time is kept. ``rank_tile``: each group's ranks
    are padded to a multiple of it (see :func:`_rank_pad`), and its GEMMs' rank ranges
    widened to multiples.
    """
    k = len(starts)
    teff = float(max(int(tokens), int(memory_tokens)))
    lens_all = np.asarray(lengths, dtype=np.int64)
    starts_all = np.asarray(starts, dtype=np.int64)
    factors = MERGE_FACTORS if merge == "best" else (merge,)
    best: tuple[float, list] | None = None
    for f in factors:
        if f is None:
            s, ln = int(starts_all[0]), int(lens_all[0])
            for j in range(1, k):
                s, ln = (int(v) for v in _cover(s, ln, starts_all[j], lens_all[j], n))
            groups = [(s, ln, list(range(k)))]
        else:
            groups = group_bands(starts, lengths, ranks, n, tokens, memory_tokens,
                                 overhead * f, io * f)
        total = 0.0
        out = []
        for g_start, g_len, members in groups:
            g_start, g_len = _snap(g_start, g_len, n, ALIGN)
            mem = np.asarray(members)
            offs = (starts_all[mem] - g_start) % n
            lens = lens_all[mem]
            r_sum = int(sum(ranks[c] for c in members))
            tile = rank_tile if r_sum >= rank_tile // 2 else 1  # as _rank_pad
            if not split:
                r_all = _rank_pad(r_sum, rank_tile)
                rects = [(o, o + b - a, 0, r_all) for a, b, o in _pieces(g_start, g_len, n)]
                total += sum(teff * r_all * (b - a) + io * tokens * (b - a + r_all) + overhead
                             for a, b, _, _ in rects)
                out.append((list(members), rects, g_start))
                continue
            choice = None
            for key in (np.lexsort((offs, -lens)), np.lexsort((-lens, offs))):
                rk = np.concatenate([[0], np.cumsum([ranks[c] for c in mem[key]])])
                cost, rects = _segment(offs[key], lens[key], rk, g_start, g_len, n, tokens,
                                       teff, io, overhead, ALIGN, tile)
                if choice is None or cost < choice[0]:
                    choice = (cost, mem[key].tolist(), rects)
            total += choice[0]
            out.append((choice[1], choice[2], g_start))
        if best is None or total < best[0]:
            best = (total, out)
    # rect offsets to absolute positions on the axis
    result = []
    for members, rects, g_start in best[1]:
        r_all = _rank_pad(int(sum(ranks[c] for c in members)), rank_tile)
        absolute = [((g_start + a) % n, (g_start + a) % n + (b - a), lo, hi)
                    for a, b, lo, hi in rects]
        # a GEMM over all of the group's ranks goes first: it initialises the group's output
        absolute.sort(key=lambda q: (q[3] - q[2] != r_all, q[0]))
        result.append((members, absolute))
    return best[0], result


#: Candidate packings timed by ``from_gblr(tune=True)``: ``(split, merge, overhead factor,
#: io factor, dense)`` (see :func:`_stage_groups`, :func:`_build_plan`): the model's choice,
#: with the per-GEMM overhead halved, doubled and quadrupled (the best factor varies by ~2x
#: between layers and token counts), with the activation cost halved or quartered (measured
#: up to 8% faster on some layers at 64 tokens), one group per stage segmented, unsegmented
#: groups, and the layer as one dense GEMM (so a tuned packing is not slower than dense).
TUNE_VARIANTS: tuple[tuple[bool, float | None | str, float, float, bool | None], ...] = (
    (True, "best", 1.0, 1.0, False),
    (True, "best", 0.5, 1.0, False),
    (True, "best", 2.0, 1.0, False),
    (True, "best", 4.0, 1.0, False),
    (True, "best", 1.0, 0.5, False),
    (True, "best", 2.0, 0.5, False),
    (True, "best", 1.0, 0.25, False),
    (True, None, 1.0, 1.0, False),
    (False, 1.0, 1.0, 1.0, False),
    (False, 1.0, 4.0, 1.0, False),
    (True, "best", 1.0, 1.0, True),
)
#: Timed repetitions per candidate when tuning (interleaved; the best one is compared).
TUNE_REPS = 7


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
        # stage 1: (col_a, col_b, h_lo, h_hi, weight index, starts its h slice)
        self._s1 = [(a, b, lo, hi, i, bool(init)) for a, b, lo, hi, i, init in spec["stage1"]]
        # h slices that no stage-1 GEMM starts: zeroed first
        self._h_zero = [tuple(z) for z in spec["h_zero"]]
        self._h_width = int(spec["h_width"])
        # stage 2: (row_a, row_b, h_lo, h_hi, weight index); the first one starts y when
        # it spans every output row
        self._s2 = [tuple(q) for q in spec["stage2"]]
        self._y_init = bool(self._s2) and self._s2[0][:2] == (0, spec["out"])
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
        # one token runs as matrix-vector products (not with a sparse part)
        self._vector = not sparse
        self._scratch: dict = {}
        self._refresh()

    def _flatten(self) -> None:
        """Lay the weights of a one-token packing on CPU out back to back, in the order its
        GEMVs read them (each buffer becomes a view of one allocation): a decode step
        streams its weights from cache, and one stream is ~3% faster than a dozen
        scattered ones (measured, 768x3072 and 3072x768 layers)."""
        if self.spec["tokens"] != 1 or self.spec.get("full") or self._weights_n < 2:
            return
        ws = self.weights()
        if ws[0].device.type != "cpu" or any(w.dtype != ws[0].dtype for w in ws):
            return
        order = [q[4] for q in self._s1] + [q[4] for q in self._s2]
        order += [q[4] for q in self._dense] + list(range(self._weights_n))
        order = list(dict.fromkeys(order))  # first use of each weight
        sizes = [-(-ws[i].numel() // ALIGN) * ALIGN for i in order]  # 64-byte starts
        starts = np.concatenate([[0], np.cumsum(sizes)]).tolist()
        base = ws[order[0]]
        if all(ws[i].untyped_storage().data_ptr() == base.untyped_storage().data_ptr()
               and ws[i].storage_offset() == starts[k] for k, i in enumerate(order)):
            return  # already laid out
        flat = torch.zeros(starts[-1], dtype=base.dtype, device=base.device)
        for k, i in enumerate(order):
            view = flat[starts[k]: starts[k] + ws[i].numel()].view(ws[i].shape)
            view.copy_(ws[i])
            self._buffers[f"w{i}"] = view

    def _refresh(self) -> None:
        """Cache the GEMM operands per step (stage-1 weights as transposed views), so that
        a forward does no buffer lookups (a decode step is only a few GEMVs long)."""
        with torch.no_grad():
            self._flatten()
        w = self.weights()
        self._ops1 = tuple((a, b, lo, hi, w[i].t(), init) for a, b, lo, hi, i, init in self._s1)
        self._ops2 = tuple((a, b, lo, hi, w[i]) for a, b, lo, hi, i in self._s2)
        self._ops_dense = tuple((ca, cb, ra, rb, w[i]) for ca, cb, ra, rb, i in self._dense)
        # the layer as its dense (out, in) matrix: one F.linear
        self._full = w[0] if self.spec.get("full") else None
        # one token: matrix-vector products, operands laid out for torch.mv
        self._mv1 = tuple((a, b, lo, hi, w[i], init) for a, b, lo, hi, i, init in self._s1)
        self._mv2 = tuple((a, b, lo, hi, w[i].t()) for a, b, lo, hi, i in self._s2)
        self._mv_dense = tuple((ca, cb, ra, rb, w[i].t()) for ca, cb, ra, rb, i in self._dense)
        self._scratch = {}  # prepared steps hold the old weights: rebuilt on first use

    def _apply(self, fn, recurse=True):  # .to(), .cuda(), .bfloat16(): new buffers
        out = super()._apply(fn, recurse)
        self._refresh()
        return out

    def weights(self) -> list[torch.Tensor]:
        """Weight buffers in index order: stage 1 ``(r, cols)``, stage 2 ``(r, rows)``,
        dense blocks ``(cols, rows)`` (laid out as each GEMM reads them fastest)."""
        return [getattr(self, f"w{i}") for i in range(self._weights_n)]

    def num_gemms(self) -> int:
        """GEMM calls per (chunk of a) forward; the sparse part counts as one."""
        if self._full is not None:
            return 1
        return len(self._s1) + len(self._s2) + len(self._dense) + (self.sp_val is not None)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self._full is not None:
            return F.linear(x, self._full, bias)
        t = x.shape[0]
        # scratch buffers with prepared views: on CPU, where nothing records a graph
        # through them (the GEMMs write with out=, which autograd refuses anyway)
        prepared = (x.is_cpu and not (x.requires_grad and torch.is_grad_enabled())
                    and not torch.compiler.is_compiling())
        if t == 1 and self._vector:
            if prepared:
                return self._run_vector_steps(x, bias)
            return self._run_vector(x, bias)
        y = x.new_empty((t, self.out_features))
        if t <= VIEW_TOKENS and prepared:
            self._run(x, bias, y, self._gemm_scratch(x))
            return y
        if t <= CHUNK_TOKENS:
            self._run(x, bias, y, self._gemm_steps(x.new_empty((t, self._h_width))))
            return y
        # long inputs in chunks of tokens: each chunk's activations stay in cache
        h = x.new_empty((CHUNK_TOKENS, self._h_width))
        steps = self._gemm_steps(h)
        for s in range(0, t, CHUNK_TOKENS):
            e = min(t, s + CHUNK_TOKENS)
            if e - s < CHUNK_TOKENS:
                steps = self._gemm_steps(h[: e - s])
            self._run(x[s:e], bias, y[s:e], steps)
        return y

    #: Attributes derived from the weight buffers by :meth:`_refresh` (views, scratch).
    _DERIVED = ("_ops1", "_ops2", "_ops_dense", "_full", "_mv1", "_mv2", "_mv_dense",
                "_scratch")

    def __getstate__(self) -> dict:
        """Copies and pickles hold the buffers only (no per-thread scratch, and no views
        that would be stored as separate tensors); the views are rebuilt on load."""
        return {k: v for k, v in self.__dict__.items() if k not in self._DERIVED}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._refresh()

    def _gemm_steps(self, h: torch.Tensor) -> tuple:
        """The operands of :meth:`_run` that live in the intermediate ``h (tokens, width)``
        (and in its copy permuted for stage 2), as views."""
        hp = h if self.perm is None else h.new_empty((h.shape[0], self.perm.numel()))
        zero = tuple(h[:, lo:hi] for lo, hi in self._h_zero)
        ops1 = tuple((a, b, w, h[:, lo:hi], init) for a, b, lo, hi, w, init in self._ops1)
        ops2 = tuple((a, b, hp[:, lo:hi], w) for a, b, lo, hi, w in self._ops2)
        return h, hp, self.perm, zero, ops1, ops2

    def _gemm_scratch(self, x: torch.Tensor) -> tuple:
        """This thread's :meth:`_gemm_steps` for ``x``'s token count, kept between calls (for
        the most recent count of at most :data:`VIEW_TOKENS` tokens): a GEMM's slices of
        ``h`` cost ~1 us each to create, ~3% of a 64-token forward."""
        key = (threading.get_ident(), x.dtype, torch.is_inference_mode_enabled(), "gemm")
        steps = self._scratch.get(key)
        if steps is None or steps[0].shape[0] != x.shape[0]:
            with torch.no_grad():
                steps = self._gemm_steps(torch.zeros((x.shape[0], self._h_width),
                                                     dtype=x.dtype, device=x.device))
            self._scratch[key] = steps
        return steps

    def _vector_steps(self, x: torch.Tensor) -> tuple:
        """This thread's scratch buffers for a one-token forward on CPU, with every GEMV's
        operands as views into them, built on first use (per dtype and inference mode).

        A decode step is a few GEMVs; creating their slices on every call costs ~1 us each,
        about a fifth of the step. Each thread has its own buffers, so concurrent calls do
        not share them; the output is a fresh tensor.
        """
        key = (threading.get_ident(), x.dtype, torch.is_inference_mode_enabled(), "vector")
        steps = self._scratch.get(key)
        if steps is not None:
            return steps
        with torch.no_grad():
            kw = {"dtype": x.dtype, "device": x.device}
            xb = torch.zeros((1, self.in_features), **kw)
            yb = torch.zeros((1, self.out_features), **kw)
            h = torch.zeros((self._h_width,), **kw)
            hp = h if self.perm is None else torch.zeros((self.perm.numel(),), **kw)
            x1, y1 = xb[0], yb[0]
            ops1 = tuple((w, x1[a:b], h[lo:hi]) for a, b, lo, hi, w, _ in self._mv1)
            ops2 = tuple((w, hp[lo:hi], y1[a:b]) for a, b, lo, hi, w in self._mv2)
            ops2 += tuple((w, x1[ca:cb], y1[ra:rb]) for ca, cb, ra, rb, w in self._mv_dense)
        steps = (xb, h, hp, self.perm, yb, y1, ops1, ops2)
        self._scratch[key] = steps
        return steps

    def _run_vector_steps(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """One token through this thread's prepared views (see :meth:`_vector_steps`).

        Every GEMV accumulates in place into a zeroed (or bias-filled) buffer: in-place
        ``addmv_`` dispatches faster than ``mv(out=)`` (measured ~4% of a 3072->768 step).
        """
        xb, h, hp, perm, yb, y1, ops1, ops2 = self._vector_steps(x)
        xb.copy_(x)
        h.zero_()
        for w, xs, hs in ops1:
            hs.addmv_(w, xs)
        if perm is not None:
            torch.index_select(h, 0, perm, out=hp)
        if bias is None:
            y1.zero_()
        else:
            y1.copy_(bias)
        for w, src, ys in ops2:
            ys.addmv_(w, src)
        return yb.clone()

    def _run_vector(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """One token (a decode step) where views are not prepared (GPU, ``torch.compile``):
        the GEMMs as matrix-vector products, which dispatch faster (measured 7-13% less
        time per forward on CPU)."""
        x1 = x[0]
        y = x.new_empty((1, self.out_features))
        y1 = y[0]
        h = x.new_empty((self._h_width,))
        for lo, hi in self._h_zero:
            h[lo:hi].zero_()
        for a, b, lo, hi, w, init in self._mv1:
            if init:
                torch.mv(w, x1[a:b], out=h[lo:hi])
            else:
                h[lo:hi].addmv_(w, x1[a:b])
        if self.perm is not None:
            h = h.index_select(0, self.perm)
        rest = self._mv2
        if self._y_init:
            _, _, lo, hi, w = rest[0]
            if bias is None:
                torch.mv(w, h[lo:hi], out=y1)
            else:
                torch.addmv(bias, w, h[lo:hi], out=y1)
            rest = rest[1:]
        elif bias is None:
            y1.zero_()
        else:
            y1.copy_(bias)
        for a, b, lo, hi, w in rest:
            y1[a:b].addmv_(w, h[lo:hi])
        for ca, cb, ra, rb, w in self._mv_dense:
            y1[ra:rb].addmv_(w, x1[ca:cb])
        return y

    def _run(
        self, x: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor, steps: tuple
    ) -> None:
        """``y = x W^T + bias`` for a 2-D chunk ``x``, written into ``y``; ``steps`` are the
        views of the scratch intermediate (:meth:`_gemm_steps`, as many tokens as ``x``)."""
        h, hp, perm, zero, ops1, ops2 = steps
        for z in zero:
            z.zero_()
        for a, b, w, hs, init in ops1:
            if init:
                torch.mm(x[:, a:b], w, out=hs)
            else:
                hs.addmm_(x[:, a:b], w)
        if perm is not None:
            torch.index_select(h, 1, perm, out=hp)
        rest = ops2
        if self._y_init:
            _, _, hs, w = rest[0]
            if bias is None:
                torch.mm(hs, w, out=y)
            else:
                torch.addmm(bias, hs, w, out=y)
            rest = rest[1:]
        elif bias is None:
            y.zero_()
        else:
            y.copy_(bias.expand_as(y))
        for a, b, hs, w in rest:
            y[:, a:b].addmm_(hs, w)
        for ca, cb, ra, rb, w in self._ops_dense:
            y[:, ra:rb].addmm_(x[:, ca:cb], w)
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
    split: bool = True,
    merge: float | None | str = "best",
    dense: bool | None = None,
) -> _Plan:
    """Group components and slice the folded factors ``u_m (out, R)``, ``v_m (R, in)``.

    ``dense``: ``True`` packs the layer as one dense GEMM (its matrix ``u_m v_m``),
    ``False`` never, ``None`` when the time model finds that faster than the packing
    (small layers with many scattered bands).

    ``split`` and ``merge`` choose how groups become GEMMs (see :func:`_stage_groups`).
    """
    out_f, in_f = u_m.shape[0], v_m.shape[1]
    offsets = np.concatenate([[0], np.cumsum(ranks)]).astype(int)
    comps = [c for c in range(len(ranks)) if col_bands[c][1] > 0 and row_bands[c][1] > 0]
    weights: list[torch.Tensor] = []
    macs = 0
    group_tokens = min(int(tokens), CHUNK_TOKENS)  # long inputs run in chunks

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
                sp_vals.append(block.reshape(-1).cpu())  # indices are on CPU
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

    stage1, stage2, h_zero, perm = [], [], [], []
    h_width = 0
    teff = float(max(group_tokens, memory_tokens))
    # modelled time of the packing (stages added below) and of one dense GEMM
    cost = sum(teff * (b - a) * (rb - ra) + io * group_tokens * (b - a + rb - ra) + overhead
               for a, b, ra, rb, _ in dense_specs)
    if sparse is not None:
        cost += SPARSE_MAC_FACTOR * teff * int(sparse["sp_val"].numel()) + overhead
    dense_cost = teff * in_f * out_f + io * group_tokens * (in_f + out_f) + overhead
    if lowrank and dense is not True:
        lr_ranks = [ranks[c] for c in lowrank]
        model = (group_tokens, memory_tokens, overhead, io, split, merge)
        # stage-1 GEMMs produce rank columns: widths in multiples of RANK_ALIGN run 2-3x
        # faster on CPU from a few tokens on (a decode step reads weights: no padding)
        rank_tile = RANK_ALIGN if group_tokens >= memory_tokens else 1
        cost1, g1 = _stage_groups([col_bands[c][0] for c in lowrank],
                                  [col_bands[c][1] for c in lowrank], lr_ranks, in_f, *model,
                                  rank_tile)
        cost2, g2 = _stage_groups([row_bands[c][0] for c in lowrank],
                                  [row_bands[c][1] for c in lowrank], lr_ranks, out_f, *model)
        cost += cost1 + cost2
        total = sum(lr_ranks)

        def free(groups) -> bool:  # one GEMM over every rank: the rank order is free
            return len(groups) == 1 and all(q[2] == 0 and q[3] >= total for q in groups[0][1])

        if free(g1):
            g1 = [([m for g in g2 for m in g[0]], g1[0][1])]
        elif free(g2):
            g2 = [([m for g in g1 for m in g[0]], g2[0][1])]
        # stage 1: h columns in the order of the stage-1 groups
        h_pos: dict[int, int] = {}
        for members, rects in g1:
            idx = rank_index([lowrank[m] for m in members])
            r_all = _rank_pad(int(idx.numel()), rank_tile)
            vg = torch.cat([v_m[idx], v_m.new_zeros(r_all - int(idx.numel()), in_f)])
            started = False
            for a, b, lo, hi in rects:
                init = not started and lo == 0 and hi == r_all
                started = started or init
                stage1.append((a, b, h_width + lo, h_width + hi, add(vg[lo:hi, a:b]), init))
                macs += (hi - lo) * (b - a)
            if not started:
                h_zero.append((h_width, h_width + r_all))
            start = h_width
            for m in members:
                h_pos[m] = h_width
                h_width += lr_ranks[m]
            h_width = start + r_all  # zero rows pad the group to a multiple of rank_tile
        # stage 2: h columns gathered into stage-2 group order
        hpos = 0
        for members, rects in g2:
            idx = rank_index([lowrank[m] for m in members])
            ug = u_m[:, idx]
            for a, b, lo, hi in rects:
                stage2.append((a, b, hpos + lo, hpos + hi, add(ug[a:b, lo:hi].t())))
                macs += (hi - lo) * (b - a)
            hpos += int(idx.numel())
            for m in members:
                perm.extend(range(h_pos[m], h_pos[m] + lr_ranks[m]))
        if perm == list(range(len(perm))):
            perm = []
        # a GEMM spanning every output row goes first: it starts y (with the bias)
        full = [q for q in stage2 if q[:2] == (0, out_f)]
        if full:
            stage2.remove(full[0])
            stage2.insert(0, full[0])
    full = dense is True or (dense is None and bool(comps) and cost >= dense_cost)
    if full:
        weights, sparse = [], None
        stage1, stage2, h_zero, perm, h_width, dense_specs = [], [], [], [], 0, []
        add(u_m @ v_m)  # (out, in), as nn.Linear holds it
        macs = in_f * out_f
    spec = {
        "out": out_f,
        "in": in_f,
        "tokens": int(tokens),
        "stage1": stage1,
        "h_zero": h_zero,
        "h_width": h_width,
        "stage2": stage2,
        "dense": dense_specs,
        "perm": perm,
        "macs": macs,
        "full": int(full),
    }
    return _Plan(spec, weights, sparse)


@torch.no_grad()
def _fastest(
    plans: Sequence[_Plan], tokens: int, in_features: int, dtype: torch.dtype,
    device: torch.device, reps: int = TUNE_REPS,
) -> _Plan:
    """The plan with the lowest time on random ``(tokens, in_features)`` inputs.

    Repetitions are interleaved across the plans in a rotating order, and each plan's best
    repetition is compared: on a shared machine a slow spell only ever adds time, and the
    minimum picked the faster of two plans more reliably than the median (candidates are
    often within 5-10% of each other).
    """
    x = torch.randn(tokens, in_features, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    calls = []
    for p in plans:  # warm up, and pick calls per sample: ~10 ms of work
        p(x, None)
        sync()
        t0 = time.perf_counter()
        p(x, None)
        sync()
        calls.append(max(1, min(1000, int(0.01 / max(time.perf_counter() - t0, 1e-6)))))
    n = min(calls)  # the same count for every plan
    times: list[list[float]] = [[] for _ in plans]
    order = list(range(len(plans)))
    for rep in range(reps):
        for i in order[rep % len(order):] + order[: rep % len(order)]:
            p = plans[i]
            sync()
            t0 = time.perf_counter()
            for _ in range(n):
                p(x, None)
            sync()
            times[i].append(time.perf_counter() - t0)
    best = [min(t) for t in times]
    return plans[int(np.argmin(best))]


class PackedGBLRLinear(FlopsAliases, nn.Module):
    """Frozen inference form of a :class:`~gblr.GBLRLinear` that computes only its bands.

    Build it with :meth:`from_gblr` (or ``GBLRLinear.packed()``). ``tokens`` is the number
    of tokens per call the grouping is tuned for; a sequence gives one packing per entry,
    chosen at run time by the input's token count (each packing stores its own weights).
    Inputs of any leading shape ``(..., in_features)``; outputs equal the masked layer's to
    float rounding. :meth:`macs` is the MACs per token it actually computes (band unions
    included), :attr:`true_macs` the evaluation-mode cost of the layer it came from.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        plans: Sequence[_Plan],
        bias: torch.Tensor | None = None,
        true_macs: int | None = None,
    ) -> None:
        super().__init__()
        if not plans:
            raise ValueError("plans must hold at least one packing")
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.plans = nn.ModuleList(plans)
        self._plan_seq = tuple(plans)  # plain references: indexing a ModuleList is slower
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        tok = [p.spec["tokens"] for p in plans]
        if tok != sorted(tok):
            raise ValueError(f"plans must be sorted by their token count, got {tok}")
        # switch between consecutive packings at the geometric mean of their token counts
        pairs = zip(tok[:-1], tok[1:], strict=True)
        self._switch = [float(np.sqrt(max(a, 1) * max(b, 1))) for a, b in pairs]
        self.true_macs = int(true_macs) if true_macs is not None else None

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
        tune: bool = False,
        allow_dense: bool = True,
    ) -> PackedGBLRLinear:
        """Pack a GBLR layer's evaluation-mode structure (whatever its current mode).

        ``memory_tokens``, ``overhead`` and ``io`` are the time model of the grouping
        (see :func:`group_bands`); by default the entry of :data:`TIME_MODELS` for the
        layer's device type (for a one-token packing, the overhead and io of
        :data:`VECTOR_TIME_MODELS` where the device has an entry). With ``tune`` the
        candidate packings of :data:`TUNE_VARIANTS` are timed for each token count on the
        layer's device, on random inputs, and the fastest is kept (packing is slower: a few
        forwards of each candidate). With ``allow_dense`` a packing may be the layer's dense
        matrix as one GEMM, where that is modelled (or, tuned, measured) faster: small
        layers with many scattered bands.
        """

        if not isinstance(layer, GBLRLinear):
            raise TypeError(f"layer must be a GBLRLinear, got {type(layer).__name__}")
        token_list = [tokens] if isinstance(tokens, int) else list(tokens)
        if not token_list or any(not isinstance(t, int) or t < 1 for t in token_list):
            raise ValueError(f"tokens must be a positive int or a sequence of them, got {tokens}")
        dtype = dtype or layer.U.dtype
        device_type = layer.U.device.type
        model = TIME_MODELS.get(device_type, TIME_MODELS["cpu"])
        memory_tokens = model[0] if memory_tokens is None else memory_tokens
        args = banded_factors(layer)
        plans = []
        for t in sorted(set(token_list)):
            # a decode step has its own per-call costs where it runs as prepared GEMVs
            vec = VECTOR_TIME_MODELS.get(device_type) if t == 1 else None
            ovh_t = overhead if overhead is not None else (vec or model[1:])[0]
            io_t = io if io is not None else (vec or model[1:])[1]
            if not tune:
                plans.append(_build_plan(*args, t, dtype, memory_tokens, ovh_t, io_t,
                                         dense=None if allow_dense else False))
                continue
            candidates = [
                _build_plan(*args, t, dtype, memory_tokens, ovh_t * f, io_t * g, split, merge,
                            dense).to(layer.U.device)
                for split, merge, f, g, dense in TUNE_VARIANTS
                if allow_dense or not dense
            ]
            plans.append(_fastest(candidates, t, layer.in_features, dtype, layer.U.device))
        bias = None if layer.bias is None else layer.bias.detach().to(dtype)
        packed = cls(layer.in_features, layer.out_features, plans, bias, layer.macs())
        return packed.to(layer.U.device)

    def plan_for(self, tokens: int) -> _Plan:
        """The packing used for ``tokens`` tokens per call."""
        i = 0
        for switch in self._switch:
            if tokens <= switch:
                break
            i += 1
        return self._plan_seq[i]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        if len(shape) == 0 or shape[-1] != self.in_features:
            raise ValueError(
                f"PackedGBLRLinear expects inputs of shape (..., {self.in_features}), "
                f"got {tuple(shape)}"
            )
        bias = self._buffers["bias"]  # (not through Module.__getattr__: a decode step is short)
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        if len(shape) == 2:  # the common case, without reshapes
            return self.plan_for(shape[0]).forward(x, bias)
        x2 = x.reshape(-1, self.in_features)
        return self.plan_for(x2.shape[0]).forward(x2, bias).reshape(*shape[:-1], self.out_features)

    def macs(self, tokens: int | None = None) -> int:
        """MACs per token this module computes (for the packing used at ``tokens``)."""
        plan = self.plans[0] if tokens is None else self.plan_for(tokens)
        return plan.macs

    def num_gemms(self, tokens: int | None = None) -> int:
        """GEMM calls per forward (for the packing used at ``tokens``, per chunk of
        :data:`CHUNK_TOKENS` tokens; the sparse part counts as one)."""
        plan = self.plans[0] if tokens is None else self.plan_for(tokens)
        return plan.num_gemms()

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
            f"bias={self.bias is not None}, macs={self.macs()}, true_macs={self.true_macs}, "
            f"gemms={self.num_gemms()}, tokens={tok}"
        )
