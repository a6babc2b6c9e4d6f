"""Band geometry of a GBLR layer's evaluation-mode structure, the packer's input.

Every row of ``V_m`` (column of ``U_m``) of a component is nonzero on one cyclic band
of input columns (output rows). These helpers read the bands, cut a wrapping band into
pieces that do not cross the end of the axis, snap band edges to aligned offsets and
cover two bands by one.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["ALIGN", "RANK_ALIGN", "cyclic_band", "banded_factors"]

#: Band edges that do not wrap are widened to multiples of this many indices (64 bytes
#: of float32), which makes the sliced GEMMs faster.
ALIGN = 16
#: Stage-1 GEMMs (for at least ``memory_tokens`` tokens) write rank ranges whose widths are
#: multiples of this (groups padded with zero rows): MKL runs a GEMM with 16 output
#: columns 2.7x faster than one with 15, 32 1.3x faster than 33 (1 thread, 512 tokens).
RANK_ALIGN = 16


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
