"""Tiled inference form of a GBLR layer: two block-sparse GEMMs, one kernel launch each.

The grouped-GEMM packing (:mod:`gblr.deploy.packed`) issues one GEMM per segment, a dozen
to several dozen calls per layer. On a GPU each call is a kernel launch, and at decode
sizes the launches cost more than the arithmetic. Here the folded factors are cut into
fixed tiles instead and only the tiles holding a nonzero are kept:

- **stage 1**: ``h = x V^T``. Rank rows are ordered by the start of their input band, cut
  into tiles of ``rank_tile`` rows by ``in_tile`` columns; a rank tile lists the input
  tiles its rows touch. Each output row of a tile is written to its stage-2 position in
  ``h`` (the rank order of stage 2), so no separate permutation runs.
- **stage 2**: ``y = h U^T + bias``. Rank columns are ordered by the start of their output
  band and cut into ``rank_tile`` by ``out_tile`` tiles; an output tile lists the rank
  tiles that reach it.

Where the layer's matrix itself has fewer nonzero ``rank_tile`` by ``out_tile`` tiles than
the two stages together (small layers, or components that are small dense blocks), it is
kept **direct**: stage 1 is skipped and stage 2 reads ``x`` in place of ``h``.

On CUDA with Triton installed each stage is one kernel (:mod:`gblr.deploy.triton_kernels`);
everywhere else (CPU, inputs that need gradients) the same tiles run as one batched matrix
product per stage in PyTorch, so results agree across devices. Both are exact: the masks
are folded into the factors and a dropped tile holds only zeros. :meth:`macs` counts the
MACs of the kept tiles (tile padding included); :attr:`true_macs` is the layer's cost.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gblr.core.deprecation import FlopsAliases
from gblr.core.validate import check_float_dtype
from gblr.deploy.bands import banded_factors
from gblr.layers.gblr import GBLRLinear

__all__ = ["TiledGBLRLinear", "triton_available", "BACKENDS"]

#: How :class:`TiledGBLRLinear` runs: the Triton kernels, the PyTorch tile products, or
#: "auto" (Triton on CUDA when installed, PyTorch otherwise).
BACKENDS = ("auto", "triton", "torch")


@functools.cache
def triton_available() -> bool:
    """Whether Triton can be imported (it is an optional dependency: ``gblr[triton]``)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _order(bands: list[tuple[int, int]], ranks: list[int]) -> np.ndarray:
    """Rank rows ordered by their component's band start (then length): neighbouring rows
    in a tile then cover nearby indices, so fewer tiles hold a nonzero."""
    comps = sorted(range(len(ranks)), key=lambda c: (bands[c][0], bands[c][1], c))
    offsets = np.concatenate([[0], np.cumsum(ranks)]).astype(int)
    if not comps:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([np.arange(offsets[c], offsets[c + 1]) for c in comps])


