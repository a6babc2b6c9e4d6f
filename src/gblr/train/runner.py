"""``gblr train experiment=NAME key=value ...``: Hydra-configured Lightning runs.

The configs are packaged in ``gblr/conf``; ``compose`` builds one in Hydra's struct mode, so a
misspelt key is an error. :func:`run` trains one configuration and returns its summary;
``compare=[gblr,dense]`` runs it once per structure and prints the comparison.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from gblr.cost import check_budget
from gblr.layers.base import StructuredLinear
from gblr.models.factory import LINEAR_KINDS

__all__ = ["compose", "build_data", "build_model", "run", "run_all", "layer_table"]

#: attribute names of the replaced linear layers, per architecture (SPEC §6)
REPLACED = {"mixer": ("fc1", "fc2"), "vit": ("q", "k", "v", "fc1", "fc2")}


def compose(overrides: list[str] | tuple[str, ...] = ()):
    """The run configuration for ``overrides`` (``experiment=...``, ``key=value``), struct mode."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="gblr.conf", version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=list(overrides))
    OmegaConf.set_struct(cfg, True)
    return cfg


def _opts(section, drop: tuple[str, ...]) -> dict[str, Any]:
    from omegaconf import OmegaConf

    return {k: v for k, v in OmegaConf.to_container(section, resolve=True).items()
            if k not in drop}


def build_data(cfg) -> tuple[DataLoader, DataLoader, DataLoader, dict]:
    """Train/val/test loaders and the data info (task, classes or vocabulary, input size)."""
    from gblr import data as D

    d = cfg.data
    root = Path(os.path.expanduser(str(d.root)))
    opts = _opts(d, ("name", "root", "batch_size", "eval_batch_size", "num_workers"))
    name = d.name
    if name == "mnist1d":
        train, val, test, info = D.mnist1d_splits(
            root, num_samples=opts.get("num_samples", 10000), seed=opts.get("generator_seed", 42)
        )
    elif name in ("shakespeare", "text"):
        path = opts.get("path")
        if path is None:
            if name == "text":
                raise ValueError("data.path must name a text file or a folder for data.name=text")
            path = D.shakespeare_dir()
        train, val, test, info = D.text_splits(
            Path(os.path.expanduser(str(path))), block_size=opts.get("block_size", 128),
            tokenizer=opts.get("tokenizer", "char"), max_chars=opts.get("max_chars"),
        )
    elif name in ("cifar10", "cifar100"):
        train, val, test, info = D.cifar_splits(root / name, name,
                                                download=opts.get("download", True),
                                                seed=int(cfg.seed))
    elif name == "imagenet":
        train, val, test, info = D.imagenet_splits(root, img_size=opts.get("img_size", 224))
    elif name == "wikitext103":
        train, val, test, info = D.wikitext103_splits(block_size=opts.get("block_size", 1024))
    else:
        raise ValueError(
            f"unknown data.name {name!r}; known: mnist1d, text, shakespeare, cifar10, cifar100, "
            "imagenet, wikitext103"
        )
    workers = int(d.num_workers)
    common = {"num_workers": workers, "persistent_workers": workers > 0}
    loaders = (
        DataLoader(train, batch_size=int(d.batch_size), drop_last=True,
                   sampler=D.EpochShuffleSampler(len(train), int(cfg.seed)), **common),
        DataLoader(val, batch_size=int(d.eval_batch_size), **common),
        DataLoader(test, batch_size=int(d.eval_batch_size), **common),
    )
    return (*loaders, info)


def _load_dense_state(model: nn.Module, path: str) -> None:
    p = Path(os.path.expanduser(path))
    if not p.is_file():
        raise FileNotFoundError(f"model.init_from={path!r} does not exist")
    state = torch.load(p, map_location="cpu", weights_only=False)
    if isinstance(state, dict) and "state_dict" in state:
        state = {k.removeprefix("model."): v for k, v in state["state_dict"].items()}
    model.load_state_dict(state)


