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

import json
import math
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from gblr.core.files import write_text_atomic

__all__ = [
    "Gemm",
    "MeasuredTimes",
    "calibrate",
    "calibration_key",
    "cache_dir",
    "load_calibration",
    "model_time",
    "predict_seconds",
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
        return float(max(float(tokens), float(self.memory_tokens)))

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


# -- predicted time of a layer ----------------------------------------------------------------
#: One GEMM call as the time model sees it: ``(batch, rows, cols)``, a batch of ``rows x
#: cols`` weights, each applied to the call's tokens (``batch`` 1 for a plain GEMM).
Gemm = tuple[int, int, int]


def model_time(gemms: list[Gemm], tokens: int, model: TimeModel, sparse_nnz: int = 0) -> float:
    """Modelled time (MAC-equivalents) of running ``gemms`` (and a sparse product with
    ``sparse_nnz`` stored entries) on ``tokens`` tokens: one call overhead per GEMM,
    weights and activations of every batch element."""
    total = 0.0
    for batch, rows, cols in gemms:
        total += batch * (model.gemm(tokens, rows, cols) - model.overhead) + model.overhead
    if sparse_nnz:
        total += model.sparse(tokens, sparse_nnz)
    return total


def predict_seconds(module, tokens: int, times: MeasuredTimes) -> float:
    """Predicted seconds of one forward of ``module`` on ``tokens`` tokens: a structured
    layer or packed form (its ``gemms(tokens)``, ``sparse_nnz(tokens)`` and
    ``chunk_tokens`` where it has them) or a plain ``nn.Linear``."""
    tokens = int(tokens)
    if hasattr(module, "gemms"):
        gemms = module.gemms(tokens)
    else:  # nn.Linear
        gemms = [(1, module.out_features, module.in_features)]
    nnz = module.sparse_nnz(tokens) if hasattr(module, "sparse_nnz") else 0
    chunk = getattr(module, "chunk_tokens", None)
    if chunk and tokens > chunk:
        full, rest = divmod(tokens, chunk)
        total = full * times.seconds(gemms, chunk, nnz)
        total += times.seconds(gemms, rest, nnz) if rest else 0.0
    else:
        total = times.seconds(gemms, tokens, nnz)
    return total + times.call_seconds


# -- measured time models ---------------------------------------------------------------------
#: Token counts a calibration measures by default (a decode step to a long prompt).
CALIBRATION_TOKENS = (1, 16, 64, 256, 2048)
#: GEMM weight sizes a calibration measures at each token count (rows and cols).
CALIBRATION_SIZES = (16, 48, 128, 384, 1024)


@dataclass(frozen=True)
class MeasuredTimes:
    """A time model fitted to GEMM timings on one device, threads, dtype and torch version.

    ``regimes`` maps each calibrated token count to the :class:`TimeModel` fitted there (in
    MAC-equivalents) and ``rates`` to the seconds per MAC-equivalent at that count;
    ``seconds_per_mac`` is the rate of the largest count. A prediction for ``tokens`` uses the
    regime nearest in log scale (:meth:`model_for`), so its per-call overhead and activation
    cost are the ones measured there, while the work still scales with ``tokens``.
    """

    key: str
    seconds_per_mac: float
    regimes: dict[int, TimeModel]
    residual: float = 0.0
    #: seconds of calling a module (Python dispatch, reshapes) beyond its GEMMs, measured on
    #: a tiny ``nn.Linear``; :func:`predict_seconds` adds it once per forward
    call_seconds: float = 0.0
    rates: dict[int, float] | None = None

    def _regime(self, tokens: int) -> int:
        t = max(1, int(tokens))
        return min(self.regimes, key=lambda r: abs(math.log(r) - math.log(t)))

    def model_for(self, tokens: int) -> TimeModel:
        """The fitted model of the calibrated token count nearest ``tokens``."""
        return self.regimes[self._regime(tokens)]

    def seconds(self, gemms: list[Gemm], tokens: int, sparse_nnz: int = 0) -> float:
        """Predicted seconds of running ``gemms`` on ``tokens`` tokens."""
        regime = self._regime(tokens)
        rate = (self.rates or {}).get(regime, self.seconds_per_mac)
        return rate * model_time(gemms, tokens, self.regimes[regime], sparse_nnz)

    def to_json(self) -> dict:
        rates = self.rates or {}
        return {"key": self.key, "seconds_per_mac": self.seconds_per_mac,
                "residual": self.residual, "call_seconds": self.call_seconds,
                "regimes": {str(t): [m.memory_tokens, m.overhead, m.io,
                                     rates.get(t, self.seconds_per_mac)]
                            for t, m in self.regimes.items()}}

    @classmethod
    def from_json(cls, data: dict) -> MeasuredTimes:
        try:
            raw = {int(t): [float(x) for x in v] for t, v in data["regimes"].items()}
            spm = float(data["seconds_per_mac"])
            regimes = {t: TimeModel(v[0], v[1], v[2]) for t, v in raw.items()}
            rates = {t: (v[3] if len(v) > 3 else spm) for t, v in raw.items()}
            key = str(data["key"])
            residual = float(data.get("residual", 0.0))
            call = float(data.get("call_seconds", 0.0))
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as err:
            raise ValueError(f"not a gblr time-model calibration: {err}") from None
        values = [spm, residual, call, *rates.values()] + [
            x for m in regimes.values() for x in (m.memory_tokens, m.overhead, m.io)]
        if (not regimes or spm <= 0 or min(rates.values()) <= 0 or min(regimes) < 1
                or not all(math.isfinite(x) and x >= 0 for x in values)):
            raise ValueError("not a gblr time-model calibration: bad values")
        return cls(key, spm, regimes, residual, call, rates)


def calibration_key(device: str, dtype, threads: int | None = None) -> str:
    """What a calibration is valid for: device (with its name), threads, dtype, torch."""
    dev = torch.device(device)
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
        threads_part = ""
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        name = line.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
        threads_part = f"-{threads or torch.get_num_threads()}t"
    dtype_name = str(dtype).replace("torch.", "")
    safe = "".join(ch if ch.isalnum() else "_" for ch in name)[:60]
    return f"{dev.type}-{safe}{threads_part}-{dtype_name}-torch{torch.__version__}"


def cache_dir() -> Path:
    """Where calibrations are kept: ``$GBLR_CACHE`` or ``$XDG_CACHE_HOME/gblr`` (default
    ``~/.cache/gblr``), under ``timemodel/``."""
    root = os.environ.get("GBLR_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache"), "gblr")
    return Path(root) / "timemodel"


