"""Budget pressure: a proximal width shrink steered by the model's measured cost."""

from __future__ import annotations

import math
import sys
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from gblr.core.boxes import bisect, shrink_widths
from gblr.core.budget import check_budget
from gblr.core.deprecation import warn_renamed
from gblr.core.timemodel import MeasuredTimes, predict_seconds
from gblr.core.validate import check_positive
from gblr.layers.gblr import GBLRLinear, sharp_macs_of
from gblr.projection.timebudget import COST_KINDS, deployed_seconds, measured_times
from gblr.train.groups import gblr_layers

#: Shrink weightings of :class:`BudgetController`.
WEIGHTINGS = ("uniform", "magnitude")

__all__ = [
    "BudgetController",
    "WEIGHTINGS",
    "StructureCost",
    "measure_costs",
    "measure_costs_of",
    "sharp_flops",
]


@dataclass(frozen=True)
class StructureCost:
    """Sharp evaluation-mode cost and width statistics of one GBLR layer (the budget
    controller's view; :class:`gblr.accounting.LayerCost` is the report row of any layer)."""

    name: str
    cost: int
    dense: int
    mean_width_in: float
    mean_width_out: float
    active: int
    components: int

    @property
    def fraction(self) -> float:
        return self.cost / self.dense


def sharp_flops(layer: GBLRLinear) -> int:
    """Deprecated: :meth:`GBLRLinear.sharp_macs`."""
    warn_renamed("gblr.train.controller.sharp_flops(layer)", "layer.sharp_macs()")
    return layer.sharp_macs()


@torch.no_grad()
def measure_costs(model: nn.Module) -> list[StructureCost]:
    """Per-layer evaluation-mode (sharp) cost of every GBLR layer of ``model``."""
    return measure_costs_of(list(gblr_layers(model)))


@torch.no_grad()
def measure_costs_of(layers: list[tuple[str, GBLRLinear]]) -> list[StructureCost]:
    """:func:`measure_costs` for an explicit list of ``(name, layer)`` pairs."""
    out = []
    for name, layer in layers:
        w = layer.widths.detach().clamp(0, 1)
        out.append(
            StructureCost(
                name=name,
                cost=layer.sharp_macs(),
                dense=layer.dense_macs(),
                mean_width_in=float(w[0].mean()),
                mean_width_out=float(w[1].mean()),
                active=int(layer.active_components().sum()),
                components=layer.num_components,
            )
        )
    return out