def build_model(cfg, info: dict) -> nn.Module:
    """The model named by ``cfg.model`` for data described by ``info``."""
    from gblr.models import GPT, MlpMixer, ResNet18, VisionTransformer, project_linears

    m = cfg.model
    linear = str(m.linear)
    if linear not in LINEAR_KINDS:
        raise ValueError(f"model.linear must be one of {LINEAR_KINDS}, got {linear!r}")
    budget = check_budget(cfg.budget)
    gblr_opts = _opts(m.gblr, ())
    opts = _opts(m, ("arch", "linear", "gblr", "init_from"))
    finetune = m.init_from is not None
    # a fine-tune builds the dense model, loads it, then projects the replaced layers
    build_linear = "dense" if finetune else linear
    if m.arch in ("mixer", "vit"):
        if info["task"] != "classify":
            raise ValueError(f"model.arch={m.arch} needs a classification data set")
        cls = MlpMixer if m.arch == "mixer" else VisionTransformer
        model = cls(img_size=info["img_size"], in_chans=info["in_chans"],
                    num_classes=info["num_classes"], linear=build_linear, budget=budget,
                    gblr=gblr_opts, **opts)
        if finetune:
            _load_dense_state(model, str(m.init_from))
            project_linears(model, linear, budget, REPLACED[m.arch], gblr_opts)
    elif m.arch == "resnet18":
        if info["task"] != "classify" or len(info.get("img_size", ())) != 2:
            raise ValueError("model.arch=resnet18 needs an image classification data set")
        if finetune:
            raise ValueError("model.init_from is not supported for resnet18")
        model = ResNet18(num_classes=info["num_classes"], in_chans=info["in_chans"],
                         linear=linear, budget=budget, gblr=gblr_opts, **opts)
    elif m.arch == "gpt":
        if info["task"] != "lm":
            raise ValueError("model.arch=gpt needs a text data set")
        if finetune:
            raise ValueError("model.init_from is for mixer/vit; GPT fine-tunes use "
                             "model.pretrained=NAME")
        if not opts.get("pretrained"):
            opts["vocab_size"] = info["vocab_size"]
            opts["n_positions"] = max(int(info["block_size"]), 1)
        model = GPT(linear=linear, budget=budget, gblr=gblr_opts, **opts)
    else:
        raise ValueError(f"unknown model.arch {m.arch!r}; known: mixer, vit, gpt, resnet18")
    model.linear = linear
    return model


def layer_table(model: nn.Module) -> list[dict[str, Any]]:
    """One row per structured layer: name, structure, shape, cost, dense cost, fraction."""
    from gblr.layers.gblr import GBLRLinear
    from gblr.train.controller import sharp_flops

    rows = []
    for name, mod in model.named_modules():
        if isinstance(mod, StructuredLinear):
            cost = sharp_flops(mod) if isinstance(mod, GBLRLinear) else int(mod.flops())
            rows.append({"layer": name, "structure": mod.structure_name,
                         "in": mod.in_features, "out": mod.out_features, "cost": cost,
                         "dense": mod.dense_flops(), "fraction": cost / mod.dense_flops()})
    return rows


def _format_layers(rows: list[dict[str, Any]]) -> str:
    lines = ["| layer | structure | in x out | cost (MACs/token) | % of dense |",
             "|---|---|---|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['layer']} | {r['structure']} | {r['in']}x{r['out']} | "
                     f"{r['cost']} | {100 * r['fraction']:.1f} |")
    return "\n".join(lines)


