"""Data loaders, the model and its table of structured layers, built from a configuration.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn
from torch.utils.data import DataLoader

from gblr.core.budget import check_budget
from gblr.layers.base import StructuredLinear
from gblr.layers.gblr import GBLRLinear
from gblr.models.factory import LINEAR_KINDS
from gblr.train.weights import load_dense_state

#: attribute names of the replaced linear layers, per architecture (as in the paper)
REPLACED = {"mixer": ("fc1", "fc2"), "vit": ("q", "k", "v", "fc1", "fc2")}


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
            load_dense_state(model, str(m.init_from))
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
    """One row per structured layer: name, structure, shape, cost (GBLR: the sharp cost the
    controller steers), dense cost, fraction."""
    rows = []
    for name, mod in model.named_modules():
        if isinstance(mod, StructuredLinear):
            cost = mod.sharp_macs() if isinstance(mod, GBLRLinear) else mod.macs()
            dense = mod.dense_macs()
            rows.append({"layer": name, "structure": mod.structure_name,
                         "in": mod.in_features, "out": mod.out_features, "cost": cost,
                         "dense": dense, "fraction": cost / dense})
    return rows


def format_layers(rows: list[dict[str, Any]]) -> str:
    lines = ["| layer | structure | in x out | cost (MACs/token) | % of dense |",
             "|---|---|---|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['layer']} | {r['structure']} | {r['in']}x{r['out']} | "
                     f"{r['cost']} | {100 * r['fraction']:.1f} |")
    return "\n".join(lines)
