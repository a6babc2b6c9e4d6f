"""The modelled time of the GEMMs a deployed layer runs (the one place).

Time is counted in MAC-equivalents. A GEMM that multiplies ``tokens`` activations by a
``rows x cols`` weight costs

    max(tokens, memory_tokens) * rows * cols      (weights are read at least once per call)
    + io * tokens * (rows + cols)                  (activations moved in and out)
    + overhead                                     (dispatch, slicing)

and grouping bands before segmenting them uses the input-side estimate
``(max(tokens, memory_tokens) * rank + io * tokens) * length + overhead * pieces``.
The constants per device type come from measurements (see the notes on each); the packer
(:mod:`gblr.deploy`) plans with them, and ``tune=True`` replaces the model by timing.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "MEMORY_TOKENS",
    "OP_OVERHEAD_MACS",
    "IO_MACS",
    "SPARSE_MAC_FACTOR",
    "TIME_MODELS",
    "VECTOR_TIME_MODELS",
    "TimeModel",
    "time_model",
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
#: CPU sparse kernels run at about this fraction of the dense GEMM's MACs per second
#: (measured: ~9 vs ~45 GMAC/s at ~11% density): the time model charges sparse MACs 5x.
SPARSE_MAC_FACTOR = 5
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
#: Time model of a one-token call per device type, ``(overhead, io)``: on CPU a decode
#: step runs its GEMVs through views prepared once per thread, so a call costs ~1 us
#: (measured: 13-17 GEMVs beat the 7-8 that :data:`OP_OVERHEAD_MACS` picks, 768x3072 and
#: 3072x768 layers at 30% cost), and a GEMV reads its input band once, at about the cost
#: of a weight (``memory_tokens`` MAC-equivalents), not per token of a GEMM.
VECTOR_TIME_MODELS: dict[str, tuple[float, float]] = {"cpu": (40_000, 8)}


@dataclass(frozen=True)
class TimeModel:
    """GEMM time in MAC-equivalents: ``memory_tokens``, per-call ``overhead``, activation
    ``io`` (see the module docstring). The methods take numbers or numpy arrays."""

    memory_tokens: int = MEMORY_TOKENS
    overhead: float = OP_OVERHEAD_MACS
    io: float = IO_MACS

    def effective_tokens(self, tokens: int) -> float:
        """Tokens a call is charged for: weights are read at least once per call."""
        return float(max(int(tokens), int(self.memory_tokens)))

    def gemm(self, tokens: int, rows, cols):
        """One GEMM of ``tokens`` activations with a ``rows x cols`` weight."""
        teff = self.effective_tokens(tokens)
        return teff * rows * cols + self.io * tokens * (rows + cols) + self.overhead

    def band(self, tokens: int, rank, length, pieces=1):
        """Grouping estimate of one group of bands: ``rank`` rows over ``length`` indices,
        charged input-side activations and ``pieces`` calls (2 when the band wraps)."""
        teff = self.effective_tokens(tokens)
        return (teff * rank + self.io * tokens) * length + self.overhead * pieces

    def sparse(self, tokens: int, nnz: int):
        """One sparse-matrix product with ``nnz`` stored entries."""
        return SPARSE_MAC_FACTOR * self.effective_tokens(tokens) * nnz + self.overhead

    def scaled(self, overhead: float = 1.0, io: float = 1.0) -> TimeModel:
        """The model with its overhead and io multiplied by the given factors."""
        return TimeModel(self.memory_tokens, self.overhead * overhead, self.io * io)


def time_model(
    device_type: str = "cpu",
    tokens: int = 64,
    memory_tokens: int | None = None,
    overhead: float | None = None,
    io: float | None = None,
) -> TimeModel:
    """The time model for calls of ``tokens`` tokens on ``device_type`` ("cpu", "cuda", ...).

    A one-token call uses the device's :data:`VECTOR_TIME_MODELS` entry where there is
    one; unknown device types use the CPU entry. Given values override the table's.
    """
    mem, ovh, io_ = TIME_MODELS.get(device_type, TIME_MODELS["cpu"])
    vec = VECTOR_TIME_MODELS.get(device_type) if int(tokens) == 1 else None
    if vec is not None:
        ovh, io_ = vec
    return TimeModel(
        mem if memory_tokens is None else memory_tokens,
        ovh if overhead is None else overhead,
        io_ if io is None else io,
    )