def run(cfg) -> dict[str, Any]:
    """Train and test one configuration; write ``summary.json``/``summary.md`` to ``out_dir``."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger
    from omegaconf import OmegaConf

    from gblr.train.callback import StructureCallback
    from gblr.train.groups import gblr_layers
    from gblr.train.module import StructuredTask

    check_budget(cfg.budget)
    if cfg.resume is not None and not Path(str(cfg.resume)).is_file():
        raise FileNotFoundError(f"resume={cfg.resume!r}: no such checkpoint")
    if cfg.threads is not None:
        torch.set_num_threads(int(cfg.threads))
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    train_dl, val_dl, test_dl, info = build_data(cfg)
    model = build_model(cfg, info)
    o = cfg.optim
    task = StructuredTask(model, info["task"], lr=float(o.lr), weight_decay=float(o.weight_decay),
                          structure_lr=float(o.structure_lr),
                          structure_betas=tuple(o.structure_betas),
                          warmup_steps=int(o.warmup_steps), min_lr_ratio=float(o.min_lr_ratio),
                          label_smoothing=float(o.label_smoothing))
    out = Path(str(cfg.out_dir))
    out.mkdir(parents=True, exist_ok=True)
    callbacks: list[L.Callback] = [ModelCheckpoint(
        dirpath=out / "checkpoints", save_last=True, save_top_k=-1,
        every_n_train_steps=int(cfg.checkpoint.every_n_train_steps),
        filename="step{step:07d}", auto_insert_metric_name=False,
    )]
    structure = None
    if any(True for _ in gblr_layers(model)):
        s = cfg.structure
        structure = StructureCallback(
            float(cfg.budget),
            controller={"reach": s.reach, "floor": s.floor, "tolerance": s.tolerance,
                        "gain": s.gain, "measure_every": s.measure_every,
                        "weighting": s.weighting},
            sigma_start=s.sigma_start, sigma_end=s.sigma_end, sigma_anneal=s.sigma_anneal,
            sigma_by=s.sigma_by, enforce=bool(s.enforce),
            figure_dir=str(out / "figures") if cfg.logging.figures else None,
        )
        callbacks.append(structure)
    loggers: list = [CSVLogger(save_dir=str(out), name="logs", version="")]
    if cfg.logging.tensorboard:
        try:
            import tensorboard  # noqa: F401
            from lightning.pytorch.loggers import TensorBoardLogger

            loggers.append(TensorBoardLogger(save_dir=str(out), name="tb", version=""))
        except ImportError:
            pass
    trainer_opts = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer = L.Trainer(default_root_dir=str(out), callbacks=callbacks, logger=loggers,
                        **trainer_opts)
    OmegaConf.save(cfg, out / "config.yaml")
    start = time.time()
    trainer.fit(task, train_dl, val_dl,
                ckpt_path=None if cfg.resume is None else str(cfg.resume))
    fit_seconds = time.time() - start
    if structure is None:
        for _, layer in gblr_layers(model):
            layer.sigma = None
    trainer.save_checkpoint(str(out / "final.ckpt"))
    tested = trainer.test(task, test_dl, verbose=False)
    metrics = {k: float(v) for k, v in (tested[0] if tested else {}).items()}
    rows = layer_table(model)
    dense_total = sum(r["dense"] for r in rows)
    cost = sum(r["cost"] for r in rows) / dense_total if rows else 1.0
    summary: dict[str, Any] = {
        "name": str(cfg.name), "linear": str(cfg.model.linear), "budget": float(cfg.budget),
        "seed": int(cfg.seed), "steps": int(trainer.global_step), "fit_seconds": fit_seconds,
        "cost_fraction": cost, "task": info["task"], "layers": rows,
        "params": sum(p.numel() for p in model.parameters()),
    }
    if "test/loss" in metrics:
        summary["test_loss"] = metrics["test/loss"]
        if info["task"] == "lm":
            summary["test_ppl"] = math.exp(min(50.0, metrics["test/loss"]))
    if "test/acc" in metrics:
        summary["test_acc"] = metrics["test/acc"]
    if trainer.is_global_zero:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        (out / "summary.md").write_text(_format_summary(summary))
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
    if s["layers"]:
        head += "\n" + _format_layers(s["layers"]) + "\n"
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
        (root / "compare.md").write_text(f"# {cfg.name}\n\n{table}\n")
    return summaries


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``gblr train``."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(
            "usage: gblr train experiment=NAME [key=value ...]\n\n"
            "experiments: " + ", ".join(list_experiments()) + "\n"
            "examples:\n"
            "  gblr train experiment=mnist1d/compare\n"
            "  gblr train experiment=shakespeare/gpt-gblr budget=0.4 trainer.max_steps=500\n"
            "  gblr train experiment=mnist1d/mixer-gblr resume=runs/.../checkpoints/last.ckpt\n"
            "  gblr train experiment=cifar10/vit-s-gblr trainer.devices=8 trainer.strategy=ddp"
        )
        return 0
    try:
        cfg = compose(argv)
    except Exception as err:  # Hydra's composition errors name the bad key or option
        print(f"gblr train: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    from omegaconf.errors import MissingMandatoryValue

    try:
        run_all(cfg)
    except (ValueError, FileNotFoundError, MissingMandatoryValue, ImportError) as err:
        print(f"gblr train: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    return 0


def list_experiments() -> list[str]:
    """Names accepted by ``experiment=``."""
    root = Path(__file__).resolve().parent.parent / "conf" / "experiment"
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml"))
