"""Whole-model FLOP counts with ``torch.utils.flop_counter.FlopCounterMode``.

GBLR layers in evaluation mode run cost-carrying custom ops (:mod:`gblr.ops.costed`)
whose flop formula is their evaluation-mode cost, so a plain ``FlopCounterMode``
around an evaluation-mode model already counts them right; :func:`count_flops` is the
short way to do that.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_flops"]


def count_flops(model: nn.Module, *inputs: Any, **kwargs: Any) -> int:
    """FLOPs (``2 * MACs``, whole batch) of ``model(*inputs, **kwargs)`` in evaluation mode.

    The model runs once under ``torch.no_grad()`` with every module in evaluation mode
    (the modes are restored afterwards). Everything ``FlopCounterMode`` counts is
    included, e.g. attention matmuls, not only the layers of :func:`flops_report`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(*inputs, **kwargs)
    finally:
        for module, training in modes.items():
            module.training = training
    return int(counter.get_total_flops())
