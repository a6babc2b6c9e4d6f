"""``gblr train experiment=NAME key=value ...``: Hydra-configured Lightning runs.

The configs are packaged in ``gblr/conf``; ``compose`` builds one in Hydra's struct mode, so a
misspelt key is an error. :func:`run` trains one configuration and returns its summary;
``compare=[gblr,dense]`` runs it once per structure and prints the comparison.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import math
import os
import pickle
import re
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from gblr.core.budget import check_budget
from gblr.layers.base import StructuredLinear
from gblr.layers.gblr import GBLRLinear
from gblr.models.factory import LINEAR_KINDS

__all__ = ["compose", "validate", "build_data", "build_model", "load_weights", "run", "run_all",
           "layer_table", "UsageError", "TrainingInterrupted"]

#: exit status of ``gblr train`` after SIGTERM (128 + 15, as a shell reports a killed process)
EXIT_SIGTERM = 143


class UsageError(ValueError):
    """A bad value on the command line, found before any work: one line, naming the key."""


class TrainingInterrupted(RuntimeError):
    """Training stopped by SIGTERM; a checkpoint to resume from was saved at ``checkpoint``."""

    def __init__(self, message: str, checkpoint: Path | None, step: int) -> None:
        super().__init__(message)
        self.checkpoint = checkpoint
        self.step = step


def _one_line(text: object) -> str:
    return "; ".join(part.strip() for part in str(text).splitlines() if part.strip())

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


#: keys whose value may be a number or a string (Lightning accepts both)
_NUMBER_OR_TEXT = frozenset({"trainer.devices", "trainer.val_check_interval"})


def _fail(key: str, value: object, why: str) -> UsageError:
    return UsageError(f"{key}={value}: {why}")


def _int_key(cfg, key: str, minimum: int | None = None) -> int:
    from omegaconf import OmegaConf

    value = OmegaConf.select(cfg, key)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(key, value, "must be an integer")
    if minimum is not None and value < minimum:
        raise _fail(key, value, f"must be at least {minimum}")
    return value


def _check_out_dir(value: object) -> None:
    path = Path(os.path.expanduser(str(value))).absolute()
    for folder in (path, *path.parents):
        if folder.exists():
            if not folder.is_dir():
                raise _fail("out_dir", value, f"{folder} is a file, not a folder")
            if not os.access(folder, os.W_OK | os.X_OK):
                raise _fail("out_dir", value, f"cannot write in {folder}")
            return


def _check_checkpoint(value: object) -> None:
    """``resume=``: a Lightning checkpoint, readable with ``weights_only=True``."""
    path = Path(os.path.expanduser(str(value)))
    if not path.is_file():
        raise _fail("resume", value, "no such checkpoint file")
    state = _torch_load_weights(path, "resume", value, mmap=True)
    if not (isinstance(state, dict) and isinstance(state.get("state_dict"), dict)
            and "loops" in state and "global_step" in state):
        raise _fail("resume", value, "not a checkpoint written by gblr train (a Lightning .ckpt "
                                     "with state_dict, loops and global_step)")


def _check_override_types(cfg, overrides: Sequence[str]) -> None:
    """A ``key=text`` override of a key whose experiment value is a number is an error."""
    from omegaconf import OmegaConf

    pairs = [o.split("=", 1) for o in overrides if "=" in o and o[0] not in "+~"]
    keys = [k for k, _ in pairs if k != "experiment" and k not in _NUMBER_OR_TEXT]
    if not keys:
        return
    reference = compose([o for o in overrides if o.startswith("experiment=")])
    for key, text in pairs:
        if key not in keys:
            continue
        ref = OmegaConf.select(reference, key, default=None, throw_on_missing=False)
        value = OmegaConf.select(cfg, key, default=None, throw_on_missing=False)
        numeric = isinstance(ref, (int, float)) and not isinstance(ref, bool)
        if numeric and (isinstance(value, (str, bool)) or value is None):
            raise _fail(key, text, f"must be a number (the experiment's value is {ref})")


def validate(cfg, overrides: Sequence[str] = ()) -> None:
    """Check a composed configuration before any work; raise :class:`UsageError` (one line)."""
    from omegaconf import OmegaConf

    budget = cfg.budget
    try:
        b = float(budget)
    except (TypeError, ValueError):
        raise _fail("budget", budget, "must be a number in (0, 1]") from None
    if isinstance(budget, bool) or not math.isfinite(b) or not 0.0 < b <= 1.0:
        raise _fail("budget", budget, "must be a fraction of the dense cost in (0, 1]")
    _int_key(cfg, "seed")
    if cfg.threads is not None:
        _int_key(cfg, "threads", minimum=0)
    steps = _int_key(cfg, "trainer.max_steps", minimum=-1)
    epochs = _int_key(cfg, "trainer.max_epochs", minimum=-1)
    if steps == 0:
        raise _fail("trainer.max_steps", steps, "must be a positive number of steps")
    if steps == -1 and epochs in (-1, 0):
        raise _fail("trainer.max_steps", steps,
                    "-1 (no step limit) needs trainer.max_epochs > 0")
    _int_key(cfg, "checkpoint.every_n_train_steps", minimum=0)
    _int_key(cfg, "data.batch_size", minimum=1)
    _int_key(cfg, "data.eval_batch_size", minimum=1)
    _int_key(cfg, "data.num_workers", minimum=0)
    linear = cfg.model.linear
    if linear not in LINEAR_KINDS:
        raise _fail("model.linear", linear, f"must be one of {', '.join(LINEAR_KINDS)}")
    for kind in cfg.compare or ():
        if kind not in LINEAR_KINDS:
            raise _fail("compare", list(cfg.compare),
                        f"entries must be in {', '.join(LINEAR_KINDS)}")
    if str(cfg.logging.progress) not in ("auto", "bar", "lines", "none"):
        raise _fail("logging.progress", cfg.logging.progress, "must be auto, bar, lines or none")
    _check_override_types(cfg, overrides)
    try:
        out_dir = cfg.out_dir
    except Exception as err:  # noqa: BLE001 - an interpolation that does not resolve
        raise _fail("out_dir", OmegaConf.to_container(cfg, resolve=False)["out_dir"],
                    _one_line(err)) from None
    _check_out_dir(out_dir)
    if cfg.resume is not None:
        _check_checkpoint(cfg.resume)
    if cfg.model.init_from is not None:
        init = Path(os.path.expanduser(str(cfg.model.init_from)))
        if not init.is_file():
            raise _fail("model.init_from", cfg.model.init_from, "no such file")
        if not _is_safetensors(init):  # refuse a pickle before any work
            _torch_load_weights(init, "model.init_from", cfg.model.init_from, mmap=True)


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


def _unpickling_refused(key: str, value: object, err: Exception) -> UsageError:
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
    what = f" (it asks for {found.group(1)})" if found else ""
    return UsageError(
        f"{key}={value}: refused to load: the file holds Python objects besides tensors{what}, "
        "and unpickling them could run code; give a .safetensors file or a checkpoint written by "
        "gblr train"
    )


def _torch_load_weights(path: Path, key: str, value: object, mmap: bool = False) -> Any:
    """``torch.load(weights_only=True)``: tensors and plain containers only, never code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        raise _unpickling_refused(key, value, err) from None
    except RuntimeError as err:
        if mmap and "mmap" in str(err):  # an old (non-zip) torch file: read it whole
            return _torch_load_weights(path, key, value, mmap=False)
        raise UsageError(f"{key}={value}: not a torch checkpoint ({_one_line(err)[:200]})") \
            from None
    except Exception as err:  # noqa: BLE001 - any other failure means "not a checkpoint"
        detail = _one_line(err)[:200]
        detail = f"{type(err).__name__}: {detail}" if detail else type(err).__name__
        if path.stat().st_size == 0:
            detail = "the file is empty"
        raise UsageError(f"{key}={value}: not a torch checkpoint ({detail})") from None


