"""The LightningModule used by the runner: classification or causal language modelling."""

from __future__ import annotations

import math

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from gblr.train.groups import STRUCTURE_GROUP, adamw, param_groups

__all__ = ["StructuredTask"]


class StructuredTask(L.LightningModule):
    """Wraps ``model`` for ``task="classify"`` (batches ``(x, label)``) or ``"lm"``
    (batches ``(tokens, next tokens)``); logs loss, accuracy (classify) and perplexity (lm).

    The optimizer is AdamW on :func:`param_groups` (structure parameters in their own group,
    no weight decay, betas ``structure_betas``); the weight groups follow linear warm-up then
    cosine decay to ``min_lr_ratio * lr``; the structure group keeps its learning rate after
    warm-up so that the budget controller's step size stays meaningful.
    """

    def __init__(
        self,
        model: nn.Module,
        task: str = "classify",
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        structure_lr: float | None = None,
        structure_betas: tuple[float, float] = (0.0, 0.999),
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.0,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        if task not in ("classify", "lm"):
            raise ValueError(f"task must be 'classify' or 'lm', got {task!r}")
        self.model = model
        self.task = task
        self.lr = lr
        self.weight_decay = weight_decay
        self.structure_lr = structure_lr
        self.structure_betas = tuple(structure_betas)
        self.warmup_steps = int(warmup_steps)
        self.min_lr_ratio = float(min_lr_ratio)
        self.label_smoothing = float(label_smoothing)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def _loss(self, batch, smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, int]:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                               label_smoothing=smoothing)
        correct = (logits.argmax(-1) == y).sum()
        return loss, correct, y.numel()

    def training_step(self, batch, batch_idx):
        loss, correct, n = self._loss(batch, self.label_smoothing)
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        return loss

    def _eval_step(self, batch, stage: str) -> None:
        loss, correct, n = self._loss(batch)
        self.log(f"{stage}/loss", loss, on_epoch=True, sync_dist=True, batch_size=n,
                 prog_bar=stage == "val")
        if self.task == "classify":
            self.log(f"{stage}/acc", correct.float() / n, on_epoch=True, sync_dist=True,
                     batch_size=n, prog_bar=stage == "val")

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, "test")

    def configure_optimizers(self):
        groups = param_groups(self.model, self.lr, self.weight_decay,
                              structure_lr=self.structure_lr,
                              structure_betas=self.structure_betas)
        optimizer = adamw(groups, lr=self.lr)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warm = max(0, min(self.warmup_steps, total - 1))
        floor = self.min_lr_ratio

        def cosine(step: int) -> float:
            if step < warm:
                return (step + 1) / (warm + 1)
            progress = (step - warm) / max(1, total - warm)
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

        def constant(step: int) -> float:
            return (step + 1) / (warm + 1) if step < warm else 1.0

        lambdas = [constant if g.get("name") == STRUCTURE_GROUP else cosine for g in groups]
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler,
                                                         "interval": "step"}}
