"""``gblr compress``: compress a local Hugging Face model, distil it, report, save, draw masks.

With no arguments it runs offline on the embedded all-MiniLM-L6-v2 at half the cost of
its encoder's linear layers, distilled for a short time on a Shakespeare sample shipped
with gblr.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from gblr.convert.distill import PRECISIONS, precision_name

__all__ = ["main", "build_parser", "unique_dir", "resolve_device", "summary_table", "run"]

#: Data-aware projection and the sensitivity split use the first CALIBRATION_ITEMS training
#: passages (or images), in batches of CALIBRATION_BATCH.
CALIBRATION_ITEMS = 128
CALIBRATION_BATCH = 16
#: Distillation batches: passages per step, and tokens kept of each (its first ones).
DISTILL_BATCH_SIZE = 32
DISTILL_LENGTH = 32
DISTILL_LENGTH_HELP = ("tokens per passage while distilling (each passage's first ones: "
                       "batches pad to their longest passage, so short windows waste less)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gblr compress",
        description="Compress a local Hugging Face model to a fraction of its linear layers' "
        "cost, distil it towards the original on text, and report how close it stays.",
    )
    p.add_argument("--model", help="local HF model directory (default: embedded all-MiniLM-L6-v2)")
    p.add_argument("--structure", default="gblr", help="structure name (default: gblr)")
    p.add_argument("--budget", type=float, default=0.5,
                   help="fraction of the targeted layers' dense cost, in (0, 1] (default 0.5)")
    p.add_argument("--targets", nargs="+", metavar="PATTERN",
                   help="layers to compress: names, suffixes or 're:<regex>' "
                   "(default: all-linear, without an unused pooler)")
    p.add_argument("--exclude", nargs="+", metavar="PATTERN", default=None,
                   help="layers to leave dense")
    p.add_argument("--config", help="a CompressionConfig JSON file (overrides the options above)")
    p.add_argument("--search-steps", type=int, default=0,
                   help="steps of GBLR's structure search at projection (default 0: its "
                   "(whitened) SVD start, which distillation then reshapes; e.g. 30 searches)")
    p.add_argument("--calibrate", action=argparse.BooleanOptionalAction, default=True,
                   help="data-aware projection from activations on the training text "
                   "(default on; --no-calibrate projects the weights alone)")
    p.add_argument("--calibration-mode", default="inputs", choices=("inputs", "sequential"),
                   help="'inputs' (default): the original model's activations, in one pass; "
                   "'sequential': layer by layer, each fitted to the original model's outputs "
                   "from the inputs it sees in the partly compressed model (closer right after "
                   "projection, slower)")
    p.add_argument("--allocation", default="sensitivity",
                   choices=("uniform", "global", "sensitivity"),
                   help="how the budget is split among layers: 'sensitivity' (default: least "
                   "summed change of the model's output, measured layer by layer on the "
                   "training text; about 2 min for MiniLM), 'uniform' (every layer at --budget) "
                   "or 'global' (least summed weight error)")
    p.add_argument("--steps", type=int, help="distillation steps (default: bounded by --minutes)")
    p.add_argument("--minutes", type=float, help="distillation time limit (default 2, or none "
                   "when --steps is given); 0 skips distillation")
    p.add_argument("--text", help="UTF-8 text file to distil and evaluate on "
                   "(default: a Shakespeare sample shipped with gblr)")
    p.add_argument("--images", help="folder of image files, for image models (ViT)")
    p.add_argument("--out", help="output directory (default: a new ./gblr-compressed-* directory)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    p.add_argument("--batch-size", type=int, default=DISTILL_BATCH_SIZE,
                   help="passages (or images) per distillation step")
    p.add_argument("--max-length", type=int, default=128,
                   help="tokens per passage for calibration and evaluation")
    p.add_argument("--distill-length", type=int, default=DISTILL_LENGTH,
                   help=DISTILL_LENGTH_HELP)
    p.add_argument("--loss", default="both", choices=("hidden", "embedding", "both"))
    p.add_argument("--lr", type=float, default=3e-4,
                   help="peak learning rate of the distillation (warm-up, then cosine decay)")
    p.add_argument("--structure-lr", type=float, default=1e-3,
                   help="learning rate of GBLR widths and locations during distillation "
                   "(0 keeps the structure fixed); the budget is held by gblr.BudgetController")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="arithmetic of the distillation's forward passes (default auto: "
                   "bfloat16 autocast where the CPU or GPU has native bfloat16, else float32)")
    p.add_argument("--eval-passages", type=int, default=400,
                   help="held-out passages for cosine and neighbour agreement")
    p.add_argument("--eval-every", type=int, default=None, metavar="N",
                   help="also measure the held-out quality every N distillation steps (not "
                   "counted in --minutes): printed, kept in summary.json, drawn in curve.png")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto",
                   help="torch device: auto (cuda when present, else cpu), cpu, cuda, cuda:1...")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-plot", action="store_true", help="skip the mask picture")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def resolve_device(name: str) -> torch.device:
    """``"auto"`` is CUDA when available, else CPU; anything else must be a valid device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a torch device") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name!r}: CUDA is not available")
    return device


