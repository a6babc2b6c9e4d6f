"""Fine-tuning after projection: distil the compressed model towards the dense teacher.

The student learns its factors and, for GBLR layers, its structure (widths and
locations); after every optimizer step :class:`gblr.BudgetController` holds the
measured cost of the GBLR layers at the budget (shrinking widths when a step grew
them, regrowing them when it undershot), and its ``enforce()`` makes the final cost
exact. The learning rate warms up and then follows a cosine to the end of the run,
measured in steps or in wall-clock time, whichever limit is closer. Forward passes may
run in bfloat16 autocast (``precision``), which on CPUs with native bfloat16 matrix
instructions makes a step about 1.5x faster; weights, optimizer and loss stay float32.
An ``evaluate`` function records a held-out learning curve, its time kept off the clock.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gblr.convert.evaluate import last_hidden, mean_pool
from gblr.core.budget import check_budget, fits
from gblr.core.progress import progress as progress_bar
from gblr.core.validate import check_positive
from gblr.layers.base import StructuredLinear
from gblr.layers.conv import GBLRConv2d
from gblr.layers.gblr import GBLRLinear
from gblr.train.controller import BudgetController
from gblr.train.groups import adamw, gblr_layers, param_groups, structure_parameters

__all__ = [
    "DistillResult",
    "distill",
    "Evaluator",
    "structured_cost",
    "lr_factor",
    "LOSSES",
    "SCHEDULES",
    "PRECISIONS",
    "autocast_dtype",
    "precision_name",
    "DEFAULT_STEPS",
    "DEFAULT_LR",
    "DEFAULT_STRUCTURE_LR",
    "DEFAULT_LOSS",
    "DEFAULT_PRECISION",
]

#: A held-out measure of the student, called by :func:`distill` (``evaluate=``): takes the
#: model, returns named numbers (e.g. ``{"cosine": 0.93}``).
Evaluator = Callable[[nn.Module], Mapping[str, float]]

#: What the student matches: every hidden state, the mean-pooled embedding, or both.
LOSSES = ("hidden", "embedding", "both")
#: Learning-rate schedules of :func:`distill`.
SCHEDULES = ("constant", "cosine")
#: Arithmetic of the forward passes of :func:`distill` ("auto": bfloat16 where it is fast).
PRECISIONS = ("auto", "float32", "bfloat16")

# The distillation recipe: the defaults of :func:`distill` and, through
# ``gblr.convert.options``, of ``gblr compress`` and the compression benchmark.
#: Optimizer steps of a run bounded by steps (the default bound of ``gblr compress``: what a
#: 2-minute run reached on an idle 2-core CPU, reproducible on any machine).
DEFAULT_STEPS = 200
#: Peak learning rate of the student's factors.
DEFAULT_LR = 3e-4
#: Learning rate of GBLR widths and locations.
DEFAULT_STRUCTURE_LR = 1e-3
#: What the student matches (see ``LOSSES``).
DEFAULT_LOSS = "both"
#: Arithmetic of the forward passes (see ``PRECISIONS``).
DEFAULT_PRECISION = "auto"


def _fast_bf16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bfloat16 matrices natively (faster than float32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)
    return False


def autocast_dtype(precision: str, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype of ``precision`` on ``device`` (None: plain float32).

    ``"auto"`` picks bfloat16 on a GPU that supports it and on CPUs with native bfloat16
    instructions (AVX512-BF16 or AMX), where it is faster; elsewhere bfloat16 would be
    emulated and slower, so it stays float32.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    device = torch.device(device)
    if precision == "bfloat16" or (precision == "auto" and _fast_bf16(device)):
        return torch.bfloat16
    return None


def precision_name(precision: str, device: torch.device | str) -> str:
    """``"bfloat16"`` or ``"float32"``: what ``precision`` resolves to on ``device``."""
    return "float32" if autocast_dtype(precision, device) is None else "bfloat16"


@contextlib.contextmanager
def _eager_attention(models: Sequence[nn.Module]) -> Iterator[None]:
    """Hugging Face models use their plain ("eager") attention inside the block.

    PyTorch's fused CPU attention has a slow bfloat16 backward pass (several times the
    float32 time); the eager path is a pair of matrix products, fast in bfloat16. The
    models' own setting is restored on exit.
    """
    changed = []
    try:
        for model in models:
            config = getattr(model, "config", None)
            impl = getattr(config, "_attn_implementation", None)
            if impl == "sdpa" and hasattr(model, "set_attn_implementation"):
                model.set_attn_implementation("eager")
                changed.append((model, impl))
        yield
    finally:
        for model, impl in changed:
            model.set_attn_implementation(impl)


def structured_cost(model: nn.Module) -> tuple[int, int]:
    """``(cost, dense cost)`` in MACs per token of the model's structured layers (eval mode)."""
    layers = [m for m in model.modules() if isinstance(m, StructuredLinear)]
    return sum(int(m.macs()) for m in layers), sum(m.dense_macs() for m in layers)


