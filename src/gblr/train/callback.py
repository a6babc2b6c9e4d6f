"""Lightning callback that learns the GBLR structure: sigma schedule, budget control, logging."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L

from gblr.train.controller import BudgetController, measure_costs
from gblr.train.groups import gblr_layers
from gblr.train.sigma import SigmaSchedule

__all__ = ["StructureCallback"]


class StructureCallback(L.Callback):
    """Bundles :class:`SigmaSchedule` and :class:`BudgetController` for a Lightning run.

    At the start of training it builds both for the run's number of optimizer steps
    (``trainer.estimated_stepping_batches``; epochs for ``sigma_by="epoch"``), sets ``sigma``
    before each step, runs the controller after each optimizer step, logs ``cost/total``
    (fraction of dense), ``cost/<layer>``, ``width/<layer>_{in,out}`` and ``sigma``, saves a
    mask figure at each validation (``figure_dir``), and at the end of training calls
    :meth:`BudgetController.enforce` so the final cost is ``<= target``. Its state is saved in
    checkpoints, so ``fit(ckpt_path=...)`` resumes the controller where it stopped.
    """

    def __init__(
        self,
        target: float,
        controller: dict[str, Any] | None = None,
        sigma_start: float = 1.0,
        sigma_end: float = 100.0,
        sigma_anneal: float = 0.8,
        sigma_by: str = "step",
        enforce: bool = True,
        figure_dir: str | None = None,
        log_layers: bool = True,
    ) -> None:
        super().__init__()
        self.target = target
        self.controller_kwargs = dict(controller or {})
        self.sigma_kwargs = {"start": sigma_start, "end": sigma_end, "anneal_frac": sigma_anneal,
                             "by": sigma_by}
        self.enforce = enforce
        self.figure_dir = figure_dir
        self.log_layers = log_layers
        self.controller: BudgetController | None = None
        self.sigma: SigmaSchedule | None = None
        self._pending_state: dict | None = None
        self._last_step = -1
        self.final_cost: float | None = None

    # -- set-up ----------------------------------------------------------------------------------
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        total = int(trainer.estimated_stepping_batches)
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        self.controller = BudgetController(pl_module, self.target, total_steps=max(1, total),
                                           optimizer=optimizer, **self.controller_kwargs)
        by = self.sigma_kwargs["by"]
        ticks = total if by == "step" else max(1, int(trainer.max_epochs or 1))
        self.sigma = SigmaSchedule(pl_module, max(1, ticks), **self.sigma_kwargs)
        if self._pending_state is not None:
            self.controller.load_state_dict(self._pending_state)
            self._pending_state = None
        self._last_step = trainer.global_step
        self._set_sigma(trainer)

    def _set_sigma(self, trainer: L.Trainer) -> None:
        if self.sigma is None:
            return
        tick = trainer.global_step if self.sigma.by == "step" else trainer.current_epoch
        self.sigma.apply(tick)

    # -- per step ----------------------------------------------------------------------------------
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._set_sigma(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.controller is None or trainer.global_step == self._last_step:
            return  # no optimizer step happened (gradient accumulation)
        self._last_step = trainer.global_step
        cost = self.controller.step()
        pl_module.log("cost/total", cost, on_step=True, on_epoch=False, prog_bar=True,
                      rank_zero_only=True)
        pl_module.log("cost/lam", self.controller.lam, on_step=True, on_epoch=False,
                      rank_zero_only=True)
        sigma = self.sigma.value(trainer.global_step) if self.sigma else None
        pl_module.log("sigma", 0.0 if sigma is None else sigma, on_step=True, on_epoch=False,
                      rank_zero_only=True)

    # -- validation: per-layer report and figure ------------------------------------------------
    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        if self.log_layers:
            costs = measure_costs(pl_module)
            total = sum(c.cost for c in costs) / sum(c.dense for c in costs)
            metrics = {"cost/val_total": total}
            for c in costs:
                metrics[f"cost/{c.name}"] = c.fraction
                metrics[f"width/{c.name}_in"] = c.mean_width_in
                metrics[f"width/{c.name}_out"] = c.mean_width_out
            pl_module.log_dict(metrics, rank_zero_only=True)
        if self.figure_dir and trainer.is_global_zero and any(gblr_layers(pl_module)):
            import matplotlib.pyplot as plt

            from gblr.train.figure import plot_masks

            path = Path(self.figure_dir) / f"masks_step{trainer.global_step:07d}.png"
            fig = plot_masks(pl_module, path, title=f"step {trainer.global_step}")
            for logger in trainer.loggers:
                experiment = getattr(logger, "experiment", None)
                if hasattr(experiment, "add_figure"):
                    experiment.add_figure("masks", fig, global_step=trainer.global_step)
            plt.close(fig)

    # -- end ----------------------------------------------------------------------------------
    def on_train_end(self, trainer, pl_module) -> None:
        for _, layer in gblr_layers(pl_module):
            layer.sigma = None
        if self.controller is None:
            return
        self.final_cost = self.controller.enforce() if self.enforce else self.controller.measure()

    # -- checkpointing ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self.controller is None:
            return dict(self._pending_state or {})
        return self.controller.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self.controller is None:
            self._pending_state = dict(state_dict)
        else:
            self.controller.load_state_dict(state_dict)
