"""The command-line options of a compression job, each defined once.

``gblr compress`` and ``python -m gblr.bench.compress`` build their parsers from these
tables, so a flag has one name, one meaning and one default:

- :data:`CONFIG_OPTIONS` maps flags to :class:`~gblr.convert.config.CompressionConfig`
  fields; their defaults are read from the dataclass (or from a named preset, ``--preset``)
  when the parser is built, never written here.
- :data:`RUN_OPTIONS` are the rest of the job: layer selection, distillation (steps, time,
  batches, loss, learning rates, precision), calibration sampling, held-out evaluation,
  device and output switches. Their defaults are written here once (the distillation
  recipe's in :mod:`gblr.convert.distill`).

A caller may change a few defaults (``defaults=`` of :func:`add_options`); names it does not
know are an error, so such overrides stay visible and cannot drift.
"""

from __future__ import annotations

import argparse
import math
import textwrap
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gblr.convert.config import ALLOCATIONS, CALIBRATION_MODES, PRESETS, CompressionConfig
from gblr.convert.distill import (
    DEFAULT_LOSS,
    DEFAULT_LR,
    DEFAULT_PRECISION,
    DEFAULT_STEPS,
    DEFAULT_STRUCTURE_LR,
    LOSSES,
    PRECISIONS,
)

__all__ = [
    "Option",
    "CONFIG_OPTIONS",
    "RUN_OPTIONS",
    "FIELDS_WITHOUT_DEFAULT_FLAG",
    "SHORT_RUN_FRACTION",
    "add_options",
    "add_preset_option",
    "config_defaults",
    "config_changes",
    "check_args",
    "distill_limits",
    "parse_with_preset",
    "preset_epilog",
    "time_bound_warning",
]

#: A run that a time limit ended before this fraction of its step count gets a warning.
SHORT_RUN_FRACTION = 0.5


@dataclass(frozen=True)
class Option:
    """One command-line flag: its name, help and default (or the config field it sets).

    ``field`` names the :class:`CompressionConfig` field a config option sets (its default
    is the field's); ``minimum`` is the smallest value :func:`check_args` accepts;
    ``default_text`` is shown in the help instead of the default value.
    """

    flag: str
    help: str
    default: Any = None
    type: Callable[[str], Any] | None = None
    choices: Sequence[Any] | None = None
    action: Any = None
    nargs: str | None = None
    metavar: str | None = None
    field: str | None = None
    minimum: float | None = None
    default_text: str | None = None

    @property
    def dest(self) -> str:
        return self.flag.removeprefix("--").replace("-", "_")


#: Flags that set :class:`CompressionConfig` fields; defaults come from the dataclass.
CONFIG_OPTIONS: tuple[Option, ...] = (
    Option("--structure", "structure name (gblr, lowrank, monarch, blr, blocksparse, "
           "blockdiag)", field="structure"),
    Option("--budget", "fraction of the targeted layers' dense cost, in (0, 1]", type=float,
           field="budget"),
    Option("--allocation", "how the budget is split among layers: 'sensitivity' (least "
           "summed change of the model's output, measured layer by layer on the training "
           "text; about 2 min for MiniLM), 'uniform' (every layer at the budget) or 'global' "
           "(least summed weight error)", choices=ALLOCATIONS, field="allocation"),
    Option("--calibrate", "data-aware projection from activations on the training data "
           "(--no-calibrate projects the weights alone)", action=argparse.BooleanOptionalAction,
           field="calibration"),
    Option("--calibration-mode", "'inputs': the original model's activations, in one pass; "
           "'sequential': layer by layer, each fitted to the original model's outputs from "
           "the inputs it sees in the partly compressed model (closer right after projection, "
           "slower; needs --allocation uniform)", choices=CALIBRATION_MODES,
           field="calibration_mode"),
    Option("--search-steps", "steps of GBLR's structure search at projection (0: its "
           "(whitened) SVD start, which distillation then reshapes; e.g. 30 searches, "
           "100-150 s per 384x384 layer on 2 cores)", type=int, field="steps", minimum=0),
    Option("--embeddings", "factorize the input token embedding too, at --embedding-budget "
           "of its parameters (--no-embeddings keeps it whole)",
           action=argparse.BooleanOptionalAction, field="embeddings"),
    Option("--embedding-budget", "fraction in (0, 1] of the token embedding's parameters to "
           "keep (default: --budget)", type=float, field="embedding_budget"),
)

