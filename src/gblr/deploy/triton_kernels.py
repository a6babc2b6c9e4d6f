"""Triton kernels of :class:`~gblr.deploy.tiled.TiledGBLRLinear`: one launch per stage.

Imported only when a tiled layer runs on CUDA (Triton is optional). Each program of a
stage computes one ``(block_m tokens) x (one tile of outputs)`` block of the result,
looping over the kept tiles of its row in CSR order:

- stage 1, program ``(m, i)``: ``h[m, dst1[i]] = sum_p x[m, tile idx1[p]] @ tiles1[p]``;
- stage 2, program ``(m, j)``: ``y[m, tile j] = sum_p h[m, tile idx2[p]] @ tiles2[p] + b``.

Products accumulate in float32. Float32 inputs multiply in full precision (``"ieee"``:
TF32 would change results by ~1e-3); bfloat16 and float16 in their native tensor-core
form. ``interpret=True`` runs the same kernels on CPU tensors through Triton's
interpreter (slow; used by the tests of machines without a GPU); there the operands of
``tl.dot`` are cast to float32 first, as the interpreter multiplies bfloat16 wrongly.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

__all__ = ["tiled_linear", "block_tokens", "compile_kernels"]


def _stage1(x_ptr, w_ptr, ptr_ptr, idx_ptr, dst_ptr, h_ptr, tokens, n_in, stride_x, stride_h,
            BLOCK_M: tl.constexpr, IN_TILE: tl.constexpr, RANK_TILE: tl.constexpr,
            PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    pid_m = tl.program_id(0)
    tile = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.arange(0, IN_TILE)
    rr = tl.arange(0, RANK_TILE)
    acc = tl.full((BLOCK_M, RANK_TILE), 0.0, tl.float32)
    start = tl.load(ptr_ptr + tile)
    end = tl.load(ptr_ptr + tile + 1)
    for p in range(start, end):
        cols = tl.load(idx_ptr + p) * IN_TILE + rk
        x = tl.load(x_ptr + rm[:, None] * stride_x + cols[None, :],
                    mask=(rm[:, None] < tokens) & (cols[None, :] < n_in), other=0.0)
        w = tl.load(w_ptr + p * (IN_TILE * RANK_TILE) + rk[:, None] * RANK_TILE + rr[None, :])
        x = x.to(w.dtype)
        if UPCAST:
            x, w = x.to(tl.float32), w.to(tl.float32)
        acc += tl.dot(x, w, input_precision=PRECISION)
    dst = tl.load(dst_ptr + tile * RANK_TILE + rr)
    tl.store(h_ptr + rm[:, None] * stride_h + dst[None, :], acc.to(h_ptr.dtype.element_ty),
             mask=(rm[:, None] < tokens) & (dst[None, :] >= 0))


def _stage2(h_ptr, w_ptr, ptr_ptr, idx_ptr, bias_ptr, y_ptr, tokens, rank, n_out, stride_h,
            stride_y, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, RANK_TILE: tl.constexpr,
            OUT_TILE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    pid_m = tl.program_id(0)
    tile = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = tl.arange(0, RANK_TILE)
    ro = tl.arange(0, OUT_TILE)
    rn = tile * OUT_TILE + ro
    acc = tl.full((BLOCK_M, OUT_TILE), 0.0, tl.float32)
    start = tl.load(ptr_ptr + tile)
    end = tl.load(ptr_ptr + tile + 1)
    for p in range(start, end):
        ranks = tl.load(idx_ptr + p) * RANK_TILE + rr
        h = tl.load(h_ptr + rm[:, None] * stride_h + ranks[None, :],
                    mask=(rm[:, None] < tokens) & (ranks[None, :] < rank), other=0.0)
        w = tl.load(w_ptr + p * (RANK_TILE * OUT_TILE) + rr[:, None] * OUT_TILE + ro[None, :])
        if UPCAST:
            h, w = h.to(tl.float32), w.to(tl.float32)
        acc += tl.dot(h, w, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < n_out, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * stride_y + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(rm[:, None] < tokens) & (rn[None, :] < n_out))


@functools.cache
def _kernels(interpret: bool):
    """The two stages compiled for the GPU, or wrapped for Triton's CPU interpreter."""
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction

        return InterpretedFunction(_stage1), InterpretedFunction(_stage2)
    return triton.jit(_stage1), triton.jit(_stage2)