def load_calibration(device: str = "cpu", dtype=None, threads: int | None = None):
    """The cached :class:`MeasuredTimes` for this device, threads, dtype and torch version,
    or None when it was never calibrated (run ``gblr calibrate``)."""
    dtype = dtype or torch.float32
    path = cache_dir() / f"{calibration_key(device, dtype, threads)}.json"
    if not path.is_file():
        return None
    try:
        return MeasuredTimes.from_json(json.loads(path.read_text()))
    except (ValueError, OSError) as err:
        raise ValueError(f"{path}: {err}; run `gblr calibrate` again") from None


def _time_call(fn, sync, reps: int) -> float:
    fn()
    sync()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def calibrate(
    device: str = "cpu",
    dtype=None,
    threads: int | None = None,
    tokens: tuple[int, ...] = CALIBRATION_TOKENS,
    sizes: tuple[int, ...] = CALIBRATION_SIZES,
    reps: int = 5,
    save: bool = True,
    progress: bool = False,
) -> MeasuredTimes:
    """Time ``F.linear`` GEMMs of ``sizes x sizes`` weights at each token count and fit
    ``time = overhead + max(tokens, memory_tokens) * rows * cols + io * tokens * (rows + cols)``
    (MAC-equivalents; the seconds per MAC from the largest token count).

    The fit at each token count is a least-squares fit of ``a + b * rows * cols +
    c * (rows + cols)`` to the best of ``reps`` timings; ``save`` writes the result to
    :func:`cache_dir` (atomically) for :func:`load_calibration`. A few seconds on a CPU.
    """
    import json

    import torch


    dtype = dtype or torch.float32
    dev = torch.device(device)
    if threads is not None:
        torch.set_num_threads(int(threads))
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    tokens = tuple(sorted({int(t) for t in tokens}))
    if not tokens or tokens[0] < 1 or len(sizes) < 2:
        raise ValueError("calibrate needs positive token counts and at least two sizes")
    fits: dict[int, tuple[float, float, float]] = {}
    residuals = []
    for t in tokens:
        rows_a, times = [], []
        for r in sizes:
            for c in sizes:
                x = torch.randn(t, c, device=dev, dtype=dtype)
                w = torch.randn(r, c, device=dev, dtype=dtype)
                calls = max(1, min(200, int(2e7 / max(1, t * r * c))))

                def run(x=x, w=w, calls=calls):
                    for _ in range(calls):
                        F.linear(x, w)

                times.append(_time_call(run, sync, reps) / calls)
                rows_a.append((1.0, float(r * c), float(r + c)))
        a = torch.tensor(rows_a, dtype=torch.float64)
        y = torch.tensor(times, dtype=torch.float64)
        # relative least squares: every shape counts alike, small and large
        wts = 1.0 / y
        sol = torch.linalg.lstsq(a * wts[:, None], y * wts).solution.clamp_min(0.0)
        fits[t] = (float(sol[0]), float(sol[1]), float(sol[2]))
        pred = a @ sol
        residuals.append(float(((pred - y).abs() / y).median()))
        if progress:
            print(f"calibrate: {t} tokens, median relative error of the fit "
                  f"{residuals[-1]:.1%}")
    # a module call beyond its GEMM: a tiny nn.Linear called vs its F.linear alone
    tiny = torch.nn.Linear(16, 16, bias=False, device=dev, dtype=dtype)
    x1 = torch.randn(1, 16, device=dev, dtype=dtype)
    with torch.no_grad():
        module_s = _time_call(lambda: [tiny(x1) for _ in range(200)], sync, reps) / 200
        gemm_s = _time_call(lambda: [F.linear(x1, tiny.weight) for _ in range(200)], sync,
                            reps) / 200
    call_seconds = max(0.0, module_s - gemm_s)
    big = tokens[-1]
    seconds_per_mac = max(fits[big][1] / big, 1e-18)
    # weights are read at least once per call: the smallest count's work in tokens' worth
    small = tokens[0]
    memory_tokens = max(1.0, fits[small][1] / seconds_per_mac) if small == 1 else MEMORY_TOKENS
    regimes, rates = {}, {}
    for t, (a0, b, c) in fits.items():
        rate = max(b / max(t, memory_tokens), 1e-18)
        rates[t] = rate
        regimes[t] = TimeModel(memory_tokens, a0 / rate, c / (rate * t))
    result = MeasuredTimes(calibration_key(device, dtype, threads), seconds_per_mac, regimes,
                           float(max(residuals)) if residuals else 0.0, call_seconds, rates)
    if not all(math.isfinite(v) for m in regimes.values()
               for v in (m.memory_tokens, m.overhead, m.io)):
        raise RuntimeError("the calibration produced non-finite values")
    if save:
        path = cache_dir() / f"{result.key}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(result.to_json(), indent=1))
    return result