def max_positions(model: torch.nn.Module) -> int:
    """The longest input the model's position embeddings allow (a large number if unknown)."""
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 1 << 30


def unique_dir(stem: str) -> Path:
    """``stem``, or ``stem-2``, ``stem-3``... : the first that does not exist yet."""
    path, i = Path(stem), 2
    while path.exists():
        path, i = Path(f"{stem}-{i}"), i + 1
    return path


def _config(args: argparse.Namespace, model: torch.nn.Module):
    from gblr.convert.config import CompressionConfig
    from gblr.convert.hf import default_targets

    if args.config:
        return CompressionConfig.from_json(Path(args.config))
    targets, exclude = default_targets(model)
    if args.targets:
        targets, exclude = list(args.targets), []
    if args.exclude is not None:
        exclude = list(args.exclude)
    return CompressionConfig(structure=args.structure, budget=args.budget,
                             target_modules=targets, exclude_modules=exclude,
                             calibration=bool(args.calibrate),
                             calibration_mode=args.calibration_mode,
                             allocation=args.allocation,
                             steps=args.search_steps if args.structure == "gblr" else None)


def _layer_costs(model: torch.nn.Module) -> dict[str, int]:
    from gblr.layers.base import StructuredLinear

    return {n: int(m.flops()) for n, m in model.named_modules() if isinstance(m, StructuredLinear)}


