"""``gblr compress``: compress a local Hugging Face model, distil it, report, save, draw masks.

With no arguments it runs offline on the embedded all-MiniLM-L6-v2 at half the cost of
its encoder's linear layers, distilled for a fixed number of steps on a Shakespeare sample
shipped with gblr, and writes the result under the user's data directory
(``$XDG_DATA_HOME/gblr/compressed``, by default ``~/.local/share/gblr/compressed``).

Every option's default has one source: the config options' are ``CompressionConfig``'s
field defaults (or a ``--preset``'s), the others are defined once in
:mod:`gblr.convert.options`, which the compression benchmark shares.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import textwrap
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from gblr.convert.distill import precision_name
from gblr.convert.io import written_by_gblr
from gblr.convert.options import (
    CONFIG_OPTIONS,
    RUN_OPTIONS,
    Option,
    add_options,
    add_preset_option,
    check_args,
    config_changes,
    distill_limits,
    parse_with_preset,
    preset_epilog,
    time_bound_warning,
)
from gblr.convert.speedup import measured_speedup, token_settings
from gblr.core.progress import progress as show_progress

__all__ = [
    "main",
    "build_parser",
    "parse_args",
    "check_out",
    "default_out_dir",
    "unique_dir",
    "resolve_device",
    "summary_table",
    "run",
]

#: Options only ``gblr compress`` has.
COMMAND_OPTIONS: tuple[Option, ...] = (
    Option("--model", "local HF model directory", default_text="embedded all-MiniLM-L6-v2"),
    Option("--config", "a CompressionConfig JSON file (replaces the config options and "
           "--preset)"),
    Option("--text", "UTF-8 text file to distil and evaluate on",
           default_text="a Shakespeare sample shipped with gblr"),
    Option("--images", "folder of image files, for image models (ViT)"),
    Option("--out", "output directory (must not exist, unless --overwrite)",
           default_text="a new <model>-<structure>-<budget>-<time> directory in "
           "$XDG_DATA_HOME/gblr/compressed, by default ~/.local/share/gblr/compressed"),
    Option("--overwrite", "replace an existing --out directory", action="store_true",
           default=False),
    Option("--trainable", "save every tensor whole, to resume training (default: the compact "
           "form, only what the evaluation-mode model uses)", action="store_true",
           default=False),
)


def build_parser(preset: str | None = None) -> argparse.ArgumentParser:
    """The parser of ``gblr compress``; the config options default to ``preset``'s values."""
    p = argparse.ArgumentParser(
        prog="gblr compress",
        description=textwrap.fill(
            "Compress a local Hugging Face model to a fraction of its linear layers' cost, "
            "distil it towards the original on text, and report how close it stays.", 88),
        epilog=preset_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_options(p, COMMAND_OPTIONS[:2])
    add_preset_option(p)
    add_options(p.add_argument_group("compression (CompressionConfig fields)"),
                CONFIG_OPTIONS, preset=preset)
    add_options(p.add_argument_group("layers, distillation, data and run"), RUN_OPTIONS)
    add_options(p.add_argument_group("input and output"), COMMAND_OPTIONS[2:])
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """``argv`` parsed, the config options' defaults taken from its ``--preset``."""
    return parse_with_preset(build_parser, argv)


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


def unique_dir(stem: str | Path) -> Path:
    """``stem``, or ``stem-2``, ``stem-3``... : the first that does not exist yet."""
    path, i = Path(stem), 2
    while path.exists():
        path, i = Path(f"{stem}-{i}"), i + 1
    return path


def data_home() -> Path:
    """Where gblr keeps what it makes for the user: ``$XDG_DATA_HOME/gblr`` (an absolute
    path), else ``~/.local/share/gblr``."""
    base = os.environ.get("XDG_DATA_HOME", "")
    root = Path(base) if base and Path(base).is_absolute() else Path.home() / ".local" / "share"
    return root / "gblr"


def default_out_dir(name: str) -> Path:
    """A new ``<data home>/compressed/<name>-<date>-<time>`` directory path."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return unique_dir(data_home() / "compressed" / f"{name}-{stamp}")


def check_out(out: Path, overwrite: bool, flag: str = "--out") -> str | None:
    """What is wrong with writing the result to ``out`` (None: nothing)."""
    if out.exists() and not out.is_dir():
        return f"{flag} {str(out)!r} is a file, not a directory"
    if out.is_dir() and not overwrite:
        return f"{flag} {str(out)!r} already exists; pass --overwrite to replace it"
    if out.is_dir() and not written_by_gblr(out):
        return (f"{flag} {str(out)!r} was not written by gblr (no gblr manifest); "
                "--overwrite replaces only gblr's own output: choose another directory")
    # the result is written next to ``out`` and moved into place: its parent must take it
    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        return f"{flag} {str(out)!r} cannot be created: {str(parent)!r} is a file"
    try:  # a real try (permission bits say little for root or on special file systems)
        os.rmdir(tempfile.mkdtemp(prefix=".gblr-write-check-", dir=parent))
    except OSError as err:
        return (f"{flag} {str(out)!r} cannot be written: {str(parent)!r} refuses new "
                f"directories ({err.strerror or err})")
    return None


def check(args: argparse.Namespace) -> str | None:
    """The first problem with the options in ``args`` (None: none), found before any work.

    Also settles ``args.out``: the default output directory when it was not given.
    """
    problem = check_args(args, [*CONFIG_OPTIONS, *RUN_OPTIONS])
    if problem:
        return problem
    if not args.config:  # the config options (the targets need the model: checked later)
        from gblr.convert.config import CompressionConfig

        preset = getattr(args, "preset", None)
        try:
            if preset:
                CompressionConfig.preset(preset, **config_changes(args))
            else:
                CompressionConfig(**config_changes(args))
        except (ValueError, TypeError) as err:
            return str(err)
    if args.out:
        return check_out(Path(args.out), args.overwrite)
    name = _model_name(args) + ("-config" if args.config
                                else f"-{args.structure}-{args.budget:g}")
    args.out = str(default_out_dir(name))
    problem = check_out(Path(args.out), args.overwrite, "the default output directory")
    return f"{problem}; pass --out DIR" if problem else None


def _model_name(args: argparse.Namespace) -> str:
    from gblr.convert.hf import DEFAULT_MODEL_NAME

    return Path(args.model).name if args.model else DEFAULT_MODEL_NAME


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
    changes = {**config_changes(args), "target_modules": targets, "exclude_modules": exclude}
    preset = getattr(args, "preset", None)
    return CompressionConfig.preset(preset, **changes) if preset else CompressionConfig(**changes)


def _layer_costs(model: torch.nn.Module) -> dict[str, int]:
    from gblr.layers.base import StructuredLinear

    return {n: int(m.macs()) for n, m in model.named_modules() if isinstance(m, StructuredLinear)}


def _parameter_count(model: torch.nn.Module) -> int:
    """Parameters of ``model``, shared ones once."""
    return sum(p.numel() for p in model.parameters())


def _original_file_mb(model_dir: Path) -> float | None:
    """Size in MB (10^6 bytes) of the original model's weights: its ``*.safetensors``
    files (``pytorch_model.bin`` when it has none), None when neither is there."""
    files = sorted(model_dir.glob("*.safetensors")) or sorted(model_dir.glob("pytorch_model*.bin"))
    return sum(f.stat().st_size for f in files) / 1e6 if files else None


def _size_summary(model: torch.nn.Module, model_dir: Path, out: Path,
                  original_parameters: int, embeddings: list[Any]) -> dict[str, Any]:
    """Parameters and file size of the original and of the saved compressed model
    (``embeddings``: the report's records of factorized token embeddings)."""
    from gblr.accounting import flops_report
    from gblr.convert.io import saved_size

    saved = saved_size(out)
    report = flops_report(model)
    linear_params = report.parameters
    embedding = {"dense": sum(r.dense_params for r in embeddings),
                 "saved": sum(r.params for r in embeddings)}
    other = _parameter_count(model) - linear_params - embedding["saved"]
    return {
        "original": {"parameters": original_parameters,
                     "file_mb": _original_file_mb(model_dir)},
        "compressed": {"parameters": saved["values"], "file_mb": saved["file_mb"],
                       "form": saved["form"], "parameters_in_memory": _parameter_count(model)},
        "linear": {"dense": report.dense_parameters, "saved": report.eval_parameters
                   if saved["form"] == "compact" else linear_params},
        "embedding": embedding,
        "other": other,
    }


def _speed_settings(model: torch.nn.Module, tokenizer: Any, max_length: int,
                    images: torch.Tensor | None) -> dict[str, dict[str, torch.Tensor]]:
    """The inputs the deployed model is timed on: one passage and a batch of 32 passages
    of up to 128 tokens, or a batch of up to 8 images."""
    if images is not None:
        return {f"{min(8, len(images))} images": {"pixel_values": images[:8]}}
    length = min(128, max_length)
    vocab = int(getattr(model.config, "vocab_size", None) or len(tokenizer))
    return token_settings(vocab, length, (1, 32))


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
    size = summary.get("size")
    if size:
        o, s = size["original"], size["compressed"]
        lines.append(
            f"parameters: {o['parameters']:,} -> {s['parameters']:,} saved "
            f"({s['parameters'] / o['parameters']:.3f}; {s['form']} form), "
            f"{s['parameters_in_memory']:,} once loaded")
        o_mb = "?" if o["file_mb"] is None else f"{o['file_mb']:.1f}"
        ratio = "" if o["file_mb"] is None else f" ({s['file_mb'] / o['file_mb']:.3f})"
        lines.append(f"model.safetensors: {o_mb} MB -> {s['file_mb']:.1f} MB{ratio}")
        parts = [f"linear layers {size['linear']['dense']:,} -> {size['linear']['saved']:,} "
                 f"({size['linear']['saved'] / size['linear']['dense']:.3f})"]
        emb = size.get("embedding") or {}
        if emb.get("dense"):
            parts.append(f"token embedding {emb['dense']:,} -> {emb['saved']:,} "
                         f"({emb['saved'] / emb['dense']:.3f})")
        parts.append(f"{size['other']:,} in other layers (norms, other embeddings), "
                     "not compressed")
        lines.append("parameters by part: " + "; ".join(parts))
    speed = summary.get("speed")
    if speed:
        shown = ", ".join(f"{r['speedup']:.2f}x at {r['setting']} ({r['dense_ms']:.1f} -> "
                          f"{r['deployed_ms']:.1f} ms)" for r in speed["rows"])
        lines.append(f"deployed (gblr.deploy) against dense, measured on {speed['threads']} CPU "
                     f"thread: {shown}")
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
    from gblr.convert.distill import distill
    from gblr.convert.evaluate import compare_embeddings, pooled_embeddings, sentence_embeddings
    from gblr.convert.hf import DEFAULT_MODEL_NAME, default_model_path, load_hf_model
    from gblr.convert.images import image_batches, read_images
    from gblr.convert.io import save_compressed
    from gblr.convert.replace import compress
    from gblr.convert.select import layer_kind, layer_settings, select_layers
    from gblr.convert.sentence import is_sentence_transformer, save_sentence_transformer
    from gblr.convert.text import encode, read_passages, split_passages, token_batches
    from gblr.data.corpus import default_corpus_path

    problem = check(args)
    if problem:
        raise ValueError(problem)
    progress = not args.quiet
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"gblr compress: {torch.get_num_threads()} CPU thread(s) of {os.cpu_count()} cores "
          "(--threads N to change)", flush=True)
    torch.manual_seed(args.seed)
    steps, minutes = distill_limits(args.steps, args.minutes)
    calibration_items = args.calibration_batches * args.calibration_batch_size
    text_path = Path(args.text) if args.text else default_corpus_path()
    if not args.images:
        train, held = split_passages(read_passages(text_path), held_out=0.1, seed=args.seed)
        held = held[: args.eval_passages]
    model_dir = Path(args.model) if args.model else default_model_path()
    model_name = model_dir.name if args.model else DEFAULT_MODEL_NAME
    out = Path(args.out)  # settled and checked by check()

    phases = show_progress(total=5, desc="gblr compress", unit="phase", disable=not progress)
    phases.set_postfix_str("load")
    model, tokenizer = load_hf_model(model_dir)
    device = resolve_device(args.device)
    model.to(device)
    config = _config(args, model)
    # fail fast on patterns and overrides, before any heavy work
    settings = layer_settings(
        model, config, select_layers(model, config.target_modules, config.exclude_modules))
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
            size = args.calibration_batch_size
            return [{"pixel_values": train_images[i:i + size]}
                    for i in range(0, min(len(train_images), calibration_items), size)]
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
            size = args.calibration_batch_size
            return [encode(tokenizer, train[i:i + size], max_length)
                    for i in range(0, min(len(train), calibration_items), size)]
        eval_items, data_name = len(held), str(text_path)
    teacher = copy.deepcopy(model)
    original_parameters = _parameter_count(model)
    dense_model = sum(
        m.weight.numel() for m in model.modules() if layer_kind(m) in ("linear", "conv1d")
    )
    phases.update(1)
    phases.set_postfix_str("reference embeddings")
    ref = embed(teacher)
    phases.update(1)
    phases.set_postfix_str("project")
    wants_data = (any(s["calibration"] for s in settings.values())
                  or config.allocation == "sensitivity")
    calibration = calibration_batches() if wants_data else None
    model, report = compress(model, config, calibration_data=calibration, progress=progress)
    projected_costs = _layer_costs(model)
    quality = {"projected": compare_embeddings(ref, embed(model))}
    phases.update(1)
    phases.set_postfix_str("distil")
    steps_done, seconds, curve = 0, 0.0, []
    warnings = []
    if (minutes is None or minutes > 0) and (steps is None or steps > 0):
        result = distill(model, teacher, train_batches(), steps=steps, minutes=minutes,
                         budget=config.budget, loss=args.loss, lr=args.lr,
                         structure_lr=args.structure_lr, precision=args.precision,
                         evaluate=(lambda m: compare_embeddings(ref, embed(m)))
                         if args.eval_every else None,
                         eval_every=args.eval_every, progress=progress)
        steps_done, seconds, curve = result.steps, result.seconds, result.curve
        warning = time_bound_warning(steps_done, steps, minutes)
        if warning:
            warnings.append(warning)
        quality["distilled"] = (
            {k: curve[-1][k] for k in ("cosine", "neighbours")} if curve
            else compare_embeddings(ref, embed(model)))
    model.eval()
    distilled_costs = _layer_costs(model)
    phases.update(1)
    phases.set_postfix_str("save")
    if is_sentence_transformer(model_dir):  # the ST files beside gblr's: SentenceTransformer(out)
        save_sentence_transformer(model, model_dir, out, overwrite=args.overwrite,
                                  trainable=args.trainable)  # its tokenizer among them
    else:
        save_compressed(model, out, overwrite=args.overwrite, trainable=args.trainable)
        if tokenizer is not None:
            tokenizer.save_pretrained(out / "tokenizer")
    speed = None
    if not args.no_speed and device.type == "cpu":
        phases.set_postfix_str("time")
        timed_on = _speed_settings(model, tokenizer, max_length,
                                   None if tokenizer is not None else held_images)
        speed = measured_speedup(teacher, model, timed_on)
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
                    "step_limit": steps, "minutes": minutes,
                    "precision": precision_name(args.precision, device)},
        "warnings": warnings,
        "curve": curve,
        "size": _size_summary(model, model_dir, out, original_parameters, report.embeddings),
        "speed": speed,
        "out": str(out),
        "sentence_transformers": is_sentence_transformer(out),
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
    args = parse_args(argv)
    given_out = bool(args.out)
    problem = check(args)  # bad options end here, before any work
    if problem:
        print(f"gblr compress: error: {problem}", file=sys.stderr)
        return 2
    if not given_out:
        print(f"gblr compress: writing to {args.out}", flush=True)
    start = time.perf_counter()
    try:
        summary = run(args)
    except (ValueError, TypeError, FileExistsError) as err:
        print(f"gblr compress: error: {err}", file=sys.stderr)
        return 2
    print(summary_table(summary))
    print(f"\nsaved to {summary['out']}/ (compression.json, manifest.json, model.safetensors, "
          f"{'hf_config.json, ' if (Path(summary['out']) / 'hf_config.json').is_file() else ''}"
          f"summary.json"
          f"{', the sentence-transformers files' if summary['sentence_transformers'] else ''}"
          f"{'' if args.no_plot else ', masks.png'}"
          f"{', curve.png' if summary['curve'] and not args.no_plot else ''}) "
          f"in {time.perf_counter() - start:.0f} s")
    print(f"reload: gblr.from_pretrained({summary['out']!r})"
          + (f" or SentenceTransformer({summary['out']!r}, trust_remote_code=True)"
             if summary.get("sentence_transformers") else ""))
    for warning in summary.get("warnings", []):
        print(f"gblr compress: warning: {warning}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
