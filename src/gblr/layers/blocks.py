"""Block-grid helpers shared by the structured family.

A grid of ``p x q`` blocks over an ``(out, in)`` matrix is viewed as a
``(out/p, in/q, p, q)`` tensor. A grid whose blocks are each low rank
(``U_ij V_ij``) is applied as two block-diagonal factors with a stride
permutation between them, the Monarch form of Dao et al. (2022): that is how
both :class:`~gblr.layers.monarch.MonarchLinear` and
:class:`~gblr.layers.blocklowrank.BlockLowRankLinear` compute their forward pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from gblr.core.cost import padded_block_size
from gblr.core.validate import check_positive

__all__ = [
    "check_block_shape",
    "check_nblocks",
    "valid_nblocks",
    "divisors",
    "default_block_shape",
    "to_blocks",
    "from_blocks",
    "pad_matrix",
    "padding_masks",
    "truncated_svd_factors",
    "diagonal_blocks",
    "sqrt_and_pinv_sqrt",
    "blocks_to_factors",
    "factors_to_blocks",
    "block_factor_matmul",
]


def check_block_shape(
    block_shape: Sequence[int], out_features: int, in_features: int, name: str = "block_shape"
) -> tuple[int, int]:
    """Validate ``(rows, cols)`` of one block and that the grid tiles an ``(out, in)`` matrix."""
    if isinstance(block_shape, str | bytes) or not isinstance(block_shape, Sequence):
        raise TypeError(f"{name} must be a pair (rows, cols), got {block_shape!r}")
    if len(block_shape) != 2:
        raise ValueError(f"{name} must be a pair (rows, cols), got {tuple(block_shape)!r}")
    p = check_positive(f"{name}[0]", block_shape[0])
    q = check_positive(f"{name}[1]", block_shape[1])
    if out_features % p or in_features % q:
        raise ValueError(
            f"{name}={(p, q)} does not tile a ({out_features}, {in_features}) weight: "
            f"rows must divide out_features and cols must divide in_features"
        )
    return p, q


def check_nblocks(nblocks: int, in_features: int, out_features: int) -> int:
    """Validate a block count for a padded block-diagonal factor on both axes.

    The blocks have ``ceil(n / nblocks)`` indices on each axis, the last one
    padded; ``nblocks`` must leave no block entirely made of padding.
    """
    nb = check_positive("nblocks", nblocks)
    for name, n in (("in_features", in_features), ("out_features", out_features)):
        size = padded_block_size(n, nb)
        if (nb - 1) * size >= n:
            raise ValueError(
                f"nblocks={nb} does not fit {name}={n}: blocks of {size} would leave "
                "the last block empty"
            )
    return nb


def valid_nblocks(in_features: int, out_features: int) -> list[int]:
    """Every block count that :func:`check_nblocks` accepts, in increasing order."""
    valid = []
    for nb in range(1, min(in_features, out_features) + 1):
        try:
            valid.append(check_nblocks(nb, in_features, out_features))
        except ValueError:
            continue
    return valid


def divisors(n: int) -> list[int]:
    """The positive divisors of ``n`` in increasing order."""
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def default_block_shape(
    out_features: int,
    in_features: int,
    target: tuple[float, float],
    feasible: Callable[[int, int], bool],
    requirement: str,
) -> tuple[int, int]:
    """The tiling ``(rows, cols)`` nearest ``target`` (in log scale) among feasible ones.

    Candidates are all pairs of divisors of ``out_features`` and ``in_features``;
    ``feasible(rows, cols)`` filters them; ``requirement`` describes the filter in the
    error raised when no candidate passes. Ties go to the larger block.
    """
    best: tuple[float, int, tuple[int, int]] | None = None
    for p in divisors(out_features):
        for q in divisors(in_features):
            if not feasible(p, q):
                continue
            dist = abs(math.log(p / target[0])) + abs(math.log(q / target[1]))
            key = (dist, -p * q, (p, q))
            if best is None or key < best:
                best = key
    if best is None:
        raise ValueError(
            f"no block shape tiling a ({out_features}, {in_features}) weight allows "
            f"{requirement}"
        )
    return best[2]


def to_blocks(weight: torch.Tensor, p: int, q: int) -> torch.Tensor:
    """View an ``(out, in)`` matrix as its ``(out/p, in/q, p, q)`` grid of blocks."""
    out_features, in_features = weight.shape
    return weight.reshape(out_features // p, p, in_features // q, q).transpose(1, 2)


def from_blocks(blocks: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`to_blocks`: a ``(gr, gc, p, q)`` grid back to ``(gr*p, gc*q)``."""
    gr, gc, p, q = blocks.shape
    return blocks.transpose(1, 2).reshape(gr * p, gc * q)