def _outside_stacklevel() -> int:
    """The ``stacklevel`` for ``warnings.warn`` called right after this that names the
    first caller outside this module (and outside ``torch.no_grad``'s wrapper)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and (frame.f_code.co_filename == __file__
                                 or frame.f_code.co_filename.endswith("_contextlib.py")):
        frame, level = frame.f_back, level + 1
    return level


class BudgetController:
    """Drive the total cost of a model's GBLR layers to ``target`` (fraction of their dense cost).

    Call :meth:`step` after every optimizer step. It wraps locations into ``[0, 1)`` and, while
    the measured cost is above a reference path that falls from the initial cost to ``target``
    over the first ``reach`` fraction of ``total_steps``, applies the proximal L1 step
    ``w <- clamp(softshrink(w, lam * lr), 0, 1)`` to every width. ``lam`` is steered
    multiplicatively from the measured cost (up when the cost lags the path, down when it is
    ahead). A shrink that would take the total cost below ``target * (1 - tolerance)`` is cut
    back by bisection, and an undershoot caused by the gradient step itself is undone by the
    smallest uniform width growth that restores the target; a layer at or under ``floor`` of
    its dense cost is not shrunk. At the end call :meth:`enforce`, which makes
    ``cost <= target`` exactly with the smallest uniform extra shrink. Everything is a
    deterministic function of the parameters and the step count, so identical replicas of a
    distributed run stay identical without communication.

    Args:
        model: the model; its GBLR layers are found by type.
        target: budget, a fraction in (0, 1] of the dense cost of the GBLR layers.
        total_steps: the number of optimizer steps of the run.
        reach: fraction of ``total_steps`` by which the cost should reach ``target``.
        floor: per-layer minimum cost, as a fraction of that layer's dense cost.
        tolerance: allowed relative undershoot of ``target`` during training.
        lam: initial strength; by default chosen so that a uniform shrink reaches the target
            on time.
        gain: log-step of the multiplicative ``lam`` update.
        lr: learning rate that multiplies ``lam``; if ``optimizer`` is given, the current lr of
            the group that holds the widths is used instead.
        measure_every: re-measure the cost every N steps (always every step within 5% of the
            target); intermediate steps reuse the last measurement.
        weighting: ``"uniform"`` (every width shrinks by the same amount) or ``"magnitude"``
            (a reweighted L1: component ``c`` shrinks by the amount times
            ``mean_magnitude / magnitude_c``, clipped to ``[0.25, 4]``, where the magnitude is
            ``||U_c|| ||V_c||``; weak components are switched off first and strong ones stay
            wide, as a low-rank truncation would keep them).
        cost: ``"macs"`` (``target`` is a fraction of the dense MACs) or ``"time"``
            (``target`` is a fraction of the dense layers' predicted deployed time at
            ``tokens`` tokens per call, from the device's time model: each GBLR layer as
            its packing for those tokens). In time mode the controller steers MACs as
            above, toward a MAC target that it re-derives ``time_checks`` times up to
            ``reach`` and once halfway from there to the end, from the predicted time of the
            structure then (the MAC fraction times ``target`` over the predicted time
            fraction); :meth:`enforce` then picks the largest MAC cost whose predicted time
            is within ``target``. Each prediction packs every layer (about 0.1 s for a
            1024 x 256 layer on CPU).
        tokens: tokens per call of the deployed model (``cost="time"`` only).
        times: the calibration to predict with (default: this device's, measured and
            cached on first use; ``gblr calibrate``).
        time_checks: how many times the MAC target is re-derived in time mode.
    """

    def __init__(
        self,
        model: nn.Module,
        target: float,
        total_steps: int,
        reach: float = 0.6,
        floor: float = 0.01,
        tolerance: float = 0.005,
        lam: float | None = None,
        gain: float = 0.05,
        lr: float = 1.0,
        optimizer: torch.optim.Optimizer | None = None,
        measure_every: int = 1,
        weighting: str = "uniform",
        cost: str = "macs",
        tokens: int | None = None,
        times: MeasuredTimes | None = None,
        time_checks: int = 4,
    ) -> None:
        if cost not in COST_KINDS:
            raise ValueError(f"cost must be one of {COST_KINDS}, got {cost!r}")
        if (tokens is not None or times is not None) and cost != "time":
            raise ValueError('tokens= and times= apply to cost="time" only')
        self.cost = cost
        #: the budget as given: a fraction of dense MACs, or of dense predicted time
        self.budget = check_budget(target, "target")
        #: the MAC fraction the controller steers to (the budget itself with cost="macs")
        self.target = self.budget
        self.total_steps = check_positive("total_steps", total_steps)
        if not 0.0 < float(reach) <= 1.0:
            raise ValueError(f"reach must be in (0, 1], got {reach!r}")
        if not 0.0 <= float(floor) < self.target:
            raise ValueError(f"floor must be in [0, target={self.target}), got {floor!r}")
        if not 0.0 <= float(tolerance) < 1.0:
            raise ValueError(f"tolerance must be in [0, 1), got {tolerance!r}")
        if lam is not None and not float(lam) > 0:
            raise ValueError(f"lam must be positive, got {lam!r}")
        if not float(gain) > 0:
            raise ValueError(f"gain must be positive, got {gain!r}")
        if not float(lr) > 0:
            raise ValueError(f"lr must be positive, got {lr!r}")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        self.weighting = weighting
        self.layers = list(gblr_layers(model))
        if not self.layers:
            raise ValueError("model has no GBLRLinear layer for the budget controller to steer")
        self.reach = float(reach)
        self.floor = float(floor)
        self.tolerance = float(tolerance)
        self.gain = float(gain)
        self.lr = float(lr)
        self.optimizer = optimizer
        self.measure_every = check_positive("measure_every", measure_every)
        self.dense = [layer.dense_macs() for _, layer in self.layers]
        self.dense_total = sum(self.dense)
        self.tokens = None
        self.times = None
        self._time_checks: set[int] = set()
        if cost == "time":
            if tokens is None:
                raise ValueError('cost="time" needs tokens= (tokens per call when deployed)')
            self.tokens = check_positive("tokens", tokens)
            check_positive("time_checks", time_checks)
            ref = self.layers[0][1].widths
            self.times = times if times is not None else measured_times(ref.device.type,
                                                                        ref.dtype)
            self._dense_seconds = sum(
                predict_seconds(nn.Linear(layer.in_features, layer.out_features), self.tokens,
                                self.times) for _, layer in self.layers)
            span = self.reach * self.total_steps
            checks = [span * (i + 1) / time_checks for i in range(int(time_checks))]
            # and once halfway from reach to the end, where time per MAC has settled
            checks.append(0.5 * (span + self.total_steps))
            self._time_checks = {max(1, round(c)) for c in checks if c < self.total_steps}
        self.steps = 0
        if cost == "macs":
            self._check_reachable()
        self._costs = self._measure()
        self._enforced: float | None = None  # the cost the last enforce() returned
        self.initial_cost = self.cost_fraction
        self.lam = self._default_lam() if lam is None else float(lam)

    # -- measurement ---------------------------------------------------------------------------
    def _measure(self) -> list[int]:
        return sharp_macs_of([layer for _, layer in self.layers])

    @property
    def cost_fraction(self) -> float:
        """The last measured total cost as a fraction of the dense cost."""
        return sum(self._costs) / self.dense_total

    def measure(self) -> float:
        """Measure the cost now and return it as a fraction of the dense cost."""
        self._costs = self._measure()
        return self.cost_fraction

    def layer_costs(self) -> list[StructureCost]:
        """Per-layer cost report (measured now)."""
        return measure_costs_of(self.layers)

    def reference(self, step: int) -> float:
        """The cost fraction the run should have at ``step``."""
        c0 = max(self.initial_cost, self.target)
        progress = min(1.0, step / max(1.0, self.reach * self.total_steps))
        return c0 + (self.target - c0) * progress

    def _default_lam(self) -> float:
        if self.initial_cost <= self.target:
            # already within budget: a small positive strength that the updates can scale up
            return 0.01 / max(1.0, self.reach * self.total_steps) / self._lr()
        widths = torch.cat([lay.widths.detach().clamp(0, 1).flatten() for _, lay in self.layers])
        needed = float(widths.mean()) * (1.0 - self.target / self.initial_cost)
        return needed / max(1.0, self.reach * self.total_steps) / self._lr()

    def _lr(self) -> float:
        if self.optimizer is None:
            return self.lr
        ref = self.layers[0][1].widths
        for group in self.optimizer.param_groups:
            if any(p is ref for p in group["params"]):
                return float(group["lr"])
        raise ValueError("optimizer holds no group with the GBLR widths")

    # -- the proximal step ---------------------------------------------------------------------
    def _snapshot(self) -> list[torch.Tensor]:
        return [layer.widths.detach().clone() for _, layer in self.layers]

    @torch.no_grad()
    def _shrink_from(
        self, before: list[torch.Tensor], amounts: list[float] | list[torch.Tensor]
    ) -> None:
        for (_, layer), w, amount in zip(self.layers, before, amounts, strict=True):
            layer.widths.copy_(shrink_widths(w, amount))

    @torch.no_grad()
    def _weights(self) -> list[float | torch.Tensor]:
        """Per-component shrink multipliers of every layer (1.0 with uniform weighting)."""
        if self.weighting == "uniform":
            return [1.0] * len(self.layers)
        out: list[float | torch.Tensor] = []
        for _, layer in self.layers:
            r = layer.rank_per_component
            u = layer.U.detach().float().reshape(layer.out_features, -1, r)
            v = layer.V.detach().float().reshape(-1, r, layer.in_features)
            magnitude = u.square().sum(dim=(0, 2)).sqrt() * v.square().sum(dim=(1, 2)).sqrt()
            on = layer.widths.detach().clamp(0, 1).prod(dim=0) > 0
            mean = magnitude[on].mean() if bool(on.any()) else magnitude.mean()
            weight = (mean / magnitude.clamp_min(1e-12)).clamp(0.25, 4.0)
            out.append(weight.to(layer.widths.device, layer.widths.dtype)[None, :])
        return out

    def _shrinkable(self) -> list[bool]:
        return [c > self.floor * d for c, d in zip(self._costs, self.dense, strict=True)]

    @torch.no_grad()
    def step(self) -> float:
        """One controller step after an optimizer step; returns the measured cost fraction."""
        if self.steps + 1 in self._time_checks:
            self.retarget()
        return self._step()

    # -- a budget in time ----------------------------------------------------------------------
    @torch.no_grad()
    def predicted_time(self) -> float:
        """The GBLR layers' predicted deployed time (each packed for :attr:`tokens`) as a
        fraction of the dense layers' (``cost="time"`` only)."""
        if self.cost != "time":
            raise ValueError('predicted_time() needs a controller with cost="time"')
        total = sum(deployed_seconds(layer, self.tokens, self.times) for _, layer in self.layers)
        return total / self._dense_seconds

    @torch.no_grad()
    def retarget(self) -> float:
        """Re-derive the MAC target from the predicted time of the structure now: the MAC
        fraction times the time budget over the predicted time fraction (kept above the
        floor and at most 1). Returns the new MAC target."""
        mac, time_now = self.measure(), self.predicted_time()
        wanted = mac * self.budget / max(time_now, 1e-12)
        self.target = float(min(1.0, max(self._lowest_target(), wanted)))
        return self.target

    def _lowest_target(self) -> float:
        """The least MAC target time mode sets: just above the floor."""
        return self.floor + 1e-3 * (self.budget - self.floor)

    def _step(self) -> float:
        self.steps += 1
        for _, layer in self.layers:
            layer.locations.remainder_(1.0)
        near = abs(self.cost_fraction - self.target) <= 0.05 * self.target
        if near or self.steps % self.measure_every == 0:
            self._costs = self._measure()
        cost = self.cost_fraction
        ref = self.reference(self.steps)
        err = (cost - ref) / ref
        self.lam *= math.exp(self.gain * max(-1.0, min(1.0, 10.0 * err)))
        if cost < self.target * (1.0 - self.tolerance):
            return self._regrow()
        if cost <= ref:
            return cost
        amount = self.lam * self._lr()
        shrinkable = self._shrinkable()
        before = self._snapshot()
        lowest = self.target * (1.0 - self.tolerance)

        weights = self._weights()

        def apply(scale: float) -> float:
            self._shrink_from(before, [amount * scale * w if s else 0.0
                                       for s, w in zip(shrinkable, weights, strict=True)])
            self._costs = self._measure()
            return self.cost_fraction

        cost = apply(1.0)
        if cost < lowest:
            # apply(lo) stays >= target, apply(hi) undershoots
            lo, _ = bisect(lambda t: apply(t) >= self.target, 0.0, 1.0, 12)
            cost = apply(lo)
        # a layer pushed under its floor keeps its previous widths
        restored = False
        pairs = zip(self.layers, self._costs, self.dense, strict=True)
        for i, ((_, layer), c, d) in enumerate(pairs):
            if shrinkable[i] and c < self.floor * d:
                layer.widths.copy_(before[i])
                restored = True
        if restored:
            self._costs = self._measure()
        return self.cost_fraction

    @torch.no_grad()
    def _regrow(self) -> float:
        """Undo an undershoot caused by the gradient step: the smallest uniform growth of the
        widths of the components that are on that brings the cost back to the target."""
        before = self._snapshot()
        # only components that are still on grow; components that were switched off stay off
        alive = [(w > 0).all(dim=0, keepdim=True).to(w.dtype) for w in before]

        def apply(amount: float) -> float:
            self._shrink_from(before, [-amount * a for a in alive])
            self._costs = self._measure()
            return self.cost_fraction

        if apply(1.0) < self.target:
            # even full width is below the target: nothing to steer
            self._warn_collapse("the components that are still on cannot regrow to it")
            return self.cost_fraction
        # cost(lo) < target <= cost(hi)
        _, hi = bisect(lambda t: apply(t) < self.target, 0.0, 1.0, 20)
        return apply(hi)

    @torch.no_grad()
    def enforce(self) -> float:
        """Make the cost ``<= target`` with the smallest uniform width shrink; return the cost.

        Each layer's shrink is capped where it would go under its floor. Raises
        ``RuntimeError`` if the floors make the target unreachable. With ``cost="time"``
        the MAC target is then lowered to the largest (to 1e-3 of the way from the cost
        with every layer at its floor) whose enforced structure is predicted to run within
        the time budget; the MAC cost is returned, :meth:`predicted_time` gives the time.
        """
        if self.cost != "time":
            return self._enforce_macs()
        start, mac_target = self._snapshot(), self.target
        self._enforce_macs()
        if self.predicted_time() <= self.budget:
            return self.cost_fraction  # enforce() only shrinks
        before, top = self._snapshot(), self.cost_fraction
        caps = [self._layer_cap(i, layer, before[i]) for i, (_, layer) in enumerate(self.layers)]
        self._shrink_from(before, caps)
        bottom = self.measure()  # every layer at its floor
        at_floor = self.predicted_time()
        if at_floor > self.budget:
            for (_, layer), w in zip(self.layers, start, strict=True):
                layer.widths.copy_(w)
            self.target = mac_target
            self.measure()
            raise RuntimeError(
                f"cannot meet the time budget {self.budget} at {self.tokens} tokens: with "
                f"every layer at its floor ({self.floor} of dense MACs) the predicted time is "
                f"{at_floor:.4f} of dense")

        def fits(mac_target: float) -> bool:
            self._shrink_from(before, [0.0] * len(before))
            self.target = mac_target
            self._enforce_macs()
            return self.predicted_time() <= self.budget

        # fits(lo) holds, fits(hi) does not; ten halvings: 1e-3 of the range
        lo, _ = bisect(fits, bottom, top, 10)
        fits(lo)
        return self.cost_fraction

    def _enforce_macs(self) -> float:
        for _, layer in self.layers:
            layer.locations.remainder_(1.0)
            layer.widths.clamp_(0, 1)
        if self.measure() <= self.target:
            # below the tolerance, unless a previous enforce() left it there (its shrink
            # stops at the largest reachable cost under the target)
            low = self.cost_fraction < self.target * (1.0 - self.tolerance)
            if low and self.cost_fraction != self._enforced:
                self._warn_collapse("enforce() only shrinks")
            self._check_blur()
            self._enforced = self.cost_fraction
            return self.cost_fraction
        before = self._snapshot()
        caps = []
        for i, (_, layer) in enumerate(self.layers):
            caps.append(self._layer_cap(i, layer, before[i]))

        def apply(amount: float) -> float:
            self._shrink_from(before, [min(amount, cap) for cap in caps])
            return self.measure()

        if apply(1.0) > self.target:
            self._shrink_from(before, [0.0] * len(before))
            self.measure()
            raise RuntimeError(
                f"cannot meet target={self.target}: with every layer at its floor "
                f"({self.floor} of dense) the cost is still above it"
            )
        # cost(lo) > target >= cost(hi)
        _, hi = bisect(lambda t: apply(t) > self.target, 0.0, 1.0, 30)
        cost = apply(hi)
        self._check_blur()
        self._enforced = cost
        return cost

    @torch.no_grad()
    def evaluated_cost(self) -> float:
        """The cost of the layers as they evaluate now (their ``macs()`` at their current
        ``sigma``), as a fraction of the dense cost. It equals :attr:`cost_fraction` once the
        masks are sharp (``sigma=None``); a blurred mask has more entries above the
        evaluation threshold, so it costs more until ``sigma`` is annealed away."""
        return sum(layer.macs() for _, layer in self.layers) / self.dense_total

    def _check_reachable(self) -> None:
        """Warn when even full-width components cost less than the target: the layers have
        too few components (``K r``, e.g. a small ``rank_fraction``) for the budget."""
        ceiling = sum(layer.sharp_macs(torch.ones_like(layer.widths))
                      for _, layer in self.layers) / self.dense_total
        if self.target > ceiling * (1.0 + self.tolerance):
            warnings.warn(
                f"target={self.target} is above what these GBLR layers cost with every "
                f"component at full width ({ceiling:.4f} of dense): the cost cannot reach "
                "it. Give the layers more components (num_components, or a larger "
                "rank_fraction) or lower the budget.",
                RuntimeWarning, stacklevel=_outside_stacklevel(),
            )

    def _warn_collapse(self, why: str) -> None:
        active = sum(int(layer.active_components().sum()) for _, layer in self.layers)
        total = sum(layer.num_components for _, layer in self.layers)
        warnings.warn(
            f"GBLR cost {self.cost_fraction:.4f} of dense is below target={self.target} "
            f"(tolerance {self.tolerance}) and {why}: {active} of {total} components are on. "
            "The structure learning rate (or lam) is probably too large for this run.",
            RuntimeWarning, stacklevel=_outside_stacklevel(),
        )

    def _check_blur(self) -> None:
        """Warn when the layers evaluate at more than the enforced (sharp) cost because their
        masks are still blurred by a low-pass ``sigma``."""
        blurred = [name for name, layer in self.layers if layer.sigma is not None]
        if blurred:
            evaluated = self.evaluated_cost()
            if evaluated > self.target * (1.0 + self.tolerance):
                warnings.warn(
                    f"{len(blurred)} GBLR layer(s) still have a low-pass sigma (e.g. "
                    f"{blurred[0]!r}, sigma={self.layers[0][1].sigma}): their sharp cost is "
                    f"{self.cost_fraction:.4f} of dense, but they evaluate at "
                    f"{evaluated:.4f}. Anneal sigma to None (gblr.SigmaSchedule) or set "
                    "layer.sigma = None before evaluating.",
                    RuntimeWarning, stacklevel=_outside_stacklevel(),
                )

    def _layer_cap(self, index: int, layer: GBLRLinear, widths: torch.Tensor) -> float:
        """Largest uniform shrink that keeps layer ``index`` at or above its floor."""
        limit = self.floor * self.dense[index]

        def cost(amount: float) -> int:
            return layer.sharp_macs((widths - amount).clamp(0, 1))

        if self.floor == 0.0 or cost(1.0) >= limit:
            return 1.0
        if cost(0.0) < limit:
            return 0.0
        lo, _ = bisect(lambda t: cost(t) >= limit, 0.0, 1.0, 30)  # cost(lo) >= limit > cost(hi)
        return lo

    # -- checkpointing ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The controller's state (step count, ``lam``, initial cost) for resuming."""
        return {
            "steps": self.steps,
            "lam": self.lam,
            "initial_cost": self.initial_cost,
            "target": self.budget,
            "total_steps": self.total_steps,
            "weighting": self.weighting,
            "cost": self.cost,
            "mac_target": self.target,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; the cost is re-measured from the (restored) model."""
        missing = {"steps", "lam", "initial_cost"} - set(state)
        if missing:
            raise KeyError(f"controller state lacks {sorted(missing)}")
        mine = {"target": self.budget, "total_steps": self.total_steps,
                "weighting": self.weighting, "cost": self.cost}
        differ = {k: (state[k], v) for k, v in mine.items() if k in state and state[k] != v}
        if differ:
            detail = ", ".join(f"{k}={a!r} (this controller: {b!r})"
                               for k, (a, b) in differ.items())
            raise ValueError(f"controller state was saved for another run: {detail}")
        self.steps = int(state["steps"])
        self.lam = float(state["lam"])
        self.initial_cost = float(state["initial_cost"])
        self.target = float(state.get("mac_target", self.budget))
        self.measure()

    def __repr__(self) -> str:
        return (
            f"BudgetController(target={self.target}, total_steps={self.total_steps}, "
            f"reach={self.reach}, floor={self.floor}, layers={len(self.layers)}, "
            f"cost={self.cost_fraction:.4f}, evaluated={self.evaluated_cost():.4f}, "
            f"lam={self.lam:.4g})"
        )

