"""The packer's planner: which components share a GEMM, and which GEMMs a packing runs.

Per stage, bands are grouped by agglomerative merging (:func:`group_bands`) and each
group's union band is cut into segments by dynamic programming (:func:`_segment`), both
minimising the modelled time of :mod:`gblr.core.timemodel`; several merge strengths are
tried and the cheapest kept. Components sharing one box that is cheaper dense become one
dense GEMM (or, when tiny, entries of one sparse matrix). :func:`_build_plan` turns the
result into a :class:`~gblr.deploy.executor._Plan`, or the layer as one dense GEMM where
that models faster.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch

from gblr.core.cost import block_cost, dense_block_cheaper
from gblr.core.timemodel import IO_MACS, MEMORY_TOKENS, OP_OVERHEAD_MACS, TimeModel
from gblr.deploy.bands import ALIGN, RANK_ALIGN, _cover, _pieces, _rank_pad, _snap
from gblr.deploy.executor import CHUNK_TOKENS, _Plan

__all__ = ["SPARSE_BLOCK_AREA", "SPARSE_CSR_TOKENS", "MERGE_FACTORS", "group_bands"]

#: Dense blocks of at most this many entries (e.g. the 2x2 blocks of a "low rank +
#: blocks" projection) are not one GEMM each: they are gathered into one sparse matrix.
SPARSE_BLOCK_AREA = 16
#: Packings for at most this many tokens hold that sparse matrix as CSR (25x faster than
#: COO at 1 token on CPU), the others as COO (1.4x faster than CSR at 4096 tokens).
SPARSE_CSR_TOKENS = 256


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
    model = TimeModel(memory_tokens, overhead, io)
    members: list[list[int]] = [[i] for i in range(k)]

    def cost(s, l, r):
        return model.band(tokens, r, l, 1.0 + ((s + l) > n))

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


def _segment(
    offs: np.ndarray,
    lens: np.ndarray,
    cum: np.ndarray,
    start: int,
    length: int,
    n: int,
    tokens: int,
    model: TimeModel,
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
        cost = np.where(ok, model.gemm(tokens, r, seg), 0.0)
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
    model: TimeModel,
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
            groups = group_bands(starts, lengths, ranks, n, tokens, model.memory_tokens,
                                 model.overhead * f, model.io * f)
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
                total += sum(model.gemm(tokens, r_all, b - a) for a, b, _, _ in rects)
                out.append((list(members), rects, g_start))
                continue
            choice = None
            for key in (np.lexsort((offs, -lens)), np.lexsort((-lens, offs))):
                rk = np.concatenate([[0], np.cumsum([ranks[c] for c in mem[key]])])
                cost, rects = _segment(offs[key], lens[key], rk, g_start, g_len, n, tokens,
                                       model, ALIGN, tile)
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


def _build_plan(
    u_m: torch.Tensor,
    v_m: torch.Tensor,
    ranks: list[int],
    col_bands: list[tuple[int, int]],
    row_bands: list[tuple[int, int]],
    tokens: int,
    dtype: torch.dtype,
    model: TimeModel,
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
        if len(members) > 1 and dense_block_cheaper(r, rl, cl):
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
    # modelled time of the packing (stages added below) and of one dense GEMM
    cost = sum(model.gemm(group_tokens, b - a, rb - ra) for a, b, ra, rb, _ in dense_specs)
    if sparse is not None:
        cost += model.sparse(group_tokens, int(sparse["sp_val"].numel()))
    dense_cost = model.gemm(group_tokens, in_f, out_f)
    if lowrank and dense is not True:
        lr_ranks = [ranks[c] for c in lowrank]
        stage = (group_tokens, model, split, merge)
        # stage-1 GEMMs produce rank columns: widths in multiples of RANK_ALIGN run 2-3x
        # faster on CPU from a few tokens on (a decode step reads weights: no padding)
        rank_tile = RANK_ALIGN if group_tokens >= model.memory_tokens else 1
        cost1, g1 = _stage_groups([col_bands[c][0] for c in lowrank],
                                  [col_bands[c][1] for c in lowrank], lr_ranks, in_f, *stage,
                                  rank_tile)
        cost2, g2 = _stage_groups([row_bands[c][0] for c in lowrank],
                                  [row_bands[c][1] for c in lowrank], lr_ranks, out_f, *stage)
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
