"""``gblr train experiment=NAME key=value ...``: Hydra-configured Lightning runs.

The configs are packaged in ``gblr/conf``; ``compose`` builds one in Hydra's struct mode, so a
misspelt key is an error. :func:`run` trains one configuration and returns its summary;
``compare=[gblr,dense]`` runs it once per structure and prints the comparison.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from gblr.core.files import write_text_atomic
from gblr.models.factory import LINEAR_KINDS
from gblr.train.build import build_data, build_model, format_layers, layer_table
from gblr.train.config import choose_experiment, compose, list_experiments, validate
from gblr.train.errors import UsageError, one_line
from gblr.train.quiet import quiet_lightning
from gblr.train.weights import load_weights

__all__ = ["compose", "validate", "build_data", "build_model", "load_weights", "run", "run_all",
           "layer_table", "UsageError", "TrainingInterrupted"]

#: exit status of ``gblr train`` after SIGTERM (128 + 15, as a shell reports a killed process)
EXIT_SIGTERM = 143


class TrainingInterrupted(RuntimeError):
    """Training stopped by SIGTERM; a checkpoint to resume from was saved at ``checkpoint``."""

    def __init__(self, message: str, checkpoint: Path | None, step: int) -> None:
        super().__init__(message)
        self.checkpoint = checkpoint
        self.step = step


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _set_threads(threads) -> int:
    """Set torch's intra-op threads (``threads``; 0 or None: one per available core)."""
    n = int(threads) if threads else _cores()
    torch.set_num_threads(max(1, n))
    return torch.get_num_threads()


def _sigterm_exception() -> type[BaseException]:
    try:
        from lightning.pytorch.utilities.exceptions import SIGTERMException
    except ImportError:  # older Lightning raises SystemExit itself
        return SystemExit
    return SIGTERMException