def lr_factor(progress: float, schedule: str, warmup: float) -> float:
    """Learning-rate multiplier at ``progress`` in ``[0, 1]`` of the run.

    ``"constant"``: 1. ``"cosine"``: linear warm-up from 0.1 over the first ``warmup``
    fraction, then a cosine from 1 down to 0.05 at the end.
    """
    if schedule == "constant":
        return 1.0
    p = min(1.0, max(0.0, float(progress)))
    if p < warmup:
        return 0.1 + 0.9 * p / warmup
    t = (p - warmup) / max(1e-12, 1.0 - warmup)
    return 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * t))


def _controller(
    student: nn.Module, budget: float, dense: int, fixed_cost: int, steps: int | None
) -> BudgetController | None:
    """The controller of the GBLR layers' share of the budget (None without GBLR layers)."""
    layers = list(gblr_layers(student))
    if not layers:
        return None
    gblr_dense = sum(m.dense_macs() for _, m in layers)
    target = (budget * dense - fixed_cost) / gblr_dense
    if target <= 0:
        raise ValueError(
            f"budget={budget} is used up by the structured layers that are not GBLR "
            f"({fixed_cost} of {dense} MACs/token): nothing is left for the GBLR layers"
        )
    return BudgetController(student, target=min(1.0, target), total_steps=steps or 1,
                            floor=0.0)


def _progress(step: int, steps: int | None, seconds: float, minutes: float | None) -> float:
    """How far the run is, in ``[0, 1]``: by steps or by time (``seconds`` of training so
    far), whichever limit is closer."""
    done = 0.0 if steps is None else step / steps
    if minutes is not None:
        done = max(done, seconds / (60.0 * float(minutes)))
    return done


class _Stopwatch:
    """Training time: wall-clock time since the start, less the time spent evaluating."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.paused = 0.0

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start - self.paused

    @contextlib.contextmanager
    def pause(self) -> Iterator[None]:
        begin = time.perf_counter()
        try:
            yield
        finally:
            self.paused += time.perf_counter() - begin


def _evaluate(student: nn.Module, evaluate: Evaluator) -> dict[str, float]:
    """``evaluate(student)`` with every module's train/eval mode put back afterwards."""
    modes = [(m, m.training) for m in student.modules()]
    try:
        return {k: float(v) for k, v in evaluate(student).items()}
    finally:
        for m, mode in modes:
            m.training = mode


def _outputs(model: nn.Module, batch: dict[str, torch.Tensor], hidden: bool,
             device: torch.device, dtype: torch.dtype | None) -> Any:
    extra = {"output_hidden_states": True} if hidden else {}
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        return model(**batch, **extra)


