"""A fingerprint of a model's architecture, to refuse loading weights into another model."""

from __future__ import annotations

import hashlib

from torch import nn

__all__ = ["architecture_fingerprint"]


def architecture_fingerprint(model: nn.Module) -> str:
    """SHA-256 of every module's name and class and every tensor's name, shape and dtype.

    Values are not hashed: a freshly initialised model of the same architecture has the
    same fingerprint as the pretrained one.
    """
    h = hashlib.sha256()
    for name, module in model.named_modules():
        h.update(f"M {name} {type(module).__module__}.{type(module).__qualname__}\n".encode())
    for name, tensor in model.state_dict(keep_vars=True).items():
        h.update(f"T {name} {tuple(tensor.shape)} {tensor.dtype}\n".encode())
    return h.hexdigest()