def pad_matrix(weight: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Zero-pad an ``(out, in)`` matrix at the end of both axes to ``(rows, cols)``."""
    return F.pad(weight, (0, cols - weight.shape[1], 0, rows - weight.shape[0]))


def padding_masks(
    nblocks: int,
    block_out: int,
    block_in: int,
    out_features: int,
    in_features: int,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Where a zero-padded block-diagonal layout runs past the real matrix.

    Returns the boolean ``(nblocks, block_out, 1)`` rows at or past ``out_features`` and
    ``(nblocks, 1, block_in)`` columns at or past ``in_features``; they broadcast over a
    ``(nblocks, block_out, block_in)`` stack of diagonal blocks.
    """
    rows = torch.arange(nblocks * block_out, device=device).reshape(nblocks, block_out, 1)
    cols = torch.arange(nblocks * block_in, device=device).reshape(nblocks, 1, block_in)
    return rows >= out_features, cols >= in_features


def truncated_svd_factors(
    matrices: torch.Tensor, rank: int, input_moments: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced rank-``rank`` truncated SVD of a batch ``(..., m, n)`` of matrices.

    Returns ``U (..., m, rank)`` and ``V (..., rank, n)`` with ``U @ V`` the best
    rank-``rank`` approximation in Frobenius norm of each matrix (Eckart-Young),
    both scaled by the square root of the singular values. Computed in float64.

    With ``input_moments`` (second moments ``C = X^T X / N`` of the inputs each matrix
    sees, ``(..., n, n)``, broadcast against the batch) the SVD is whitened: ``U V``
    minimises the output error ``||(U V - W) C^{1/2}||_F`` instead (directions with no
    input energy get zero weight).
    """
    w = matrices.double()
    if input_moments is None:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
    else:
        root, pinv_root = sqrt_and_pinv_sqrt(input_moments.to(w.device).double())
        u, s, vh = torch.linalg.svd(w @ root, full_matrices=False)
        vh = vh @ pinv_root
    root_s = s[..., :rank].sqrt()
    u_r = u[..., :rank] * root_s[..., None, :]
    v_r = root_s[..., :, None] * vh[..., :rank, :]
    return u_r.to(matrices.dtype), v_r.to(matrices.dtype)


def sqrt_and_pinv_sqrt(moments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric ``C^{1/2}`` and pseudo-inverse ``C^{+1/2}`` of a batch of PSD matrices."""
    evals, evecs = torch.linalg.eigh((moments + moments.transpose(-1, -2)) / 2)
    evals = evals.clamp_min(0.0)
    keep = evals > evals.amax(dim=-1, keepdim=True).clamp_min(1e-300) * 1e-10
    root = evals.sqrt()
    inv = torch.where(keep, 1.0 / root.clamp_min(1e-300), torch.zeros_like(root))
    vt = evecs.transpose(-1, -2)
    return (evecs * root[..., None, :]) @ vt, (evecs * inv[..., None, :]) @ vt


def diagonal_blocks(matrix: torch.Tensor, size: int) -> torch.Tensor:
    """The ``(n/size, size, size)`` diagonal blocks of a square ``(n, n)`` matrix."""
    n = matrix.shape[0]
    if matrix.dim() != 2 or matrix.shape[1] != n or n % size:
        raise ValueError(
            f"need a square matrix whose side is a multiple of {size}, got {tuple(matrix.shape)}"
        )
    idx = torch.arange(n // size, device=matrix.device)
    return matrix.reshape(n // size, size, n // size, size)[idx, :, idx, :]


def blocks_to_factors(U: torch.Tensor, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-diagonal factors of the grid ``W_ij = U_ij @ V_ij``.

    ``U`` is ``(gr, gc, p, r)`` and ``V`` is ``(gr, gc, r, q)``. Returns the first
    factor ``(gc, gr*r, q)`` (input block ``j`` feeds the rank-``r`` codes of every
    output block) and the second ``(gr, p, gc*r)`` (output block ``i`` sums its codes).
    """
    gr, gc, p, r = U.shape
    q = V.shape[-1]
    first = V.permute(1, 0, 2, 3).reshape(gc, gr * r, q)
    second = U.permute(0, 2, 1, 3).reshape(gr, p, gc * r)
    return first, second


def factors_to_blocks(
    first: torch.Tensor, second: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`blocks_to_factors`: ``(U (gr, gc, p, r), V (gr, gc, r, q))``."""
    gc, grr, q = first.shape
    gr, p, gcr = second.shape
    r = grr // gr
    V = first.reshape(gc, gr, r, q).permute(1, 0, 2, 3)
    U = second.reshape(gr, p, gc, r).permute(0, 2, 1, 3)
    return U, V


def block_factor_matmul(x: torch.Tensor, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """``x @ W.T`` for ``W`` given by two block-diagonal factors (see :func:`blocks_to_factors`).

    ``x`` is ``(T, gc*q)``; the result is ``(T, gr*p)``. Two batched matmuls and a
    stride permutation between them: ``T * (gc*q*gr*r + gr*gc*r*p)`` MACs.
    """
    gc, grr, q = first.shape
    gr, p, gcr = second.shape
    r = gcr // gc
    tokens = x.shape[0]
    h = torch.bmm(x.reshape(tokens, gc, q).transpose(0, 1), first.transpose(1, 2))
    h = h.reshape(gc, tokens, gr, r).permute(2, 1, 0, 3).reshape(gr, tokens, gc * r)
    y = torch.bmm(h, second.transpose(1, 2))
    return y.transpose(0, 1).reshape(tokens, gr * p)


def projection_error(
    approx: torch.Tensor, weight: torch.Tensor, second_moment: torch.Tensor | None = None
) -> float:
    """Relative error ``||W_hat - W|| / ||W||``, or with ``second_moment`` ``C`` the output
    error ``sqrt(tr(D C D^T) / tr(W C W^T))`` (``D = W_hat - W``), in float64."""
    w = weight.detach().double()
    d = approx.detach().double() - w
    if second_moment is None:
        return float(d.norm() / w.norm().clamp_min(1e-300))
    c = second_moment.detach().double().to(w.device)
    num = ((d @ c) * d).sum().clamp_min(0.0)
    den = ((w @ c) * w).sum().clamp_min(1e-300)
    return float((num / den).sqrt())


def candidate_shapes(out_features: int, in_features: int, limit: int = 12) -> list[tuple[int, int]]:
    """Up to ``limit`` block shapes ``(rows, cols)`` that tile an ``(out, in)`` matrix, with
    rows and cols of nearly the same aspect as the matrix's grid, spread over sizes from
    small to large blocks (the candidates a projection compares by error)."""
    shapes = []
    for p in divisors(out_features):
        for q in divisors(in_features):
            # a grid roughly as many blocks tall as wide
            if 0.5 <= (out_features / p) / (in_features / q) <= 2.0:
                shapes.append((p, q))
    shapes.sort(key=lambda s: s[0] * s[1])
    if len(shapes) > limit:
        step = (len(shapes) - 1) / (limit - 1)
        shapes = [shapes[round(i * step)] for i in range(limit)]
    return shapes


def best_by_error(
    candidates: Sequence[dict],
    build: Callable[..., Any],
    weight: torch.Tensor,
    second_moment: torch.Tensor | None = None,
) -> Any:
    """``build(**candidate)`` for each candidate that fits (``ValueError``: it does not) and
    return the result with the lowest :func:`projection_error` (ties: the earlier one)."""
    best, best_err = None, math.inf
    for kwargs in candidates:
        try:
            layer = build(**kwargs)
        except ValueError:
            continue
        was = layer.training
        layer.eval()
        with torch.no_grad():
            err = projection_error(layer.to_dense(), weight, second_moment)
        layer.train(was)
        if err < best_err:
            best, best_err = layer, err
    if best is None:
        raise ValueError("no candidate configuration fits the budget")
    return best
