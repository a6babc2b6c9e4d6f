"""Loading weights without running code: safetensors, or ``torch.load(weights_only=True)``;
a pickle that asks for anything but tensors is refused.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gblr.train.errors import UsageError, one_line


def _unpickling_refused(key: str, value: object, err: Exception) -> UsageError:
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
    what = f" (it asks for {found.group(1)})" if found else ""
    return UsageError(
        f"{key}={value}: refused to load: the file holds Python objects besides tensors{what}, "
        "and unpickling them could run code; give a .safetensors file or a checkpoint written by "
        "gblr train"
    )


def torch_load_weights(path: Path, key: str, value: object, mmap: bool = False) -> Any:
    """``torch.load(weights_only=True)``: tensors and plain containers only, never code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        raise _unpickling_refused(key, value, err) from None
    except RuntimeError as err:
        if mmap and "mmap" in str(err):  # an old (non-zip) torch file: read it whole
            return torch_load_weights(path, key, value, mmap=False)
        raise UsageError(f"{key}={value}: not a torch checkpoint ({one_line(err)[:200]})") \
            from None
    except Exception as err:  # noqa: BLE001 - any other failure means "not a checkpoint"
        detail = one_line(err)[:200]
        detail = f"{type(err).__name__}: {detail}" if detail else type(err).__name__
        if path.stat().st_size == 0:
            detail = "the file is empty"
        raise UsageError(f"{key}={value}: not a torch checkpoint ({detail})") from None


def is_safetensors(path: Path) -> bool:
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
    if is_safetensors(p):
        from safetensors.torch import load_file

        try:
            state = load_file(str(p), device="cpu")
        except Exception as err:  # noqa: BLE001
            raise UsageError(f"{key}={path}: not a readable safetensors file "
                             f"({one_line(err)[:200]})") from None
        if state and all(k.startswith("model.") for k in state):
            state = {k.removeprefix("model."): v for k, v in state.items()}
        return state
    state = torch_load_weights(p, key, path)
    if isinstance(state, dict) and "state_dict" in state:
        state = {k.removeprefix("model."): v for k, v in state["state_dict"].items()}
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UsageError(f"{key}={path}: not a state dict of tensors")
    return state


def load_dense_state(model: nn.Module, path: str) -> None:
    model.load_state_dict(load_weights(path))