def _is_safetensors(path: Path) -> bool:
    if path.suffix == ".safetensors":
        return True
    with open(path, "rb") as f:  # 8-byte little-endian header length, then a JSON header
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def load_weights(path: str | os.PathLike, key: str = "model.init_from") -> dict[str, torch.Tensor]:
    """A state dict from a ``.safetensors`` file (preferred) or a torch/Lightning checkpoint.

    Checkpoints are read with ``torch.load(weights_only=True)``: a file that holds other Python
    objects (a pickle that could run code) is refused with a :class:`UsageError`. The
    ``model.`` prefix of a Lightning ``state_dict`` is removed.
    """
    p = Path(os.path.expanduser(str(path)))
    if not p.is_file():
        raise FileNotFoundError(f"{key}={path!r} does not exist")
    if _is_safetensors(p):
        from safetensors.torch import load_file

        try:
            state = load_file(str(p), device="cpu")
        except Exception as err:  # noqa: BLE001
            raise UsageError(f"{key}={path}: not a readable safetensors file "
                             f"({_one_line(err)[:200]})") from None
        if state and all(k.startswith("model.") for k in state):
            state = {k.removeprefix("model."): v for k, v in state.items()}
        return state
    state = _torch_load_weights(p, key, path)
    if isinstance(state, dict) and "state_dict" in state:
        state = {k.removeprefix("model."): v for k, v in state["state_dict"].items()}
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UsageError(f"{key}={path}: not a state dict of tensors")
    return state


