"""Measured where it is served: MiniLM-L6 dense vs deployed GBLR in ONNX Runtime and PyTorch.

Does the saving of a deployed model survive export? The embedded all-MiniLM-L6-v2 encoder
is compressed as ``gblr.bench.speed`` does for its end-to-end row (every encoder linear
projected by ``GBLRLinear.from_linear`` at budget 0.5, ``steps=0``: speed does not depend
on the values), deployed for each setting's token count, and both models are exported
with :func:`gblr.export_onnx` (checked against PyTorch). For each setting (batch x tokens)
and intra-op thread count (1 and every core) the four contenders run side by side in one
process, repetitions interleaved in a rotating order (:func:`time_side_by_side`), medians
reported with their interquartile range: PyTorch dense and deployed at that many
``torch.set_num_threads`` threads, ONNX Runtime (CPU, that many intra-op threads, one
inter-op thread, no spinning) dense and deployed. The target: ORT's speed-up at least
0.9 times PyTorch's. Writes ``results/serve/{results.md,results.json}``.

    python -m gblr.bench.serve            # 1x128 and 32x128 tokens, 1 and all threads
    python -m gblr.bench.serve --quick    # tiny settings, a smoke test
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from gblr.bench.speed import compress_minilm
from gblr.bench.timing import cpu_name, steady_allocator, time_side_by_side
from gblr.convert.hf import default_model_path, load_hf_model
from gblr.deploy import deploy
from gblr.deploy.export import export_onnx, max_rel_error

__all__ = ["serve_table", "serve_markdown", "main"]

#: ORT speed-up / PyTorch speed-up at or above this: the saving survives in the engine.
TARGET = 0.9
#: A row whose per-repetition speed-ups (dense / deployed, interleaved) spread over more
#: than this fraction of their median was measured on a busy machine: shown, not counted.
NOISY = 0.2
#: A row at several threads where a contender is this many times slower than at one
#: thread ran on cores taken by other processes: shown, not counted.
OVERSUBSCRIBED = 1.5
#: (batch, tokens per sequence) of the full run and of ``--quick``.
SETTINGS = ((1, 128), (32, 128))
QUICK_SETTINGS = ((1, 16),)


def _recorded(fn: Callable[[], object], samples: list[float]) -> Callable[[], object]:
    """``fn`` that appends each call's seconds to ``samples`` (one call per repetition with
    ``min_time=0``: the samples are the repetitions, after two warm-up calls)."""

    def call():
        t0 = time.perf_counter()
        out = fn()
        samples.append(time.perf_counter() - t0)
        return out

    return call


def _quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def _session(ort, path: Path, threads: int):
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # spinning workers would keep a core busy into the next contender's repetition
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _load_models(budget: float) -> tuple[nn.Module, nn.Module]:
    dense = load_hf_model(default_model_path())[0]
    compressed = copy.deepcopy(dense)
    compress_minilm(compressed, budget)
    return dense, compressed


@torch.no_grad()
def serve_table(
    settings: tuple[tuple[int, int], ...], threads: list[int], reps: int, budget: float = 0.5,
    work: Path | None = None,
) -> list[dict]:
    """One row per setting and thread count: PyTorch and ONNX Runtime, dense and deployed.

    Args:
        settings: ``(batch, seq)`` pairs; the deployed model is packed for ``batch * seq``
            tokens per call.
        threads: intra-op thread counts (PyTorch's ``set_num_threads``, ORT's intra-op).
        reps: interleaved repetitions per contender (medians and quartiles over them).
        budget: cost of every encoder linear, as a fraction of dense.
        work: folder for the ONNX files (a temporary one when None).

    Returns:
        The rows: medians and quartiles in ms, speed-ups, the ratio ORT / PyTorch speed-up,
        the largest relative error of ORT vs PyTorch, and the files' GEMM counts.

    Example:
        >>> rows = serve_table(((1, 16),), [1], reps=3)  # doctest: +SKIP
        >>> rows[0]["ratio"]  # doctest: +SKIP
        0.97
    """
    import onnxruntime as ort

    dense, compressed = _load_models(budget)
    rows = []
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        for batch, seq in settings:
            deployed = copy.deepcopy(compressed)
            report = deploy(deployed, tokens=batch * seq)
            g = torch.Generator().manual_seed(batch * 1000 + seq)
            ids = torch.randint(1000, dense.config.vocab_size, (batch, seq), generator=g)
            inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
            feed = {k: v.numpy() for k, v in inputs.items()}
            models = {"dense": dense, "deployed": deployed}
            files, exports = {}, {}
            for name, model in models.items():
                files[name] = Path(tmp) / f"{name}_{batch}x{seq}.onnx"
                t0 = time.perf_counter()
                exports[name] = export_onnx(model, inputs, files[name])
                print(f"[serve] {batch}x{seq} {name}: exported in "
                      f"{time.perf_counter() - t0:.1f} s ({exports[name]})", flush=True)
            refs = {n: m(**inputs).last_hidden_state for n, m in models.items()}
            for n_threads in threads:
                torch.set_num_threads(n_threads)
                sessions = {n: _session(ort, files[n], n_threads) for n in models}
                errors = {n: max_rel_error(torch.from_numpy(s.run(None, feed)[0]), refs[n])
                          for n, s in sessions.items()}
                fns = {f"torch_{n}": (lambda m=m, i=inputs: m(**i)) for n, m in models.items()}
                fns |= {f"ort_{n}": (lambda s=s, f=feed: s.run(None, f))
                        for n, s in sessions.items()}
                samples = {k: [] for k in fns}
                fns = {k: _recorded(f, samples[k]) for k, f in fns.items()}
                with torch.inference_mode():
                    times = time_side_by_side(fns, reps=reps, min_time=0.0)
                samples = {k: v[2:] for k, v in samples.items()}  # the warm-up calls out
                row = {"batch": batch, "seq": seq, "tokens": batch * seq, "threads": n_threads,
                       "reps": reps}
                for key, seconds in times.items():
                    lo, hi = _quartiles(samples[key])
                    row[f"{key}_ms"] = seconds * 1e3
                    row[f"{key}_q1_ms"], row[f"{key}_q3_ms"] = lo * 1e3, hi * 1e3
                for engine in ("torch", "ort"):
                    d, p = samples[f"{engine}_dense"], samples[f"{engine}_deployed"]
                    paired = [a / b for a, b in zip(d, p, strict=True)]
                    row[f"{engine}_speedup"] = row[f"{engine}_dense_ms"] / row[
                        f"{engine}_deployed_ms"]
                    row[f"{engine}_speedup_q1"], row[f"{engine}_speedup_q3"] = _quartiles(paired)
                row["ratio"] = row["ort_speedup"] / row["torch_speedup"]
                row["ort_max_rel_error_dense"] = errors["dense"]
                row["ort_max_rel_error_deployed"] = errors["deployed"]
                row["gemms_dense"] = len(exports["dense"].weight_gemms)
                row["gemms_deployed"] = len(exports["deployed"].weight_gemms)
                row["packed_cost"] = report.packed_macs / report.dense_macs
                rows.append(row)
                print(f"[serve] {batch}x{seq}, {n_threads} thread(s): PyTorch "
                      f"{row['torch_speedup']:.2f}x, ORT {row['ort_speedup']:.2f}x, "
                      f"ratio {row['ratio']:.2f}", flush=True)
                del sessions
    return rows


def _cell(row: dict, key: str) -> str:
    return f"{row[key + '_ms']:.1f} [{row[key + '_q1_ms']:.1f}–{row[key + '_q3_ms']:.1f}]"


def _speedup(row: dict, engine: str) -> str:
    return (f"{row[engine + '_speedup']:.2f}x [{row[engine + '_speedup_q1']:.2f}–"
            f"{row[engine + '_speedup_q3']:.2f}]")


def _noisy(row: dict) -> bool:
    """Whether an engine's per-repetition speed-ups spread (interquartile range) over more
    than :data:`NOISY` of its speed-up."""
    return any(row[f"{e}_speedup_q3"] - row[f"{e}_speedup_q1"] > NOISY * row[f"{e}_speedup"]
               for e in ("torch", "ort"))


def _oversubscribed(row: dict, rows: list[dict]) -> bool:
    """Whether, with more than one thread, a contender takes over :data:`OVERSUBSCRIBED`
    times its one-thread time at the same setting (the cores were busy elsewhere)."""
    one = next((r for r in rows if r["threads"] == 1 and r["batch"] == row["batch"]
                and r["seq"] == row["seq"]), None)
    if row["threads"] == 1 or one is None:
        return False
    keys = ("torch_dense", "torch_deployed", "ort_dense", "ort_deployed")
    return any(row[f"{k}_ms"] > OVERSUBSCRIBED * one[f"{k}_ms"] for k in keys)


def _flag(row: dict, rows: list[dict]) -> str:
    flags = [f for f, on in (("oversubscribed", _oversubscribed(row, rows)),
                             ("noisy", _noisy(row))) if on]
    return f" ({', '.join(flags)})" if flags else ""


def serve_markdown(meta: dict, rows: list[dict]) -> str:
    """The results page: one row per setting and thread count, then the verdict."""
    def name(r: dict) -> str:
        return f"{r['batch']}x{r['seq']} at {r['threads']} thread(s)"

    over = [r for r in rows if _oversubscribed(r, rows)]
    clean = [r for r in rows if not _noisy(r) and r not in over]
    met = [r for r in clean if r["ratio"] >= TARGET]
    missed = [name(r) for r in clean if r not in met]
    noisy = [name(r) for r in rows if _noisy(r)]
    lines = [
        "# Measured where it is served: ONNX Runtime vs PyTorch (MiniLM-L6)",
        "",
        f"all-MiniLM-L6-v2 encoder, every encoder linear at budget {meta['budget']} "
        "(`GBLRLinear.from_linear`, `steps=0`, as `results/speed`'s end-to-end row), deployed "
        "with `gblr.deploy(model, tokens=batch*seq)` and exported with `gblr.export_onnx` "
        f"(opset default, dynamo exporter). CPU: {meta['cpu']}, torch {meta['torch']}, "
        f"onnxruntime {meta['onnxruntime']}. Medians of {meta['reps']} interleaved "
        "repetitions, [first–third quartile] beside each; speed-up = dense / deployed "
        "(with the quartiles of the per-repetition ratios). Threads: PyTorch "
        "`set_num_threads` and ORT intra-op threads (one inter-op thread, no spinning).",
        "",
        "| batch x tokens | threads | PyTorch dense ms | PyTorch deployed ms | PyTorch "
        "speed-up | ORT dense ms | ORT deployed ms | ORT speed-up | ORT / PyTorch speed-up "
        "| ORT vs PyTorch max rel. error (dense / deployed) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['batch']}x{r['seq']} | {r['threads']} | {_cell(r, 'torch_dense')} | "
            f"{_cell(r, 'torch_deployed')} | {_speedup(r, 'torch')} | "
            f"{_cell(r, 'ort_dense')} | {_cell(r, 'ort_deployed')} | "
            f"{_speedup(r, 'ort')} | {r['ratio']:.2f}{_flag(r, rows)} | "
            f"{r['ort_max_rel_error_dense']:.1e} / {r['ort_max_rel_error_deployed']:.1e} |"
        )
    if rows:
        r = rows[0]
        lines += [
            "",
            f"The exported graphs: dense {r['gemms_dense']} matrix products with weights, "
            f"deployed {r['gemms_deployed']} (each packed layer its band GEMMs, "
            f"{r['packed_cost']:.3f} of the dense MACs; `gblr.deploy.export.onnx_gemms`). "
            "With `steps=0` the projection keeps its truncated-SVD start, so every layer "
            "packs as one GEMM pair; layers with learned bands pack as more, narrower GEMMs "
            "(`results/speed`), which the export keeps one node each.",
            "",
            f"Target ORT speed-up / PyTorch speed-up >= {TARGET}: met in {len(met)} of "
            f"{len(clean)} settings measured cleanly"
            + (f" (not met: {', '.join(missed)})." if missed else "."),
        ]
        if over:
            lines += [
                "",
                f"Oversubscribed (a contender more than {OVERSUBSCRIBED}x slower with more "
                "threads than with one: the cores were taken by other processes, so that "
                f"engine's threads wait on each other; not counted): "
                f"{', '.join(name(r) for r in over)}.",
            ]
        if noisy:
            lines += [
                "",
                f"Noisy (an engine's per-repetition speed-ups spread over more than "
                f"{NOISY:.0%} of their median: the machine was busy; not counted): "
                f"{', '.join(noisy)}.",
            ]
    lines += ["", f"Command: `{meta['command']}`.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gblr.bench.serve",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny settings (a smoke test)")
    parser.add_argument("--reps", type=int, default=None,
                        help="interleaved repetitions (21; --quick: 3)")
    parser.add_argument("--threads", type=int, nargs="+", default=None,
                        help="intra-op thread counts (1 and every core)")
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--out", type=Path, default=Path("results/serve"))
    args = parser.parse_args(argv)
    try:
        import onnxruntime
        import transformers  # noqa: F401
    except ImportError as exc:
        print(f"serve benchmark skipped: {exc} (pip install 'gblr[onnx,hf]')")
        return 0
    cores = os.cpu_count() or 1
    threads = args.threads or sorted({1, cores})
    if any(t < 1 for t in threads):
        parser.error("--threads must be positive")
    reps = args.reps or (3 if args.quick else 21)
    steady_allocator()
    torch.manual_seed(0)
    try:
        rows = serve_table(QUICK_SETTINGS if args.quick else SETTINGS, threads, reps,
                           args.budget)
    except ImportError as exc:  # the embedded MiniLM is not installed
        print(f"serve benchmark skipped: {exc}")
        return 0
    meta = {
        "command": " ".join(["python -m gblr.bench.serve",
                             *(argv if argv is not None else sys.argv[1:])]),
        "cpu": cpu_name(), "cores": cores, "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__, "reps": reps, "budget": args.budget,
        "threads": threads, "target": TARGET,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2)
                                           + "\n")
    (args.out / "results.md").write_text(serve_markdown(meta, rows))
    print(f"wrote {args.out}/results.md, results.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