def _block_sparse(mat: torch.Tensor, row_tile: int, col_tile: int):
    """Tiles of ``mat (rows, cols)`` (zero-padded to whole tiles) that hold a nonzero.

    Returns ``(ptr, idx, tiles, rows)``: row tile ``i`` keeps the column tiles
    ``idx[ptr[i]:ptr[i+1]]``, whose values are ``tiles[ptr[i]:ptr[i+1]]``
    (each ``(row_tile, col_tile)``), in CSR order; ``rows`` is each kept tile's row tile.
    """
    rows, cols = mat.shape
    nr, nc = -(-rows // row_tile), -(-cols // col_tile)
    padded = F.pad(mat, (0, nc * col_tile - cols, 0, nr * row_tile - rows))
    blocks = padded.reshape(nr, row_tile, nc, col_tile).permute(0, 2, 1, 3)
    keep = blocks.ne(0).any(dim=3).any(dim=2)  # (nr, nc)
    counts = keep.sum(dim=1)
    ptr = torch.zeros(nr + 1, dtype=torch.int32)
    ptr[1:] = torch.cumsum(counts, 0).to(torch.int32)
    row_of, idx = keep.nonzero(as_tuple=True)
    return ptr, idx.to(torch.int32), blocks[row_of, idx].contiguous(), row_of.to(torch.int32)


def _check_tiles(**sizes: object) -> None:
    """Each tile size is an int (not a bool) and a power of two >= 16."""
    for name, value in sizes.items():
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name} must be an int (a power of two >= 16), got {value!r}")
        if value < 16 or value & (value - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {value}")


class TiledGBLRLinear(FlopsAliases, nn.Module):
    """Frozen inference form of a :class:`~gblr.GBLRLinear` as two block-sparse GEMMs.

    Build it with :meth:`from_gblr` (or ``gblr.deploy(model, backend="triton")``).
    ``backend``: ``"auto"`` runs the Triton kernels on CUDA when Triton is installed and
    the PyTorch tile products otherwise; ``"triton"`` requires Triton for CUDA inputs;
    ``"torch"`` always uses PyTorch. Inputs of any leading shape ``(..., in_features)``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        tiles: dict[str, torch.Tensor],
        rank: int,
        rank_tile: int,
        in_tile: int,
        out_tile: int,
        bias: torch.Tensor | None = None,
        true_macs: int | None = None,
        backend: str = "auto",
        direct: bool = False,
    ) -> None:
        super().__init__()
        _check_tiles(rank_tile=rank_tile, in_tile=in_tile, out_tile=out_tile)
        missing = sorted(set(self.TILE_BUFFERS) - set(tiles))
        if missing:
            raise ValueError(f"tiles lacks {missing}")
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.rank = int(rank)
        self.rank_tile, self.in_tile, self.out_tile = int(rank_tile), int(in_tile), int(out_tile)
        self.true_macs = int(true_macs) if true_macs is not None else None
        self.backend = backend
        self.direct = bool(direct)
        if self.direct and self.rank != self.in_features:
            raise ValueError(f"a direct tiling reads x as h: rank must be in_features "
                             f"({self.in_features}), got {self.rank}")
        for name in self.TILE_BUFFERS:
            self.register_buffer(name, tiles[name])
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self._check_tiles()

    #: Buffers of the two stages: CSR pointers and tile indices (int32), tile values, the
    #: stage-2 position of each stage-1 rank row (-1 for padding), and each tile's row tile.
    #: A direct tiling has empty stage-1 buffers.
    TILE_BUFFERS = ("ptr1", "idx1", "tiles1", "dst1", "row1",
                    "ptr2", "idx2", "tiles2", "row2")

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        if value not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {value!r}")
        self._backend = value

    def _check_tiles(self) -> None:
        """Shapes of the tile buffers agree with each other and with the layer's sizes."""
        r1 = 0 if self.direct else -(-self.rank // self.rank_tile)
        n_out = -(-self.out_features // self.out_tile)
        expect = {
            "ptr1": (r1 + 1,), "dst1": (r1 * self.rank_tile,),
            "ptr2": (n_out + 1,),
        }
        for name, shape in expect.items():
            if tuple(getattr(self, name).shape) != shape:
                raise ValueError(
                    f"tile buffer {name} has shape {tuple(getattr(self, name).shape)}, "
                    f"expected {shape} for a {self.in_features}->{self.out_features} layer "
                    f"of rank {self.rank}"
                )
        n_in = -(-self.in_features // self.in_tile)
        n_rank = -(-self.rank // self.rank_tile)
        for stage, (ptr, idx, row, cols) in enumerate(
            ((self.ptr1, self.idx1, self.row1, n_in), (self.ptr2, self.idx2, self.row2, n_rank)), 1
        ):
            counts = ptr.diff() if ptr.numel() > 1 else ptr[:0]
            bad = (
                int(ptr[0]) != 0 or int(ptr[-1]) != idx.numel() or bool((counts < 0).any())
                or row.numel() != idx.numel()
                or bool((idx < 0).any() or (idx >= cols).any())
                or not torch.equal(row.long(), torch.repeat_interleave(counts.long()))
            )
            if bad:
                raise ValueError(f"stage-{stage} tile indices are inconsistent (corrupted?)")
        if bool(((self.dst1 < -1) | (self.dst1 >= max(self.rank, 1))).any()):
            raise ValueError("stage-1 destinations are out of range (corrupted?)")
        t1 = (self.idx1.numel(), self.in_tile, self.rank_tile)
        t2 = (self.idx2.numel(), self.rank_tile, self.out_tile)
        if tuple(self.tiles1.shape) != t1 or tuple(self.tiles2.shape) != t2:
            raise ValueError(
                f"tile values have shapes {tuple(self.tiles1.shape)} and "
                f"{tuple(self.tiles2.shape)}, expected {t1} and {t2}"
            )

    @classmethod
    @torch.no_grad()
    def from_gblr(
        cls,
        layer: nn.Module,
        rank_tile: int = 16,
        in_tile: int = 64,
        out_tile: int = 64,
        dtype: torch.dtype | None = None,
        backend: str = "auto",
        direct: bool | None = None,
    ) -> TiledGBLRLinear:
        """Tile a GBLR layer's evaluation-mode structure (whatever its current mode).

        ``direct``: tile the layer's matrix itself (True), its two factors (False), or
        whichever keeps fewer tile entries (None).
        """

        if not isinstance(layer, GBLRLinear):
            raise TypeError(f"layer must be a GBLRLinear, got {type(layer).__name__}")
        _check_tiles(rank_tile=rank_tile, in_tile=in_tile, out_tile=out_tile)
        u_m, v_m, ranks, col_bands, row_bands = banded_factors(layer)
        u_m, v_m = u_m.cpu(), v_m.cpu()
        dtype = layer.U.dtype if dtype is None else check_float_dtype("dtype", dtype)
        order1 = torch.as_tensor(_order(col_bands, ranks), dtype=torch.long)
        order2 = torch.as_tensor(_order(row_bands, ranks), dtype=torch.long)
        total = int(order1.numel())
        # stage 1 on V rows in stage-1 order; tiles stored (in_tile, rank_tile) for x @ tile
        ptr1, idx1, t1, row1 = _block_sparse(v_m[order1], rank_tile, in_tile)
        # stage 2 on U^T rows in stage-2 order; tiles stored (rank_tile, out_tile)
        ptr2, idx2, t2, row2 = _block_sparse(u_m[:, order2].contiguous(), out_tile, rank_tile)
        pos2 = torch.empty(total, dtype=torch.long)
        pos2[order2] = torch.arange(total)
        r1 = -(-total // rank_tile)
        dst1 = torch.full((r1 * rank_tile,), -1, dtype=torch.int32)
        dst1[:total] = pos2[order1].to(torch.int32)
        # the layer's matrix as stage 2 on x, where it has fewer nonzero tiles
        ptr_d, idx_d, t_d, row_d = _block_sparse(u_m @ v_m, out_tile, rank_tile)
        if direct is None:
            direct = t_d.numel() < t1.numel() + t2.numel()
        if direct:
            ptr1, idx1, row1, dst1 = (torch.zeros(1, dtype=torch.int32),
                                      *(torch.zeros(0, dtype=torch.int32),) * 3)
            t1 = t1.new_zeros((0, rank_tile, in_tile))
            ptr2, idx2, t2, row2, total = ptr_d, idx_d, t_d, row_d, layer.in_features
        tiles = {
            "ptr1": ptr1, "idx1": idx1, "tiles1": t1.transpose(1, 2).to(dtype).contiguous(),
            "dst1": dst1, "row1": row1,
            "ptr2": ptr2, "idx2": idx2, "tiles2": t2.transpose(1, 2).to(dtype).contiguous(),
            "row2": row2,
        }
        bias = None if layer.bias is None else layer.bias.detach().to(dtype)
        tiled = cls(layer.in_features, layer.out_features, tiles, total, rank_tile, in_tile,
                    out_tile, bias, layer.macs(), backend, direct)
        return tiled.to(layer.U.device)

    def uses_triton(self, x: torch.Tensor) -> bool:
        """Whether a forward on ``x`` runs the Triton kernels."""
        if self.backend == "torch" or not x.is_cuda:
            return False
        if x.requires_grad and torch.is_grad_enabled():
            return False  # the kernels have no backward: the PyTorch path is differentiable
        if self.backend == "triton" and not triton_available():
            raise RuntimeError(
                "backend='triton' needs Triton (pip install 'gblr[triton]'); "
                "use backend='auto' or 'torch' without it"
            )
        return triton_available()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        if len(shape) == 0 or shape[-1] != self.in_features:
            raise ValueError(
                f"TiledGBLRLinear expects inputs of shape (..., {self.in_features}), "
                f"got {tuple(shape)}"
            )
        x2 = x.reshape(-1, self.in_features)
        if self.uses_triton(x2):
            from gblr.deploy.triton_kernels import tiled_linear

            y = tiled_linear(x2, self)
        else:
            y = self.torch_forward(x2, bias=True)
        return y.reshape(*shape[:-1], self.out_features)

    def torch_forward(self, x: torch.Tensor, bias: bool = True) -> torch.Tensor:
        """The tile products in PyTorch for a 2-D ``x``: per stage, one batched matrix
        product over the kept tiles and one scatter-add of their partial sums."""
        t = x.shape[0]
        dtype = self.tiles2.dtype
        x = x.to(dtype)
        r2 = -(-self.rank // self.rank_tile)
        if self.direct:
            h = F.pad(x, (0, r2 * self.rank_tile - self.rank)).view(t, r2, self.rank_tile)
        else:
            h = self._stage1_torch(x, r2)
        n_out = self.ptr2.numel() - 1
        part = torch.bmm(h[:, self.idx2.long()].transpose(0, 1), self.tiles2)
        y = x.new_zeros((n_out, t, self.out_tile)).index_add_(0, self.row2.long(), part)
        y = y.permute(1, 0, 2).reshape(t, n_out * self.out_tile)[:, : self.out_features]
        if bias and self.bias is not None:
            y = y + self.bias.to(dtype)
        return y

    def _stage1_torch(self, x: torch.Tensor, r2: int) -> torch.Tensor:
        """``h`` of :meth:`torch_forward`, ``(tokens, r2, rank_tile)`` in stage-2 order."""
        t = x.shape[0]
        n_in = -(-self.in_features // self.in_tile)
        xt = F.pad(x, (0, n_in * self.in_tile - self.in_features)).view(t, n_in, self.in_tile)
        r1 = self.ptr1.numel() - 1
        # (tiles, t, in_tile) @ (tiles, in_tile, rank_tile) -> partial h per tile
        part = torch.bmm(xt[:, self.idx1.long()].transpose(0, 1), self.tiles1)
        h1 = x.new_zeros((r1, t, self.rank_tile)).index_add_(0, self.row1.long(), part)
        h1 = h1.permute(1, 0, 2).reshape(t, r1 * self.rank_tile)
        h = x.new_zeros((t, r2 * self.rank_tile + 1))  # last column: sink of padding rows
        dst = torch.where(self.dst1 >= 0, self.dst1, r2 * self.rank_tile).long()
        return h.index_copy(1, dst, h1)[:, :-1].reshape(t, r2, self.rank_tile)

    def macs(self, tokens: int | None = None) -> int:
        """MACs per token of the kept tiles (padding within tiles included)."""
        return int(self.tiles1.numel() + self.tiles2.numel())

    def num_gemms(self, tokens: int | None = None) -> int:
        """Kernel launches (or batched products) per forward: 1 for a direct tiling, else 2."""
        return 1 if self.direct else 2

    def num_tiles(self) -> tuple[int, int]:
        """Kept tiles of stage 1 and stage 2."""
        return int(self.idx1.numel()), int(self.idx2.numel())

    @torch.no_grad()
    def to_dense(self) -> torch.Tensor:
        """The ``(out, in)`` matrix applied (bias excluded)."""
        eye = torch.eye(self.in_features, dtype=self.tiles2.dtype, device=self.tiles2.device)
        return self.torch_forward(eye, bias=False).t()

    def extra_repr(self) -> str:
        n1, n2 = self.num_tiles()
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, rank={self.rank}, tiles=({n1}, {n2}) of "
            f"{self.rank_tile}x{self.in_tile}/{self.rank_tile}x{self.out_tile}, "
            f"macs={self.macs()}, true_macs={self.true_macs}, direct={self.direct}, "
            f"backend={self.backend!r}"
        )
