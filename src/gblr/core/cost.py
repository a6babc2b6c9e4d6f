"""Cost: MACs per token of the forward pass of every structure.

A dense ``in -> out`` layer costs ``in * out`` MACs per token (multiply-accumulates for one
input vector); every other structure's cost is written here once, and its ``macs()`` and
the accounting use these functions. Budgets (fractions of these costs) are in
:mod:`gblr.core.budget`, integer boxes of GBLR components in :mod:`gblr.core.boxes`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = [
    "dense_cost",
    "lowrank_cost",
    "dense_block_cheaper",
    "block_cost",
    "grouped_component_cost",
    "padded_block_size",
    "blockdiag_cost",
    "monarch_cost",
    "block_sparse_cost",
    "block_low_rank_cost",
    "box_component_cost",
    "box_component_costs",
]


def dense_cost(in_features: int, out_features: int) -> int:
    """MACs per token of a dense ``in -> out`` layer."""
    return int(in_features) * int(out_features)



def lowrank_cost(in_features: int, out_features: int, rank: int) -> int:
    """Cost of ``x -> U (V x)`` with ``U`` of shape ``(out, rank)``."""
    return int(rank) * (int(in_features) + int(out_features))



def dense_block_cheaper(rank: int, height: int, width: int) -> bool:
    """Whether a ``height x width`` block of ``rank`` rank-1 terms is cheaper computed dense
    (``h * w``) than factored (``rank * (h + w)``)."""
    return int(height) * int(width) < int(rank) * (int(height) + int(width))


def block_cost(rank: int, height: int, width: int) -> int:
    """Cost of one block ``height x width`` holding ``rank`` rank-1 terms.

    A block is computed either factored (``rank * (h + w)``) or dense (``h * w``),
    whichever is cheaper (:func:`dense_block_cheaper`).
    """
    if height <= 0 or width <= 0 or rank <= 0:
        return 0
    if dense_block_cheaper(rank, height, width):
        return int(height) * int(width)
    return int(rank) * (int(height) + int(width))


def grouped_component_cost(
    in_support: torch.Tensor, out_support: torch.Tensor, ranks: Sequence[int] | torch.Tensor
) -> int:
    """Cost of a set of components given their boolean supports.

    ``in_support`` is ``(K, in)`` and ``out_support`` is ``(K, out)``; ``ranks``
    gives each component's rank. Components with identical supports form one
    block, costed once by :func:`block_cost` with their ranks summed; a component
    with an empty support on either axis costs nothing.
    """
    if in_support.shape[0] == 0:
        return 0
    ranks_t = torch.as_tensor(ranks, dtype=torch.long, device=in_support.device)
    h = out_support.sum(dim=1)
    w = in_support.sum(dim=1)
    on = (h > 0) & (w > 0) & (ranks_t > 0)
    if not bool(on.any()):
        return 0
    keys = torch.cat([in_support[on], out_support[on]], dim=1).to(torch.uint8)
    uniq, inverse = torch.unique(keys, dim=0, return_inverse=True)
    group_rank = torch.zeros(uniq.shape[0], dtype=torch.long, device=keys.device)
    group_rank.index_add_(0, inverse, ranks_t[on])
    n_in = in_support.shape[1]
    gw = uniq[:, :n_in].sum(dim=1).long()
    gh = uniq[:, n_in:].sum(dim=1).long()
    per_group = torch.minimum(group_rank * (gh + gw), gh * gw)
    return int(per_group.sum().item())





def padded_block_size(n: int, nblocks: int) -> int:
    """Size of each of ``nblocks`` equal blocks covering ``n`` indices (the last one padded)."""
    return -(-int(n) // int(nblocks))


def blockdiag_cost(in_features: int, out_features: int, nblocks: int) -> int:
    """Cost of a block-diagonal layer: ``nblocks`` dense blocks of ``ceil(out/nb) x ceil(in/nb)``.

    Equals ``in * out / nblocks`` when ``nblocks`` divides both sizes; otherwise the
    padded blocks are counted as computed.
    """
    bi = padded_block_size(in_features, nblocks)
    bo = padded_block_size(out_features, nblocks)
    return int(nblocks) * bi * bo


def monarch_cost(in_features: int, out_features: int, nblocks: int, rank: int) -> int:
    """Cost of a Monarch layer with ``nblocks`` blocks per factor and blocks of rank ``rank``.

    The first block-diagonal factor has ``nblocks`` blocks ``(nblocks*rank) x ceil(in/nb)``,
    the second ``nblocks`` blocks ``ceil(out/nb) x (nblocks*rank)``, so the cost is
    ``rank * nblocks**2 * (ceil(in/nb) + ceil(out/nb))``, about
    ``rank * nblocks * (in + out)``. With ``rank = min(in, out) / nblocks**2`` this is
    the ``(in + out) * min(in, out) / nblocks`` of Dao et al. (2022).
    """
    bi = padded_block_size(in_features, nblocks)
    bo = padded_block_size(out_features, nblocks)
    return int(rank) * int(nblocks) ** 2 * (bi + bo)


def block_sparse_cost(num_blocks: int, block_rows: int, block_cols: int) -> int:
    """Cost of ``num_blocks`` dense blocks of ``block_rows x block_cols``."""
    return int(num_blocks) * int(block_rows) * int(block_cols)


def block_low_rank_cost(
    in_features: int, out_features: int, block_rows: int, block_cols: int, rank: int
) -> int:
    """Cost of a grid of ``block_rows x block_cols`` blocks, each held as rank-``rank`` factors.

    Every block is computed factored, ``rank * (block_rows + block_cols)``; the grid
    must tile the matrix.
    """
    n_blocks = (int(out_features) // int(block_rows)) * (int(in_features) // int(block_cols))
    return n_blocks * int(rank) * (int(block_rows) + int(block_cols))


def box_component_cost(
    in_len: torch.Tensor | np.ndarray,
    in_start: torch.Tensor | np.ndarray,
    out_len: torch.Tensor | np.ndarray,
    out_start: torch.Tensor | np.ndarray,
    in_features: int,
    out_features: int,
    ranks: torch.Tensor | np.ndarray | int = 1,
) -> int:
    """Cost of components given as integer cyclic boxes (the evaluation rule, without masks).

    ``in_len``/``in_start`` (and ``out_*``) are ``(K,)`` integer tensors or arrays: a component
    covers ``len`` indices from ``start``, wrapping around. A component at most one index
    long on either axis is off; boxes that cover the same indices form one block, as in
    :func:`grouped_component_cost`, whose result this equals for sharp (``sigma=None``) masks.
    Computed with NumPy on the host: it is a few operations on ``K`` integers, which the
    budget controller runs many times per training step.
    """
    costs = box_component_costs(in_len, in_start, out_len, out_start, in_features,
                                out_features, ranks)
    return int(costs[0])


def box_component_costs(
    in_len: torch.Tensor | np.ndarray,
    in_start: torch.Tensor | np.ndarray,
    out_len: torch.Tensor | np.ndarray,
    out_start: torch.Tensor | np.ndarray,
    in_features: int | np.ndarray,
    out_features: int | np.ndarray,
    ranks: torch.Tensor | np.ndarray | int = 1,
    layer: np.ndarray | None = None,
    num_layers: int = 1,
) -> np.ndarray:
    """:func:`box_component_cost` of several layers at once: ``(num_layers,)`` int64 costs.

    Component ``c`` belongs to layer ``layer[c]`` (all to layer 0 when None), whose axis
    lengths are ``in_features[c]`` and ``out_features[c]`` (per component, or one int for
    all); boxes group only within a layer. One pass for a whole model costs about what one
    layer costs alone, which is what the budget controller's bisections need.
    """
    in_len = _host(in_len)
    n_in = np.broadcast_to(_host(in_features), in_len.shape)
    n_out = np.broadcast_to(_host(out_features), in_len.shape)
    in_len = np.clip(in_len, 0, n_in)
    out_len = np.clip(_host(out_len), 0, n_out)
    ranks_a = np.broadcast_to(_host(ranks), in_len.shape)
    layer_a = np.zeros(in_len.shape, np.int64) if layer is None else _host(layer)
    costs = np.zeros(int(num_layers), np.int64)
    on = (in_len > 1) & (out_len > 1) & (ranks_a > 0)
    if not on.any():
        return costs
    # a full-length box covers the same indices wherever it starts
    i_s = np.where(in_len >= n_in, 0, _host(in_start) % n_in)
    o_s = np.where(out_len >= n_out, 0, _host(out_start) % n_out)
    a, b = int(n_in.max()) + 1, int(n_out.max()) + 1
    if int(num_layers) * a * a * b * b < 2**63:
        # one integer per box (lengths and starts are < n + 1): a 1-D unique
        key = (((layer_a * a + in_len) * a + i_s) * b + out_len) * b + o_s
        uniq, inverse = np.unique(key[on], return_inverse=True)
        g_layer, gw, gh = uniq // (a * a * b * b), (uniq // (a * b * b)) % a, (uniq // b) % b
    else:
        keys = np.stack([layer_a, in_len, i_s, out_len, o_s], axis=1)[on]
        uniq, inverse = np.unique(keys, axis=0, return_inverse=True)
        g_layer, gw, gh = uniq[:, 0], uniq[:, 1], uniq[:, 3]
    group_rank = np.zeros(uniq.shape[0], np.int64)
    np.add.at(group_rank, inverse.reshape(-1), ranks_a[on])
    np.add.at(costs, g_layer, np.minimum(group_rank * (gh + gw), gh * gw))
    return costs


def _host(values: torch.Tensor | np.ndarray | int) -> np.ndarray:
    """``values`` as a host int64 array."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=np.int64)