def summary_table(summary: dict[str, Any]) -> str:
    """The text the command prints: cost, per-layer split, quality before/after distillation."""
    lines = []
    c = summary["cost"]
    lines.append(f"model: {summary['model']}   structure: {summary['structure']}   "
                 f"budget: {summary['budget']:.3f}   "
                 f"allocation: {summary.get('allocation', 'uniform')}")
    lines.append(f"targeted layers: {c['layers']}   dense cost {c['dense']:,} MACs/token   "
                 f"after projection {c['projected']:,} ({c['projected'] / c['dense']:.3f})   "
                 f"after distillation {c['distilled']:,} ({c['distilled'] / c['dense']:.3f})")
    lines.append(f"whole model linear cost: {c['model_dense']:,} -> {c['model_after']:,} "
                 f"MACs/token ({c['model_after'] / c['model_dense']:.3f})")
    lines.append("")
    rows = summary["layers"]
    width = max(len("layer"), *(len(r["name"]) for r in rows))
    head = f"{'layer':<{width}}  {'shape':>10}  {'dense':>9}  {'projected':>9}  {'distilled':>9}"
    lines += [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['name']:<{width}}  {r['shape']:>10}  {r['dense']:>9,}  "
                     f"{r['projected'] / r['dense']:>9.3f}  {r['distilled'] / r['dense']:>9.3f}")
    lines.append("")
    q = summary["quality"]
    lines.append(f"held-out items: {summary['eval_passages']}   "
                 f"distillation: {summary['distill']['steps']} steps in "
                 f"{summary['distill']['seconds']:.0f} s"
                 + (f" ({summary['distill']['precision']})" if "precision" in summary["distill"]
                    else ""))
    lines.append(f"{'':<22}{'mean cosine':>12}  {'top-10 agreement':>16}")
    for stage in ("projected", "distilled"):
        if stage in q:
            label = "after projection" if stage == "projected" else "after distillation"
            lines.append(f"{label:<22}{q[stage]['cosine']:>12.4f}  "
                         f"{q[stage]['neighbours']:>16.4f}")
    if summary.get("curve"):
        lines.append("during distillation (training time):")
    for point in summary.get("curve", []):
        label = f"step {point['step']:.0f} ({point['seconds']:.0f} s)"
        lines.append(f"  {label:<20}{point['cosine']:>12.4f}  {point['neighbours']:>16.4f}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Do the whole job; return the summary written to ``summary.json``."""
    from tqdm.auto import tqdm

    from gblr.convert.distill import distill
    from gblr.convert.evaluate import compare_embeddings, pooled_embeddings, sentence_embeddings
    from gblr.convert.hf import DEFAULT_MODEL_NAME, default_model_path, load_hf_model
    from gblr.convert.images import image_batches, read_images
    from gblr.convert.io import save_compressed
    from gblr.convert.replace import compress
    from gblr.convert.select import layer_kind, layer_settings, select_layers
    from gblr.convert.text import encode, read_passages, split_passages, token_batches
    from gblr.data.corpus import default_corpus_path

    progress = not args.quiet
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.minutes is not None and args.minutes < 0:
        raise ValueError(f"--minutes must be >= 0, got {args.minutes}")
    if args.steps is not None and args.steps < 0:
        raise ValueError(f"--steps must be >= 0, got {args.steps}")
    for flag in ("batch_size", "max_length", "distill_length", "eval_passages", "eval_every"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, "
                             f"got {getattr(args, flag)}")
    minutes = args.minutes if args.minutes is not None else (None if args.steps else 2.0)
    text_path = Path(args.text) if args.text else default_corpus_path()
    if not args.images:
        train, held = split_passages(read_passages(text_path), held_out=0.1, seed=args.seed)
        held = held[: args.eval_passages]
    model_dir = Path(args.model) if args.model else default_model_path()
    model_name = model_dir.name if args.model else DEFAULT_MODEL_NAME
    if args.out:
        out = Path(args.out)
        if out.exists() and not args.overwrite:
            raise ValueError(f"--out {str(out)!r} already exists; pass --overwrite to replace it")
    else:
        out = unique_dir(f"gblr-compressed-{model_name}-{args.structure}-{args.budget:g}")

    phases = tqdm(total=5, desc="gblr compress", unit="phase", disable=not progress)
    phases.set_postfix_str("load")
    model, tokenizer = load_hf_model(model_dir)
    device = resolve_device(args.device)
    model.to(device)
    config = _config(args, model)
    # fail fast on patterns and overrides, before any heavy work
    layer_settings(model, config,
                   select_layers(model, config.target_modules, config.exclude_modules))
    max_length = min(args.max_length, max_positions(model))
    if tokenizer is None:  # an image model: distil and evaluate on --images
        if not args.images:
            raise ValueError(f"{model_dir.name} is an image model: give --images DIR "
                             "(a folder of image files) to distil and evaluate on")
        images = read_images(args.images, int(model.config.image_size),
                             int(getattr(model.config, "num_channels", 3)))
        gen = torch.Generator().manual_seed(args.seed)
        images = images[torch.randperm(images.shape[0], generator=gen)]
        if images.shape[0] < 4:
            raise ValueError(f"--images {args.images!r}: need at least 4 images, "
                             f"found {images.shape[0]}")
        n_held = max(2, min(args.eval_passages, images.shape[0] // 10))
        held_images, train_images = images[:n_held], images[n_held:]

        def embed(m: torch.nn.Module) -> torch.Tensor:
            return pooled_embeddings(m, ({"pixel_values": held_images[i:i + 32]}
                                         for i in range(0, n_held, 32)))

        def train_batches():
            return image_batches(train_images, batch_size=args.batch_size, seed=args.seed)

        def calibration_batches():
            return [{"pixel_values": train_images[i:i + CALIBRATION_BATCH]}
                    for i in range(0, min(len(train_images), CALIBRATION_ITEMS),
                                   CALIBRATION_BATCH)]
        eval_items, data_name = n_held, str(args.images)
    else:
        if args.images:
            raise ValueError("--images is for image models; this model takes text")

        def embed(m: torch.nn.Module) -> torch.Tensor:
            return sentence_embeddings(m, tokenizer, held, max_length=max_length)

        def train_batches():
            return token_batches(tokenizer, train, batch_size=args.batch_size,
                                 max_length=min(args.distill_length, max_length),
                                 seed=args.seed)

        def calibration_batches():
            return [encode(tokenizer, train[i:i + CALIBRATION_BATCH], max_length)
                    for i in range(0, min(len(train), CALIBRATION_ITEMS), CALIBRATION_BATCH)]
        eval_items, data_name = len(held), str(text_path)
    teacher = copy.deepcopy(model)
    dense_model = sum(
        m.weight.numel() for m in model.modules() if layer_kind(m) in ("linear", "conv1d")
    )
    phases.update(1)
    phases.set_postfix_str("reference embeddings")
    ref = embed(teacher)
    phases.update(1)
    phases.set_postfix_str("project")
    calibration = (calibration_batches()
                   if config.calibration or config.allocation == "sensitivity" else None)
    model, report = compress(model, config, calibration_data=calibration, progress=progress)
    projected_costs = _layer_costs(model)
    quality = {"projected": compare_embeddings(ref, embed(model))}
    phases.update(1)
    phases.set_postfix_str("distil")
    steps_done, seconds, curve = 0, 0.0, []
    if (minutes is None or minutes > 0) and (args.steps is None or args.steps > 0):
        result = distill(model, teacher, train_batches(), steps=args.steps or None, minutes=minutes,
                         budget=config.budget, loss=args.loss, lr=args.lr,
                         structure_lr=args.structure_lr, precision=args.precision,
                         evaluate=(lambda m: compare_embeddings(ref, embed(m)))
                         if args.eval_every else None,
                         eval_every=args.eval_every, progress=progress)
        steps_done, seconds, curve = result.steps, result.seconds, result.curve
        quality["distilled"] = (
            {k: curve[-1][k] for k in ("cosine", "neighbours")} if curve
            else compare_embeddings(ref, embed(model)))
    model.eval()
    distilled_costs = _layer_costs(model)
    phases.update(1)
    phases.set_postfix_str("save")
    save_compressed(model, out, overwrite=args.overwrite)
    if tokenizer is not None:
        tokenizer.save_pretrained(out / "tokenizer")
    rows = [
        {"name": r.name, "shape": f"{r.out_features}x{r.in_features}", "dense": r.dense_cost,
         "projected": projected_costs[r.name], "distilled": distilled_costs[r.name]}
        for r in report.layers
    ]
    dense = sum(r["dense"] for r in rows)
    after_model = dense_model - dense + sum(distilled_costs.values())
    summary = {
        "model": str(model_dir), "structure": config.structure, "budget": config.budget,
        "allocation": config.allocation,
        "data": data_name, "eval_passages": eval_items,
        "cost": {"layers": len(rows), "dense": dense,
                 "projected": sum(projected_costs.values()),
                 "distilled": sum(distilled_costs.values()),
                 "model_dense": dense_model, "model_after": after_model},
        "layers": rows, "quality": quality,
        "distill": {"steps": steps_done, "seconds": seconds,
                    "precision": precision_name(args.precision, device)},
        "curve": curve,
        "out": str(out),
    }
    if not args.no_plot:
        from gblr.convert.plot import plot_curves, plot_masks

        plot_masks(model, out / "masks.png",
                   title=f"{model_name}: {config.structure} at {config.budget:g} of dense cost")
        if curve:
            plot_curves({config.structure: curve}, out / "curve.png",
                        title=f"{model_name}: held-out quality while distilling")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    phases.update(1)
    phases.close()
    return summary


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    try:
        summary = run(args)
    except (ValueError, TypeError, FileExistsError) as err:
        print(f"gblr compress: error: {err}", file=sys.stderr)
        return 2
    print(summary_table(summary))
    print(f"\nsaved to {summary['out']}/ (compression.json, model.safetensors, summary.json"
          f"{'' if args.no_plot else ', masks.png'}"
          f"{', curve.png' if summary['curve'] and not args.no_plot else ''}) "
          f"in {time.perf_counter() - start:.0f} s")
    print(f"reload: gblr.load_compressed(AutoModel.from_pretrained({summary['model']!r}), "
          f"{summary['out']!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
