"""Lightning callback that learns the GBLR structure: sigma schedule, budget control, logging."""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import lightning as L
import torch
from lightning.pytorch.callbacks import ProgressBar

from gblr.train.controller import BudgetController, measure_costs
from gblr.train.groups import gblr_layers
from gblr.train.sigma import SigmaSchedule

__all__ = ["StructureCallback", "ResumableSampling", "StepProgress"]


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


class ResumableSampling(L.Callback):
    """Saves the training sampler's position and the RNG state in checkpoints, for exact resumes.

    ``sampler`` is the training loader's :class:`~gblr.data.EpochShuffleSampler` and
    ``batch_size`` its batch size. A checkpoint stores the epoch and the samples consumed in it
    (batches the loop has processed in this epoch times ``batch_size``), and the CPU (and CUDA)
    random states; resuming from it continues the epoch where it stopped, with the random
    state (dropout) the uninterrupted run had at that step. (With several processes the
    position is not saved: a mid-epoch resume then restarts the epoch.)
    """

    def __init__(self, sampler, batch_size: int) -> None:
        super().__init__()
        self.sampler = sampler
        self.batch_size = int(batch_size)
        self._trainer: L.Trainer | None = None
        self._rng: dict[str, Any] | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        trainer = self._trainer
        batches = 0
        # with several processes Lightning wraps the sampler in a distributed one, where a
        # position in this order means nothing: such a resume restarts the epoch (Lightning warns)
        if trainer is not None and trainer.world_size == 1:
            batches = int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)
        consumed = min(self.sampler.n, batches * self.batch_size)
        state: dict[str, Any] = {"sampler": self.sampler.state_dict(consumed),
                                 "torch_rng": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "sampler" in state_dict:
            self.sampler.load_state_dict(state_dict["sampler"])
        self._rng = {k: v for k, v in state_dict.items() if k.endswith("_rng")}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # restored as late as possible, so that nothing between loading and the first batch
        # draws from the generator
        if self._rng:
            if "torch_rng" in self._rng:
                torch.set_rng_state(self._rng["torch_rng"])
            if "cuda_rng" in self._rng and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(self._rng["cuda_rng"])
        self._rng = None


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class StepProgress(ProgressBar):
    """Progress over the whole run (optimizer steps done / total), not per epoch.

    ``mode="bar"``: one tqdm bar (for a terminal). ``mode="lines"``: a plain line (no carriage
    returns) every ``every_s`` seconds or ``every_steps`` steps, and at the first and last
    step: step, loss, cost, elapsed time and the estimated time left; validation results get a
    line of their own. ``mode="auto"`` picks the bar when ``stream`` is a terminal.
    """

    def __init__(self, mode: str = "auto", every_s: float = 30.0, every_steps: int = 0,
                 stream: TextIO | None = None) -> None:
        super().__init__()
        if mode not in ("auto", "bar", "lines"):
            raise ValueError(f"mode must be auto, bar or lines, got {mode!r}")
        self.mode = mode
        self.every_s = float(every_s)
        self.every_steps = int(every_steps)
        self._stream = stream
        self._enabled = True
        self._bar = None
        self._total: float = math.inf
        self._start_step = 0
        self._last_step = -1
        self._start_time = 0.0
        self._last_print = -math.inf
        self._last_print_step = -1

    @property
    def stream(self) -> TextIO:
        return self._stream if self._stream is not None else sys.stdout

    @property
    def use_bar(self) -> bool:
        if self.mode == "auto":
            isatty = getattr(self.stream, "isatty", None)
            return bool(isatty and isatty())
        return self.mode == "bar"

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def _write(self, line: str) -> None:
        if self._bar is not None:
            self._bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def _of_total(self, step: int) -> str:
        return f"{step}/{int(self._total)}" if math.isfinite(self._total) else f"{step}"

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._enabled:
            return
        total = float(trainer.max_steps) if trainer.max_steps and trainer.max_steps > 0 \
            else float(trainer.estimated_stepping_batches)
        self._total = total
        self._start_step = self._last_step = int(trainer.global_step)
        self._start_time = time.monotonic()
        self._last_print, self._last_print_step = -math.inf, -1
        if self.use_bar:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=int(total) if math.isfinite(total) else None,
                             initial=self._start_step, desc="train", unit="step",
                             dynamic_ncols=True, file=self.stream, leave=True)
        else:
            end = int(total) if math.isfinite(total) else "the end of the last epoch"
            self._write(f"training from step {self._start_step} to step {end}")

    @staticmethod
    def _cost(trainer: L.Trainer) -> float | None:
        for cb in trainer.callbacks:
            controller = getattr(cb, "controller", None)
            if isinstance(cb, StructureCallback) and controller is not None:
                return float(controller.cost_fraction)
        return None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = int(trainer.global_step)
        if not self._enabled or step == self._last_step:
            return
        self._last_step = step
        loss = None
        if isinstance(outputs, dict) and "loss" in outputs:
            loss = float(outputs["loss"])
        elif isinstance(outputs, torch.Tensor):
            loss = float(outputs)
        cost = self._cost(trainer)
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            post = {}
            if loss is not None:
                post["loss"] = f"{loss:.4f}"
            if cost is not None:
                post["cost"] = f"{cost:.3f}"
            self._bar.set_postfix(post, refresh=False)
            return
        now = time.monotonic()
        last = math.isfinite(self._total) and step >= self._total
        due = (now - self._last_print >= self.every_s
               or (self.every_steps > 0 and step % self.every_steps == 0))
        if not (due or last or self._last_print_step < 0):
            return
        self._last_print, self._last_print_step = now, step
        elapsed = now - self._start_time
        done = step - self._start_step
        eta = (elapsed / done * (self._total - step)) if done > 0 else math.inf
        parts = [f"step {self._of_total(step)}"]
        if math.isfinite(self._total) and self._total > 0:
            parts[0] += f" ({100 * step / self._total:.0f}%)"
        if loss is not None:
            parts.append(f"loss {loss:.4f}")
        if cost is not None:
            parts.append(f"cost {cost:.3f}")
        parts.append(f"elapsed {_duration(elapsed)}")
        if not last:
            parts.append(f"eta {_duration(eta)}")
        self._write(" | ".join(parts))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._enabled or trainer.sanity_checking or trainer.state.fn != "fit":
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()
                   if k.startswith("val/") and getattr(v, "numel", lambda: 1)() == 1}
        if not metrics:
            return
        text = ", ".join(f"{k.removeprefix('val/')} {v:.4f}" for k, v in sorted(metrics.items()))
        self._write(f"step {self._of_total(int(trainer.global_step))} validation: {text}")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self.on_train_end(trainer, pl_module)