#: :class:`CompressionConfig` fields without a flag whose default is the field's, and why.
FIELDS_WITHOUT_DEFAULT_FLAG: dict[str, str] = {
    "target_modules": "--targets; its default depends on the model (all-linear without an "
                      "unused pooler)",
    "exclude_modules": "--exclude; see --targets",
    "overrides": "per-pattern settings: in a --config FILE",
    "projection": "structure options: in a --config FILE",
}

#: The other options of a compression job (not config fields), with their defaults.
RUN_OPTIONS: tuple[Option, ...] = (
    Option("--targets", "layers to compress: names, suffixes or 're:<regex>'", nargs="+",
           metavar="PATTERN", default_text="all-linear, without an unused pooler"),
    Option("--exclude", "layers to leave dense", nargs="+", metavar="PATTERN",
           default_text="none besides an unused pooler"),
    # distillation
    Option("--steps", "distillation steps; 0 skips distillation", type=int, minimum=0,
           default_text=f"{DEFAULT_STEPS}, reproducible on any machine; none when only "
           "--minutes is given"),
    Option("--minutes", "distillation time limit in minutes of training time (held-out "
           "evaluations not counted); given alone it is the only limit, so the result then "
           "depends on the machine's speed and load; with --steps the first limit reached "
           "ends the run; 0 skips distillation", type=float, minimum=0,
           default_text="none: bounded by --steps"),
    Option("--batch-size", "passages (or images) per distillation step", type=int, default=32,
           minimum=1),
    Option("--distill-length", "tokens per passage while distilling (each passage's first "
           "ones: batches pad to their longest passage, so short windows waste less)",
           type=int, default=32, minimum=1),
    Option("--loss", "distillation target: every hidden state, the mean-pooled embedding, or "
           "both", choices=LOSSES, default=DEFAULT_LOSS),
    Option("--lr", "peak learning rate of the distillation (warm-up, then cosine decay)",
           type=float, default=DEFAULT_LR, minimum=0),
    Option("--structure-lr", "learning rate of GBLR widths and locations during distillation "
           "(0 keeps the structure fixed); the budget is held by gblr.BudgetController",
           type=float, default=DEFAULT_STRUCTURE_LR, minimum=0),
    Option("--precision", "arithmetic of the distillation's forward passes (auto: bfloat16 "
           "autocast where the CPU or GPU has native bfloat16, else float32)",
           choices=PRECISIONS, default=DEFAULT_PRECISION),
    # calibration and evaluation data
    Option("--max-length", "tokens per passage for calibration and evaluation", type=int,
           default=128, minimum=1),
    Option("--calibration-batches", "batches of training passages (or images) for the "
           "data-aware projection and the sensitivity split", type=int, default=8, minimum=1),
    Option("--calibration-batch-size", "passages (or images) per calibration batch", type=int,
           default=16, minimum=1),
    Option("--eval-passages", "held-out passages for cosine and neighbour agreement",
           type=int, default=400, minimum=1),
    Option("--eval-every", "also measure the held-out quality every N distillation steps "
           "(not counted in --minutes): printed, kept in the results, drawn as a curve",
           type=int, metavar="N", minimum=1, default_text="only before and after"),
    # the run
    Option("--seed", "random seed of data order and initialisation", type=int, default=0),
    Option("--device", "torch device: auto (cuda when present, else cpu), cpu, cuda, "
           "cuda:1...", default="auto"),
    Option("--threads", "torch CPU threads (1 by default: many small operations hold up best "
           "on one thread when other jobs share the cores)", type=int, minimum=1, default=1),
    Option("--no-speed", "skip timing the deployed model against the dense one (one thread, "
           "1x128 and 32x128 tokens; images: a batch of 8)", action="store_true",
           default=False),
    Option("--no-plot", "skip the pictures", action="store_true", default=False),
    Option("--quiet", "no progress bars", action="store_true", default=False),
)


def config_defaults(preset: str | None = None) -> dict[str, Any]:
    """The field values of ``CompressionConfig.preset(preset)`` (the plain defaults if None)."""
    if preset is None:
        return CompressionConfig.field_defaults()
    config = CompressionConfig.preset(preset)
    return {name: getattr(config, name) for name in CompressionConfig.field_defaults()}


def _shown(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list | tuple):
        return " ".join(str(v) for v in value)
    return str(value)