def _matching_depths(states: Sequence[torch.Tensor], n: int) -> Sequence[torch.Tensor]:
    """The teacher's layer outputs that a student with ``n`` layers matches: all of them at
    equal depth; for a shallower student (layers dropped), ``n`` evenly spaced ones ending
    at the last (student layer ``j`` of ``n`` matches teacher layer ``j * m // n`` of ``m``)."""
    m = len(states)
    if n == m:
        return states
    if not 0 < n < m:
        raise ValueError(f"the student has {n} hidden states to match and the teacher {m}: "
                         "a student may have fewer layers than its teacher, not more")
    return [states[(j * m) // n - 1] for j in range(1, n + 1)]


def _loss(student: Any, teacher: Any, mask: torch.Tensor, kind: str) -> torch.Tensor:
    terms = []
    if kind in ("hidden", "both"):
        s_states = getattr(student, "hidden_states", None) or (last_hidden(student),)
        t_states = getattr(teacher, "hidden_states", None) or (last_hidden(teacher),)
        m = mask.unsqueeze(-1).float()
        s_states = s_states[1:] or s_states  # the layers' outputs, not the embeddings
        t_states = _matching_depths(t_states[1:] or t_states, len(s_states))
        per_layer = [
            (((s.float() - t.float()) ** 2) * m).sum()
            / (((t.float() ** 2) * m).sum().clamp_min(1e-12))
            for s, t in zip(s_states, t_states, strict=True)
        ]
        terms.append(torch.stack(per_layer).mean())
    if kind in ("embedding", "both"):
        s_emb = mean_pool(last_hidden(student).float(), mask)
        t_emb = mean_pool(last_hidden(teacher).float(), mask)
        terms.append((1.0 - F.cosine_similarity(s_emb, t_emb, dim=1)).mean())
    return torch.stack(terms).sum()


@dataclass
class DistillResult:
    """What a distillation run did: steps, time, losses and cost at the end."""

    steps: int
    seconds: float
    losses: list[float] = field(default_factory=list)
    cost: int = 0
    dense_cost: int = 0
    #: what ``evaluate`` measured during the run: dicts with ``step``, ``seconds`` (training
    #: time so far) and the evaluator's numbers; the last one is the final model.
    curve: list[dict[str, float]] = field(default_factory=list)

    @property
    def cost_fraction(self) -> float:
        return self.cost / self.dense_cost if self.dense_cost else 0.0


def distill(
    student: nn.Module,
    teacher: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    steps: int | None = None,
    minutes: float | None = None,
    budget: float | None = None,
    loss: str = DEFAULT_LOSS,
    lr: float = DEFAULT_LR,
    structure_lr: float = DEFAULT_STRUCTURE_LR,
    weight_decay: float = 0.0,
    schedule: str = "cosine",
    warmup: float = 0.05,
    precision: str = DEFAULT_PRECISION,
    evaluate: Evaluator | None = None,
    eval_every: int | None = None,
    progress: bool = True,
) -> DistillResult:
    """Train ``student`` to reproduce ``teacher`` on text batches, holding the budget.

    ``batches`` yields dicts of model inputs (text with an ``attention_mask``, or
    ``pixel_values`` for image models). Runs ``steps``
    optimizer steps, or as many as fit in ``minutes`` (the first limit reached when both
    are given). ``loss`` picks the target: normalised error of every hidden state,
    ``1 - cosine`` of mean-pooled embeddings, or their sum. Dropout is off. All student
    parameters train (learning rate ``lr``, warm-up and cosine decay with ``schedule=
    "cosine"``); GBLR widths and locations in their own group (Adam betas ``(0, 0.999)``,
    no weight decay, ``structure_lr``; ``structure_lr=0`` keeps the structure fixed).
    ``budget`` (default: the student's cost fraction at the start) covers all structured
    layers (a student without any, such as a dense model with fewer layers, trains all its
    parameters and takes no budget); the GBLR layers' share of it is held after every step by a
    :class:`gblr.BudgetController` and met exactly at the end (a student above it is first
    shrunk onto it). ``precision`` (see :func:`autocast_dtype`) sets the arithmetic of the
    forward passes; with bfloat16, Hugging Face models use eager attention while they train.
    ``evaluate`` measures the student (on held-out data, say) before the first step, every
    ``eval_every`` steps if given, and at the end, into ``DistillResult.curve``; the time it
    takes is not counted against ``minutes`` nor in ``DistillResult.seconds``.
    The defaults of ``loss``, ``lr``, ``structure_lr`` and ``precision`` are the recipe's
    (``DEFAULT_*`` above), which ``gblr compress`` uses too.
    """
    if steps is None and minutes is None:
        raise ValueError("give steps or minutes (or both) to bound the distillation")
    if steps is not None:
        check_positive("steps", steps)
    if minutes is not None and not (float(minutes) > 0 and math.isfinite(float(minutes))):
        raise ValueError(f"minutes must be a positive number, got {minutes!r}")
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if not 0.0 <= float(warmup) < 1.0:
        raise ValueError(f"warmup must be in [0, 1), got {warmup!r}")
    if eval_every is not None:
        check_positive("eval_every", eval_every)
        if evaluate is None:
            raise ValueError("eval_every needs an evaluate function")
    device = next(student.parameters()).device
    dtype = autocast_dtype(precision, device)
    if not float(structure_lr) >= 0:
        raise ValueError(f"structure_lr must be >= 0, got {structure_lr!r}")
    structured = [m for m in student.modules() if isinstance(m, StructuredLinear)]
    controller = None
    if structured:
        cost0, dense = structured_cost(student)
        budget = cost0 / dense if budget is None else check_budget(budget)
        fixed_cost = sum(int(m.macs()) for m in structured if not isinstance(m, GBLRLinear))
        controller = _controller(student, budget, dense, fixed_cost, steps)
    elif budget is not None:
        raise ValueError("student has no structured layers, so there is no budget to hold: "
                         "compress it first, or distil a dense student with budget=None")
    if controller is not None:
        controller.enforce()
    learn_structure = controller is not None and float(structure_lr) > 0
    frozen = [] if learn_structure else [
        p for p in structure_parameters(student) if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    groups = param_groups(student, lr=lr, weight_decay=weight_decay,
                          structure_lr=structure_lr if learn_structure else None)
    optimizer = adamw(groups)
    for group in optimizer.param_groups:
        group["base_lr"] = group["lr"]

    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    was_training = student.training
    # dropout off (the student should match the teacher's deterministic outputs), while the
    # structured layers train so that components that are off can grow back
    student.eval()
    for m in student.modules():
        if isinstance(m, StructuredLinear | GBLRConv2d):
            m.train()
    limit = None if minutes is None else 60.0 * float(minutes)
    clock = _Stopwatch()
    curve: list[dict[str, float]] = []

    restore = contextlib.ExitStack()

    def train_attention() -> None:
        if dtype is not None and device.type == "cpu":
            restore.enter_context(_eager_attention([teacher, student]))

    def measure(step: int) -> None:
        if evaluate is not None:
            with clock.pause():
                restore.close()  # evaluate with the models' own attention
                curve.append({"step": step, "seconds": clock.seconds,
                              **_evaluate(student, evaluate)})
                train_attention()

    losses: list[float] = []
    iterator: Iterator[dict[str, torch.Tensor]] = iter(batches)
    bar = progress_bar(total=steps, desc="distil", unit="step", disable=not progress)
    want_hidden = loss in ("hidden", "both")
    step = 0
    train_attention()
    try:
        measure(0)
        while (steps is None or step < steps) and (limit is None or clock.seconds < limit):
            try:
                batch = next(iterator)
            except StopIteration:
                break
            batch = {k: v.to(device) for k, v in batch.items()}
            with torch.no_grad():
                t_out = _outputs(teacher, batch, want_hidden, device, dtype)
            s_out = _outputs(student, batch, want_hidden, device, dtype)
            mask = batch.get("attention_mask")
            if mask is None:  # images: every token counts
                mask = torch.ones(last_hidden(t_out).shape[:2], device=device)
            value = _loss(s_out, t_out, mask, loss)
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            factor = lr_factor(_progress(step, steps, clock.seconds, minutes), schedule, warmup)
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * factor
            optimizer.step()
            if learn_structure:
                controller.step()
            losses.append(float(value.detach()))
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            if eval_every is not None and step % eval_every == 0 and step != steps:
                measure(step)  # (the last step is measured below, on the final model)
    finally:
        restore.close()
        bar.close()
        student.train(was_training)
        for p in frozen:
            p.requires_grad_(True)
    seconds = clock.seconds
    if controller is not None:
        controller.enforce()
    cost, dense = structured_cost(student)
    if structured and not fits(cost, budget * dense):
        raise RuntimeError(f"budget not held: cost {cost} > {budget} * {dense}")
    if evaluate is not None:
        if curve and curve[-1]["step"] == step:
            curve.pop()  # a time limit ended the run right after a measurement
        curve.append({"step": step, "seconds": seconds, **_evaluate(student, evaluate)})
    return DistillResult(steps=step, seconds=seconds, losses=losses, cost=cost,
                         dense_cost=dense, curve=curve)
