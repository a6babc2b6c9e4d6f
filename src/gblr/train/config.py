"""The configuration of ``gblr train``: Hydra composition in struct mode (a misspelt key is
an error) and validation of every value before any work, one line naming the key.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

from gblr.models.factory import LINEAR_KINDS
from gblr.train.errors import UsageError, one_line
from gblr.train.weights import is_safetensors, torch_load_weights


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
    state = torch_load_weights(path, "resume", value, mmap=True)
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
    cost = str(cfg.structure.cost)
    if cost not in ("macs", "time"):
        raise _fail("structure.cost", cost, "must be macs or time")
    if cost == "time":
        if cfg.structure.tokens is None:
            raise _fail("structure.tokens", None,
                        "structure.cost=time needs the tokens per call of the deployed model")
        _int_key(cfg, "structure.tokens", minimum=1)
        kinds = {linear, *(cfg.compare or ())} - {"gblr", "dense"}
        if kinds:
            raise _fail("structure.cost", cost,
                        "a time budget applies to GBLR structure learning; "
                        f"{', '.join(sorted(kinds))} take(s) MAC budgets")
    elif cfg.structure.tokens is not None:
        raise _fail("structure.tokens", cfg.structure.tokens, "applies to structure.cost=time")
    if str(cfg.logging.progress) not in ("auto", "bar", "lines", "none"):
        raise _fail("logging.progress", cfg.logging.progress, "must be auto, bar, lines or none")
    _check_override_types(cfg, overrides)
    try:
        out_dir = cfg.out_dir
    except Exception as err:  # noqa: BLE001 - an interpolation that does not resolve
        raise _fail("out_dir", OmegaConf.to_container(cfg, resolve=False)["out_dir"],
                    one_line(err)) from None
    _check_out_dir(out_dir)
    if cfg.resume is not None:
        _check_checkpoint(cfg.resume)
    if cfg.model.init_from is not None:
        init = Path(os.path.expanduser(str(cfg.model.init_from)))
        if not init.is_file():
            raise _fail("model.init_from", cfg.model.init_from, "no such file")
        if not is_safetensors(init):  # refuse a pickle before any work
            torch_load_weights(init, "model.init_from", cfg.model.init_from, mmap=True)


def list_experiments() -> list[str]:
    """Names accepted by ``experiment=``."""
    root = Path(__file__).resolve().parent.parent / "conf" / "experiment"
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml"))


def choose_experiment() -> str:
    names = list_experiments()
    return ("gblr train: choose an experiment=NAME, for example "
            "gblr train experiment=mnist1d/compare (gblr train --help for more); "
            "available experiments:\n  " + "\n  ".join(names))