def run(cfg, callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    """Train and test one configuration; write ``summary.json``/``summary.md`` to ``out_dir``.

    ``callbacks`` are extra Lightning callbacks. On SIGTERM the run saves
    ``out_dir/checkpoints/interrupted.ckpt`` and raises :class:`TrainingInterrupted`.
    """
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger
    from omegaconf import OmegaConf

    from gblr.train.callback import ResumableSampling, StepProgress, StructureCallback
    from gblr.train.groups import gblr_layers
    from gblr.train.module import StructuredTask

    validate(cfg)
    threads = _set_threads(cfg.threads)
    out = Path(str(cfg.out_dir))
    steps_text = (f"{int(cfg.trainer.max_steps)} steps" if int(cfg.trainer.max_steps) > 0
                  else f"{int(cfg.trainer.max_epochs)} epochs")
    print(f"gblr train: {cfg.name} ({cfg.model.linear}, budget {cfg.budget}, seed {cfg.seed}), "
          f"{steps_text}, {threads} CPU thread{'s' if threads != 1 else ''} of {_cores()} cores "
          f"(threads=N to change), output in {out}", flush=True)
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    train_dl, val_dl, test_dl, info = build_data(cfg)
    model = build_model(cfg, info)
    o = cfg.optim
    task = StructuredTask(model, info["task"], lr=float(o.lr), weight_decay=float(o.weight_decay),
                          structure_lr=float(o.structure_lr),
                          structure_betas=tuple(o.structure_betas),
                          warmup_steps=int(o.warmup_steps), min_lr_ratio=float(o.min_lr_ratio),
                          label_smoothing=float(o.label_smoothing))
    out.mkdir(parents=True, exist_ok=True)
    all_callbacks: list[L.Callback] = [
        ModelCheckpoint(
            dirpath=out / "checkpoints", save_last=True, save_top_k=-1,
            every_n_train_steps=int(cfg.checkpoint.every_n_train_steps),
            filename="step{step:07d}", auto_insert_metric_name=False,
        ),
        ResumableSampling(train_dl.sampler, int(cfg.data.batch_size)),
    ]
    structure = None
    if any(True for _ in gblr_layers(model)):
        s = cfg.structure
        structure = StructureCallback(
            float(cfg.budget),
            controller={"reach": s.reach, "floor": s.floor, "tolerance": s.tolerance,
                        "gain": s.gain, "measure_every": s.measure_every,
                        "weighting": s.weighting, "cost": str(s.cost),
                        **({"tokens": int(s.tokens)} if str(s.cost) == "time" else {})},
            sigma_start=s.sigma_start, sigma_end=s.sigma_end, sigma_anneal=s.sigma_anneal,
            sigma_by=s.sigma_by, enforce=bool(s.enforce),
            figure_dir=str(out / "figures") if cfg.logging.figures else None,
        )
        all_callbacks.append(structure)
    trainer_opts = OmegaConf.to_container(cfg.trainer, resolve=True)
    progress = str(cfg.logging.progress)
    if progress == "none":
        trainer_opts["enable_progress_bar"] = False
    elif trainer_opts.get("enable_progress_bar", True):
        all_callbacks.append(StepProgress(progress, every_s=float(cfg.logging.progress_every_s),
                                          every_steps=int(cfg.logging.progress_every_steps)))
    all_callbacks.extend(callbacks)
    loggers: list = [CSVLogger(save_dir=str(out), name="logs", version="")]
    if cfg.logging.tensorboard:
        try:
            import tensorboard  # noqa: F401
            from lightning.pytorch.loggers import TensorBoardLogger

            loggers.append(TensorBoardLogger(save_dir=str(out), name="tb", version=""))
        except ImportError:
            pass
    fit_kwargs: dict[str, Any] = {}
    if cfg.resume is not None:
        fit_kwargs["ckpt_path"] = str(Path(os.path.expanduser(str(cfg.resume))))
        # validate() read it with weights_only=True already; make Lightning do the same
        trainer_fit = L.Trainer.fit
        if "weights_only" in inspect.signature(trainer_fit).parameters:
            fit_kwargs["weights_only"] = True
    sigterm = _sigterm_exception()
    one_process = str(cfg.trainer.devices) == "1" and int(cfg.trainer.num_nodes) == 1
    with quiet_lightning(one_process):
        trainer = L.Trainer(default_root_dir=str(out), callbacks=all_callbacks, logger=loggers,
                            **trainer_opts)
        write_text_atomic(out / "config.yaml", OmegaConf.to_yaml(cfg))
        start = time.time()
        try:
            trainer.fit(task, train_dl, val_dl, **fit_kwargs)
        except sigterm as err:
            if sigterm is SystemExit and not trainer.received_sigterm:
                raise
            path = out / "checkpoints" / "interrupted.ckpt"
            path.parent.mkdir(parents=True, exist_ok=True)
            trainer.save_checkpoint(str(path), weights_only=False)
            step = int(trainer.global_step)
            raise TrainingInterrupted(
                f"stopped by SIGTERM at step {step} of {cfg.trainer.max_steps}; checkpoint saved "
                f"to {path}; to continue, run the same command with resume={path}",
                path, step) from err
        fit_seconds = time.time() - start
        if structure is None:
            for _, layer in gblr_layers(model):
                layer.sigma = None
        trainer.save_checkpoint(str(out / "final.ckpt"), weights_only=False)
        try:
            tested = trainer.test(task, test_dl, verbose=False)
        except sigterm as err:
            if sigterm is SystemExit and not trainer.received_sigterm:
                raise
            step = int(trainer.global_step)
            raise TrainingInterrupted(
                f"stopped by SIGTERM while testing, after training {step} steps; the trained "
                f"model is in {out / 'final.ckpt'}", out / "final.ckpt", step) from err
    metrics = {k: float(v) for k, v in (tested[0] if tested else {}).items()}
    rows = layer_table(model)
    dense_total = sum(r["dense"] for r in rows)
    cost = sum(r["cost"] for r in rows) / dense_total if rows else 1.0
    summary: dict[str, Any] = {
        "name": str(cfg.name), "linear": str(cfg.model.linear), "budget": float(cfg.budget),
        "seed": int(cfg.seed), "steps": int(trainer.global_step), "fit_seconds": fit_seconds,
        "cost_fraction": cost, "task": info["task"], "layers": rows,
        "params": sum(p.numel() for p in model.parameters()), "threads": threads,
    }
    controller = structure.controller if structure is not None else None
    if controller is not None and controller.cost == "time":
        summary["time_tokens"] = controller.tokens
        summary["predicted_time_fraction"] = controller.predicted_time()
    if "test/loss" in metrics:
        summary["test_loss"] = metrics["test/loss"]
        if info["task"] == "lm":
            summary["test_ppl"] = math.exp(min(50.0, metrics["test/loss"]))
    if "test/acc" in metrics:
        summary["test_acc"] = metrics["test/acc"]
    if trainer.is_global_zero:
        write_text_atomic(out / "summary.json", json.dumps(summary, indent=2))
        write_text_atomic(out / "summary.md", _format_summary(summary))
        print(_format_summary(summary))
    return summary


def _headline(s: dict[str, Any]) -> str:
    if s["task"] == "classify" and "test_acc" in s:
        return f"test accuracy {100 * s['test_acc']:.2f}%"
    if "test_loss" in s:
        return f"test loss {s['test_loss']:.4f} (perplexity {s.get('test_ppl', float('nan')):.3f})"
    return "no test metrics"


def _format_summary(s: dict[str, Any]) -> str:
    head = (f"## {s['name']} ({s['linear']}, budget {s['budget']}, seed {s['seed']})\n\n"
            f"{_headline(s)}; cost of the replaced layers {100 * s['cost_fraction']:.2f}% of "
            f"dense; {s['steps']} steps in {s['fit_seconds']:.0f} s; {s['params']} parameters\n")
    if "predicted_time_fraction" in s:
        head += (f"\nPredicted deployed time of the replaced layers at {s['time_tokens']} tokens "
                 f"per call: {100 * s['predicted_time_fraction']:.2f}% of dense (time budget "
                 f"{s['budget']}).\n")
    if s["layers"]:
        head += "\n" + format_layers(s["layers"]) + "\n"
    return head


def _format_compare(summaries: list[dict[str, Any]]) -> str:
    lines = ["| structure | budget | cost (% of dense) | test loss | test acc / ppl | time (s) |",
             "|---|---:|---:|---:|---:|---:|"]
    for s in summaries:
        metric = (f"{100 * s['test_acc']:.2f}%" if "test_acc" in s
                  else f"{s.get('test_ppl', float('nan')):.3f}")
        budget = "—" if s["linear"] == "dense" else s["budget"]
        lines.append(f"| {s['linear']} | {budget} | {100 * s['cost_fraction']:.2f} | "
                     f"{s.get('test_loss', float('nan')):.4f} | {metric} | "
                     f"{s['fit_seconds']:.0f} |")
    return "\n".join(lines)


def run_all(cfg) -> list[dict[str, Any]]:
    """:func:`run`, once per structure in ``cfg.compare`` (or once), then the comparison."""
    from omegaconf import OmegaConf

    kinds = list(cfg.compare) or [str(cfg.model.linear)]
    for kind in kinds:
        if kind not in LINEAR_KINDS:
            raise ValueError(f"compare entries must be in {LINEAR_KINDS}, got {kind!r}")
    raw_out = str(OmegaConf.to_container(cfg, resolve=False)["out_dir"])
    per_kind = "${model.linear}" in raw_out  # else each structure gets a sub-folder
    summaries = []
    for kind in kinds:
        sub = cfg.copy()
        OmegaConf.set_struct(sub, True)
        sub.model.linear = kind
        if len(kinds) > 1 and not per_kind:
            sub.out_dir = str(Path(str(cfg.out_dir)) / kind)
        summaries.append(run(sub))
    if len(kinds) > 1:
        table = _format_compare(summaries)
        print(f"\n## {cfg.name}: comparison at equal budget\n\n{table}\n")
        root = Path(str(sub.out_dir)).parent
        root = root.parent if per_kind else root
        root.mkdir(parents=True, exist_ok=True)
        write_text_atomic(root / "compare.md", f"# {cfg.name}\n\n{table}\n")
    return summaries


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``gblr train``: 0 when done, 2 for a bad command line (one line on stderr,
    before any work), 143 after SIGTERM (a checkpoint is saved), 1 for other failures."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(
            "usage: gblr train experiment=NAME [key=value ...]\n\n"
            "experiments: " + ", ".join(list_experiments()) + "\n"
            "examples:\n"
            "  gblr train experiment=mnist1d/compare\n"
            "  gblr train experiment=shakespeare/gpt-gblr budget=0.4 trainer.max_steps=500\n"
            "  gblr train experiment=mnist1d/mixer-gblr resume=runs/.../checkpoints/last.ckpt\n"
            "  gblr train experiment=cifar10/vit-s-gblr trainer.devices=8 trainer.strategy=ddp\n"
            "  gblr train experiment=mnist1d/compare threads=2   # CPU threads (default 1)"
        )
        return 0
    from omegaconf import OmegaConf
    from omegaconf.errors import MissingMandatoryValue

    try:
        cfg = compose(argv)
    except Exception as err:  # Hydra's composition errors name the bad key or option
        print(f"gblr train: {type(err).__name__}: {one_line(err)}", file=sys.stderr)
        return 2
    if OmegaConf.is_missing(cfg.data, "name") or OmegaConf.is_missing(cfg.model, "arch"):
        print(choose_experiment(), file=sys.stderr)
        return 2
    try:
        validate(cfg, argv)
    except UsageError as err:
        print(f"gblr train: {one_line(err)}", file=sys.stderr)
        return 2
    try:
        run_all(cfg)
    except TrainingInterrupted as err:
        print(f"gblr train: {err}", file=sys.stderr)
        return EXIT_SIGTERM
    except UsageError as err:
        print(f"gblr train: {one_line(err)}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, MissingMandatoryValue, ImportError) as err:
        print(f"gblr train: {type(err).__name__}: {one_line(err)}", file=sys.stderr)
        return 2
    return 0