def add_options(
    parser: argparse.ArgumentParser | Any,
    options: Iterable[Option],
    defaults: Mapping[str, Any] | None = None,
    skip: Iterable[str] = (),
    preset: str | None = None,
) -> None:
    """Add ``options`` to ``parser`` (or an argument group), except the dests in ``skip``.

    A config option's default is its field's in ``CompressionConfig`` (or in ``preset``);
    ``defaults`` (dest -> value) replaces defaults, and naming a dest that is not among the
    options added is an error. Every help text ends with the default in force.
    """
    options = [o for o in options if o.dest not in set(skip)]
    defaults = dict(defaults or {})
    unknown = sorted(set(defaults) - {o.dest for o in options})
    if unknown:
        raise ValueError(f"default overrides for unknown options: {unknown}")
    fields = config_defaults(preset)
    for o in options:
        default = fields[o.field] if o.field is not None else o.default
        overridden = o.dest in defaults
        if overridden:
            default = defaults[o.dest]
        text = (o.default_text if o.default_text is not None and not overridden
                else _shown(default))
        kwargs: dict[str, Any] = {"default": default, "help": f"{o.help} (default: {text})"}
        if o.action is not None:
            kwargs["action"] = o.action
        for name in ("type", "choices", "nargs", "metavar"):
            if getattr(o, name) is not None:
                kwargs[name] = getattr(o, name)
        parser.add_argument(o.flag, **kwargs)


def preset_epilog() -> str:
    """The presets, one paragraph each, for a parser's epilog (``--help``)."""
    lines = ["presets (--preset NAME; explicit options override a preset's settings):"]
    for name, (text, changes) in PRESETS.items():
        sets = ", ".join(f"{k}={v!r}" for k, v in changes.items()) or "the defaults"
        lines += textwrap.wrap(f"{name}: {text} [{sets}]", width=88,
                               initial_indent="  ", subsequent_indent="      ")
    return "\n".join(lines)


def add_preset_option(parser: argparse.ArgumentParser) -> None:
    """``--preset NAME``: the defaults of the config options from a named recipe."""
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="a named compression recipe (listed below) whose settings become "
                        "the defaults of the config options (default: the plain defaults, "
                        "which are the preset 'fast')")


def parse_with_preset(
    build: Callable[[str | None], argparse.ArgumentParser], argv: Sequence[str] | None
) -> argparse.Namespace:
    """Parse ``argv`` with ``build(preset)``, ``preset`` being the ``--preset`` in ``argv``.

    A first, lenient pass reads ``--preset`` only; an unknown name is left to the real
    parser to reject.
    """
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--preset", default=None)
    known, _ = first.parse_known_args(argv)
    preset = known.preset if known.preset in PRESETS else None
    return build(preset).parse_args(argv)


def config_changes(args: argparse.Namespace) -> dict[str, Any]:
    """``{field: value}`` of the config options present in ``args``."""
    return {o.field: getattr(args, o.dest) for o in CONFIG_OPTIONS
            if o.field is not None and hasattr(args, o.dest)}


def check_args(args: argparse.Namespace, options: Iterable[Option]) -> str | None:
    """The first problem with the values in ``args`` of ``options`` (None: all fine)."""
    for o in options:
        value = getattr(args, o.dest, None)
        if value is None or o.minimum is None:
            continue
        if isinstance(value, float) and not math.isfinite(value):
            return f"{o.flag} must be a finite number, got {value}"
        if value < o.minimum:
            return f"{o.flag} must be >= {o.minimum:g}, got {value:g}"
    return None


def distill_limits(steps: int | None, minutes: float | None) -> tuple[int | None, float | None]:
    """``(steps, minutes)`` bounding a distillation, from ``--steps`` and ``--minutes``.

    Neither given: :data:`~gblr.convert.distill.DEFAULT_STEPS` steps and no time limit, so
    a run is the same on any machine. ``--minutes`` alone: the time limit only. Both: both,
    the first reached ending the run. A 0 in either means no distillation.
    """
    if steps is None and minutes is None:
        return DEFAULT_STEPS, None
    return steps, minutes


def time_bound_warning(steps_done: int, steps: int | None, minutes: float | None) -> str | None:
    """A warning when a time limit ended a distillation after few steps, else None.

    "Few": under :data:`SHORT_RUN_FRACTION` of the run's step bound (or, without one, of
    :data:`~gblr.convert.distill.DEFAULT_STEPS`). Such a run's quality depends on how fast
    and how busy the machine was.
    """
    if not minutes or minutes <= 0:
        return None
    wanted = steps if steps else DEFAULT_STEPS
    if steps_done >= SHORT_RUN_FRACTION * wanted:
        return None
    return (f"the {minutes:g}-minute time limit ended distillation after {steps_done} steps, "
            f"under {SHORT_RUN_FRACTION:.0%} of {wanted}: the result depends on this "
            f"machine's speed and load; --steps {wanted} without --minutes gives the "
            "same run everywhere")