def _load_dense_state(model: nn.Module, path: str) -> None:
    model.load_state_dict(load_weights(path))


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


def _format_layers(rows: list[dict[str, Any]]) -> str:
    lines = ["| layer | structure | in x out | cost (MACs/token) | % of dense |",
             "|---|---|---|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['layer']} | {r['structure']} | {r['in']}x{r['out']} | "
                     f"{r['cost']} | {100 * r['fraction']:.1f} |")
    return "\n".join(lines)


#: Lightning messages that are advertisements or say nothing about this run
_NOISE_LOGS = ("💡 Tip", "litlogger", "litmodels", "was configured so 100% of the batches",
               "`weights_only` was not set")
#: warnings that Lightning or torch raise on every run and that the user cannot act on
_NOISE_WARNINGS = (
    r".*isinstance\(treespec, LeafSpec\)",
    r".*is smaller than the logging interval",
    r".*does not have many workers which may be a bottleneck",
    r".*The dirpath has changed from",
    r".*`training_step` returned `None`",
)


class _NoiseFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in _NOISE_LOGS)


#: Lightning's warning that a mid-epoch resume restarts the epoch: not so in one process, where
#: :class:`~gblr.train.callback.ResumableSampling` continues the epoch where it stopped
_RESUMABLE_WARNING = r".*resuming from a checkpoint that ended before the epoch ended"


@contextlib.contextmanager
def _quiet_lightning(one_process: bool = True) -> Iterator[None]:
    """Drop Lightning's tips and known deprecation noise for the duration of a run."""
    loggers = [logging.getLogger(name) for name in (
        "lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
        "lightning.pytorch.trainer.connectors.checkpoint_connector")]
    noise = _NoiseFilter()
    for lg in loggers:
        lg.addFilter(noise)
    try:
        with warnings.catch_warnings():
            for pattern in _NOISE_WARNINGS + ((_RESUMABLE_WARNING,) if one_process else ()):
                warnings.filterwarnings("ignore", message=pattern)
            yield
    finally:
        for lg in loggers:
            lg.removeFilter(noise)


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and ``os.replace``,
    so a reader sees the old file or the new one, never a part of it."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


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
                        "weighting": s.weighting},
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
    with _quiet_lightning(one_process):
        trainer = L.Trainer(default_root_dir=str(out), callbacks=all_callbacks, logger=loggers,
                            **trainer_opts)
        _write_atomic(out / "config.yaml", OmegaConf.to_yaml(cfg))
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
    if "test/loss" in metrics:
        summary["test_loss"] = metrics["test/loss"]
        if info["task"] == "lm":
            summary["test_ppl"] = math.exp(min(50.0, metrics["test/loss"]))
    if "test/acc" in metrics:
        summary["test_acc"] = metrics["test/acc"]
    if trainer.is_global_zero:
        _write_atomic(out / "summary.json", json.dumps(summary, indent=2))
        _write_atomic(out / "summary.md", _format_summary(summary))
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
        _write_atomic(root / "compare.md", f"# {cfg.name}\n\n{table}\n")
    return summaries


def _choose_experiment() -> str:
    names = list_experiments()
    return ("gblr train: choose an experiment=NAME, for example "
            "gblr train experiment=mnist1d/compare (gblr train --help for more); "
            "available experiments:\n  " + "\n  ".join(names))


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
        print(f"gblr train: {type(err).__name__}: {_one_line(err)}", file=sys.stderr)
        return 2
    if OmegaConf.is_missing(cfg.data, "name") or OmegaConf.is_missing(cfg.model, "arch"):
        print(_choose_experiment(), file=sys.stderr)
        return 2
    try:
        validate(cfg, argv)
    except UsageError as err:
        print(f"gblr train: {_one_line(err)}", file=sys.stderr)
        return 2
    try:
        run_all(cfg)
    except TrainingInterrupted as err:
        print(f"gblr train: {err}", file=sys.stderr)
        return EXIT_SIGTERM
    except UsageError as err:
        print(f"gblr train: {_one_line(err)}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, MissingMandatoryValue, ImportError) as err:
        print(f"gblr train: {type(err).__name__}: {_one_line(err)}", file=sys.stderr)
        return 2
    return 0


def list_experiments() -> list[str]:
    """Names accepted by ``experiment=``."""
    root = Path(__file__).resolve().parent.parent / "conf" / "experiment"
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml"))