_TRITON_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def compile_kernels(
    capability: int = 90, dtype: torch.dtype = torch.float32, block_m: int = 16,
    rank_tile: int = 16, in_tile: int = 64, out_tile: int = 64, bias: bool = True,
) -> tuple:
    """Compile both stages ahead of time for a CUDA compute ``capability`` (90: H100/H200),
    down to machine code, without a GPU: a check that they lower for real hardware, which
    the interpreter does not do. Returns the two compiled kernels."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if dtype not in _TRITON_TYPES:
        raise ValueError(f"dtype must be one of {list(_TRITON_TYPES)}, got {dtype}")
    t = _TRITON_TYPES[dtype]
    precision = "ieee" if dtype == torch.float32 else "tf32"
    stage1, stage2 = _kernels(False)
    ints = {"ptr_ptr": "*i32", "idx_ptr": "*i32"}
    sig1 = {"x_ptr": f"*{t}", "w_ptr": f"*{t}", **ints, "dst_ptr": "*i32", "h_ptr": f"*{t}",
            "tokens": "i32", "n_in": "i32", "stride_x": "i32", "stride_h": "i32"}
    const1 = {"BLOCK_M": block_m, "IN_TILE": in_tile, "RANK_TILE": rank_tile,
              "PRECISION": precision, "UPCAST": False}
    sig2 = {"h_ptr": f"*{t}", "w_ptr": f"*{t}", **ints, "bias_ptr": f"*{t}", "y_ptr": f"*{t}",
            "tokens": "i32", "rank": "i32", "n_out": "i32", "stride_h": "i32",
            "stride_y": "i32"}
    const2 = {"HAS_BIAS": bias, "BLOCK_M": block_m, "RANK_TILE": rank_tile,
              "OUT_TILE": out_tile, "PRECISION": precision, "UPCAST": False}
    target = GPUTarget("cuda", int(capability), 32)
    return tuple(
        triton.compile(ASTSource(fn, {**sig, **dict.fromkeys(const, "constexpr")}, const),
                       target=target)
        for fn, sig, const in ((stage1, sig1, const1), (stage2, sig2, const2))
    )


def block_tokens(tokens: int) -> int:
    """Tokens per program: 16 (the smallest ``tl.dot`` tile) up to 64 for long inputs."""
    return 16 if tokens <= 16 else 32 if tokens <= 256 else 64


def tiled_linear(
    x: torch.Tensor, layer, interpret: bool | None = None, block_m: int | None = None,
) -> torch.Tensor:
    """``layer(x)`` for a 2-D ``x`` with the Triton kernels (two launches).

    ``interpret`` (default: when ``x`` is on CPU) runs them through Triton's interpreter.
    ``block_m``: tokens per program, a power of two >= 16 (default :func:`block_tokens`).
    """
    if block_m is not None and (block_m < 16 or block_m & (block_m - 1)):
        raise ValueError(f"block_m must be a power of two >= 16, got {block_m}")
    if x.dim() != 2 or x.shape[1] != layer.in_features:
        raise ValueError(f"x must be (tokens, {layer.in_features}), got {tuple(x.shape)}")
    interpret = (not x.is_cuda) if interpret is None else interpret
    stage1, stage2 = _kernels(bool(interpret))
    dtype = layer.tiles2.dtype
    x = x.to(dtype).contiguous()
    tokens = x.shape[0]
    y = x.new_empty((tokens, layer.out_features))
    if tokens == 0:
        return y
    precision = "ieee" if dtype == torch.float32 else "tf32"
    upcast = bool(interpret) and dtype != torch.float32
    bm = block_m or block_tokens(tokens)
    grid_m = triton.cdiv(tokens, bm)
    h = x if layer.direct else x.new_empty((tokens, max(1, layer.rank)))
    n1 = layer.ptr1.numel() - 1
    if n1:
        stage1[(grid_m, n1)](
            x, layer.tiles1, layer.ptr1, layer.idx1, layer.dst1, h, tokens,
            layer.in_features, x.stride(0), h.stride(0),
            BLOCK_M=bm, IN_TILE=layer.in_tile, RANK_TILE=layer.rank_tile, PRECISION=precision,
            UPCAST=upcast,
        )
    bias = layer.bias
    n2 = layer.ptr2.numel() - 1
    stage2[(grid_m, n2)](
        h, layer.tiles2, layer.ptr2, layer.idx2, bias if bias is not None else y, y, tokens,
        layer.rank, layer.out_features, h.stride(0), y.stride(0), HAS_BIAS=bias is not None,
        BLOCK_M=bm, RANK_TILE=layer.rank_tile, OUT_TILE=layer.out_tile, PRECISION=precision,
        UPCAST=upcast,
    )
    return y
