"""What to compress and how: a JSON-serializable description of one compression job."""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from gblr.core.budget import check_budget
from gblr.layers.base import get_structure

__all__ = [
    "CompressionConfig",
    "PRESETS",
    "ALLOCATIONS",
    "ALL_LINEAR",
    "OVERRIDE_KEYS",
    "REGEX_PREFIX",
    "projection_kwargs",
    "takes_calibration",
]

#: How the overall budget is split among layers.
ALLOCATIONS = ("uniform", "global", "sensitivity")
#: How calibration activations are taken (see :class:`CompressionConfig`).
CALIBRATION_MODES = ("inputs", "sequential")
#: ``target_modules`` value that selects every linear layer except the output head.
ALL_LINEAR = "all-linear"
#: A pattern string that starts with this is a regular expression (full match on the name).
REGEX_PREFIX = "re:"
#: Keys a per-pattern override may set.
OVERRIDE_KEYS = ("structure", "budget", "steps", "calibration", "projection")

# from_dense arguments that compress() fills in itself
_RESERVED = ("weight", "budget", "bias", "calibration", "second_moment", "self", "cls")
# constructor arguments that from_dense's **kwargs must not take (fixed by the weight)
_CTOR_FIXED = ("in_features", "out_features", "bias", "device", "dtype", "self")


def _search_option_names(cls: type) -> set[str] | None:
    """Names of ``gblr.projection.SearchOptions`` when ``cls.from_dense`` runs that search."""
    if getattr(cls, "structure_name", None) != "gblr":
        return None
    try:
        from gblr.projection.search import SearchOptions
    except ImportError:
        return None
    return {f.name for f in fields(SearchOptions)}


def _accepted_options(structure: str) -> tuple[set[str], bool]:
    """Keyword options the structure's projection accepts, and whether it takes calibration."""
    cls = get_structure(structure)
    params = inspect.signature(cls.from_dense).parameters
    names = {n for n, p in params.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    takes_calibration = "calibration" in names or "second_moment" in names
    names -= set(_RESERVED)
    search = _search_option_names(cls)
    if search is not None:  # GBLR's **opts are the structure search's settings
        names |= search
    elif any(p.kind is p.VAR_KEYWORD for p in params.values()):
        ctor = inspect.signature(cls.__init__).parameters
        names |= {
            n
            for n, p in ctor.items()
            if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and n not in _CTOR_FIXED
        }
    return names - set(_RESERVED), takes_calibration


def takes_calibration(structure: str) -> bool:
    """Whether ``structure``'s projection is data-aware (its ``from_dense`` takes activations)."""
    return _accepted_options(structure)[1]


def projection_kwargs(
    structure: str, steps: int | None, calibration: bool, options: dict[str, Any], where: str
) -> dict[str, Any]:
    """Validate projection options for ``structure``; return the keyword arguments to pass.

    ``steps`` goes to structures whose projection is iterative (whose ``from_dense`` takes
    ``steps``: GBLR's structure search) and is left out for the others. ``calibration`` only
    records that data-aware projection is wanted: ``compress`` adds the captured activations
    itself, for the structures whose projection takes them. Unknown options raise a
    ``ValueError`` naming them.
    """
    if not isinstance(options, dict):
        raise TypeError(f"{where}projection must be a dict of options, got {options!r}")
    if not isinstance(calibration, bool):
        raise TypeError(f"{where}calibration must be True or False, got {calibration!r}")
    accepted, _ = _accepted_options(structure)
    kwargs = dict(options)
    for name in options:
        if not isinstance(name, str):
            raise TypeError(f"{where}projection option names must be strings, got {name!r}")
        if name in ("steps", "calibration"):
            raise ValueError(
                f"{where}projection option {name!r}: set it as the config's {name!r} field"
            )
    if steps is not None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"{where}steps must be a non-negative integer, got {steps!r}")
        if "steps" in accepted:
            kwargs["steps"] = steps
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        known = ", ".join(sorted(accepted)) or "none"
        raise ValueError(
            f"{where}unknown projection option(s) {unknown} for structure {structure!r}; "
            f"its from_dense accepts: {known}"
        )
    return kwargs


def _check_pattern(pattern: Any, name: str) -> None:
    if isinstance(pattern, re.Pattern):
        return
    if not isinstance(pattern, str) or not pattern:
        raise TypeError(f"{name} must be a non-empty string or a compiled regex, got {pattern!r}")
    if pattern.startswith(REGEX_PREFIX):
        try:
            re.compile(pattern[len(REGEX_PREFIX):])
        except re.error as err:
            raise ValueError(f"{name}: invalid regular expression {pattern!r}: {err}") from None


def _pattern_to_json(pattern: Any) -> str:
    if isinstance(pattern, re.Pattern):
        return REGEX_PREFIX + pattern.pattern
    return pattern


#: Named recipes: ``name -> (what it is, the fields it sets)``; every other field keeps its
#: default. ``CompressionConfig.preset(name)`` builds one, ``gblr compress --preset NAME`` runs
#: one. The defaults themselves are the recipe ``"fast"``.
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "fast": (
        "the defaults: data-aware projection, budget split by sensitivity, no structure "
        "search (GBLR starts from its whitened SVD, which distillation reshapes)",
        {},
    ),
    "search": (
        "GBLR's structure search at projection (30 steps per layer; data-aware, every layer "
        "at the budget): a closer start before distillation, but about 100-150 s per "
        "384x384 layer on 2 CPU cores",
        {"steps": 30, "allocation": "uniform"},
    ),
    "weights-only": (
        "projection from the weights alone, every layer at the budget, no search: needs no "
        "calibration data",
        {"calibration": False, "allocation": "uniform"},
    ),
}


@dataclass
class CompressionConfig:
    """One compression job: which layers, which structure, what budget, which projection.

    The field defaults are the one set of defaults of a compression job: ``gblr.compress``,
    the ``gblr compress`` command and the compression benchmark all take theirs from here.
    They are the recipe ``"fast"``: data-aware projection (``calibration=True``), the budget
    split by measured sensitivity (``allocation="sensitivity"``) and no structure search
    (``steps=0``), which takes seconds per layer and then leaves the structure to
    distillation. Other recipes are named in :data:`PRESETS` (``CompressionConfig.preset``).

    Changed defaults: before, ``CompressionConfig()`` meant ``allocation="uniform"``,
    ``calibration=False`` and ``steps=None`` (GBLR's structure search, 30 steps: 100-150 s
    per 384x384 layer), while ``gblr compress`` used the recipe above. The defaults now need
    ``calibration_data`` in ``gblr.compress``; without data use
    ``CompressionConfig.preset("weights-only")`` (or ``calibration=False,
    allocation="uniform"``); the old behaviour is ``CompressionConfig.preset("search",
    calibration=False)``. ``steps`` and ``calibration`` now apply to the layers whose
    structure can use them and are left out for the others (they used to be errors there),
    so the defaults suit every structure.

    Attributes:
        structure: registered structure name (``"gblr"``, ``"lowrank"``, ``"monarch"``,
            ``"blr"``, ``"blocksparse"``, ``"blockdiag"``).
        budget: fraction in ``(0, 1]`` of the dense cost of the targeted layers.
        target_modules: ``"all-linear"`` (every ``nn.Linear``/HF ``Conv1D`` except the output
            head), one pattern or a list of patterns, or a callable ``(name, module) -> bool``.
            A pattern is a module name or dotted suffix (``"query"``, ``"attention.self"``), or
            a regular expression written ``"re:<regex>"`` (or a compiled ``re.Pattern``) that
            must match the whole name. A pattern naming a container selects the replaceable
            layers inside it.
        exclude_modules: patterns (same syntax) of layers to leave dense.
        overrides: ``{pattern: {key: value}}`` with keys among ``structure``, ``budget``,
            ``steps``, ``calibration``, ``projection``; applied in order, later ones win.
        allocation: ``"sensitivity"`` (default: the budget split to minimise the summed
            change of the model's output, each layer projected alone at a grid of budgets
            and run on the first calibration batches; needs ``calibration_data``),
            ``"uniform"`` (every layer at its budget) or ``"global"`` (one budget split
            among layers to minimise their summed weight error, with ``gblr.allocate``).
        calibration: data-aware projection from activations captured on calibration data
            (default True; for structures without a data-aware projection, ``blocksparse``
            and ``blockdiag``, the weights alone are projected).
        calibration_mode: ``"inputs"`` (the dense model's layer inputs, captured in one
            pass) or ``"sequential"`` (layer by layer in model order: each layer is fitted
            to reproduce the dense model's output of that layer from the inputs it sees in the
            partly compressed model, so later layers correct the errors of earlier ones; one
            calibration pass per layer and a copy of the model in memory).
        steps: projection steps, for structures whose projection is iterative (GBLR's
            structure search); default 0: GBLR's (whitened) truncated-SVD start. ``None``
            is the structure's own default (30 for GBLR).
        projection: further keyword options of the structure's ``from_dense``.
        embeddings: also factorize the model's input token embedding (``transformers``
            models: ``get_input_embeddings()``) into a :class:`~gblr.layers.LowRankEmbedding`
            holding ``embedding_budget`` of its parameters (default True: in a small
            encoder the embedding holds about half the parameters, and a file that keeps it
            whole cannot shrink much). With ``calibration``, each token's row is weighted
            by how often the calibration text uses it. An embedding that must stay as it
            is (tied or shared, scaled, see ``gblr.convert.embeddings.input_embedding``)
            is left dense, with the reason in the report's ``skipped``.
        embedding_budget: fraction in ``(0, 1]`` of the embedding's parameters to keep;
            ``None`` (default): ``budget``.
    """

    structure: str = "gblr"
    budget: float = 0.5
    target_modules: str | list[Any] | Callable[..., bool] | re.Pattern = ALL_LINEAR
    exclude_modules: list[Any] = field(default_factory=list)
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    allocation: str = "sensitivity"
    calibration: bool = True
    calibration_mode: str = "inputs"
    steps: int | None = 0
    projection: dict[str, Any] = field(default_factory=dict)
    embeddings: bool = True
    embedding_budget: float | None = None

    # -- defaults and presets -------------------------------------------------------------------
    @classmethod
    def field_defaults(cls) -> dict[str, Any]:
        """Every field's default value (fresh copies of the list and dict ones)."""
        out = {}
        for f in fields(cls):
            out[f.name] = f.default_factory() if f.default is MISSING else f.default
        return out

    @classmethod
    def preset(cls, name: str, **changes: Any) -> CompressionConfig:
        """The named recipe of :data:`PRESETS`, with ``changes`` to any field on top."""
        if name not in PRESETS:
            raise ValueError(f"unknown compression preset {name!r}; known: {sorted(PRESETS)}")
        return cls(**{**PRESETS[name][1], **changes})

    def __post_init__(self) -> None:
        self.validate()

    # -- validation ---------------------------------------------------------------------------
    def validate(self) -> None:
        """Check every field; raise a ``ValueError``/``TypeError`` naming the bad one."""
        if not isinstance(self.structure, str):
            raise TypeError(f"structure must be a string, got {self.structure!r}")
        get_structure(self.structure)
        self.budget = check_budget(self.budget)
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {self.allocation!r}")
        if not isinstance(self.calibration, bool):
            raise TypeError(f"calibration must be True or False, got {self.calibration!r}")
        if self.calibration_mode not in CALIBRATION_MODES:
            raise ValueError(
                f"calibration_mode must be one of {CALIBRATION_MODES}, "
                f"got {self.calibration_mode!r}"
            )
        if self.calibration_mode == "sequential" and self.allocation != "uniform":
            raise ValueError(
                "calibration_mode='sequential' fits layers one after another, which "
                f"allocation={self.allocation!r} (one split from all layers at once) cannot "
                "use; pick one (allocation='uniform' with sequential calibration)"
            )
        projection_kwargs(self.structure, self.steps, self.calibration, self.projection, "")
        if not isinstance(self.embeddings, bool):
            raise TypeError(f"embeddings must be True or False, got {self.embeddings!r}")
        if self.embedding_budget is not None:
            self.embedding_budget = check_budget(self.embedding_budget, "embedding_budget")
        targets = self.target_modules
        if isinstance(targets, str | re.Pattern):
            _check_pattern(targets, "target_modules")
        elif isinstance(targets, list | tuple):
            if not targets:
                raise ValueError("target_modules must not be an empty list")
            for i, pattern in enumerate(targets):
                _check_pattern(pattern, f"target_modules[{i}]")
        elif not callable(targets):
            raise TypeError(
                "target_modules must be 'all-linear', a pattern, a list of patterns or a "
                f"callable (name, module) -> bool, got {targets!r}"
            )
        if not isinstance(self.exclude_modules, list | tuple):
            raise TypeError(
                f"exclude_modules must be a list of patterns, got {self.exclude_modules!r}"
            )
        for i, pattern in enumerate(self.exclude_modules):
            _check_pattern(pattern, f"exclude_modules[{i}]")
        if not isinstance(self.overrides, dict):
            raise TypeError(f"overrides must be a dict pattern -> options, got {self.overrides!r}")
        for pattern, opts in self.overrides.items():
            _check_pattern(pattern, "overrides key")
            where = f"overrides[{pattern!r}]: "
            if not isinstance(opts, dict):
                raise TypeError(f"{where}must be a dict of options, got {opts!r}")
            unknown = sorted(set(opts) - set(OVERRIDE_KEYS))
            if unknown:
                raise ValueError(f"{where}unknown key(s) {unknown}; allowed: {list(OVERRIDE_KEYS)}")
            self.layer_settings_from(opts, where)

    def layer_settings_from(self, opts: dict[str, Any], where: str = "") -> dict[str, Any]:
        """The settings of a layer after applying override ``opts`` to this config's defaults."""
        structure = opts.get("structure", self.structure)
        if not isinstance(structure, str):
            raise TypeError(f"{where}structure must be a string, got {structure!r}")
        get_structure(structure)
        budget = check_budget(opts.get("budget", self.budget), f"{where}budget")
        calibration = opts.get("calibration", self.calibration)
        if not isinstance(calibration, bool):
            raise TypeError(f"{where}calibration must be True or False, got {calibration!r}")
        steps = opts.get("steps", self.steps)
        # projection options of the default structure do not carry over to another structure
        base_projection = self.projection if structure == self.structure else {}
        projection = {**base_projection, **opts.get("projection", {})}
        kwargs = projection_kwargs(structure, steps, calibration, projection, where)
        return {
            "structure": structure,
            "budget": budget,
            # data-aware only where the structure's projection takes activations
            "calibration": calibration and takes_calibration(structure),
            "kwargs": kwargs,
            "budget_overridden": "budget" in opts,
        }

    # -- JSON ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; a callable ``target_modules`` cannot be written and raises."""
        if callable(self.target_modules) and not isinstance(self.target_modules, re.Pattern):
            raise TypeError(
                "a config whose target_modules is a callable cannot be written to JSON; "
                "use names, suffixes or 're:<regex>' patterns"
            )
        out = asdict(self)
        targets = self.target_modules
        out["target_modules"] = (
            [_pattern_to_json(p) for p in targets]
            if isinstance(targets, list | tuple)
            else _pattern_to_json(targets)
        )
        out["exclude_modules"] = [_pattern_to_json(p) for p in self.exclude_modules]
        return json.loads(json.dumps(out))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CompressionConfig:
        """Build a config from :meth:`to_dict` output; unknown keys are an error."""
        if not isinstance(data, dict):
            raise TypeError(
                f"a compression config must be a JSON object, got {type(data).__name__}"
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown compression config key(s) {unknown}; known: {sorted(known)}")
        return cls(**data)

    def to_json(self, path: str | Path | None = None) -> str:
        """The config as JSON text; also written to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        if path is not None:
            Path(path).write_text(text + "\n", encoding="utf-8")
        return text

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> CompressionConfig:
        """Read a config from JSON text or from a ``.json`` file.

        A ``Path`` is always a file; a string is JSON text when it starts with ``{`` or
        ``[`` or names no file but parses as JSON, and a file name otherwise. The JSON must
        be an object; a missing file, a directory, text that is not valid JSON or not an
        object raise a ``ValueError`` that says which.
        """
        text, where = _json_source(text_or_path)
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where} is not valid JSON: {err}") from None
        if not isinstance(data, dict):
            raise ValueError(
                f"{where} must be a JSON object ({{\"budget\": ..., ...}}), "
                f"got {type(data).__name__}: {_clip(text)}"
            )
        return cls.from_dict(data)


def _clip(text: str, limit: int = 40) -> str:
    text = " ".join(text.split())
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


def _json_source(text_or_path: str | Path) -> tuple[str, str]:
    """``(JSON text, what to call it in an error)`` of :meth:`CompressionConfig.from_json`."""
    if not isinstance(text_or_path, str | Path):
        raise TypeError(
            f"from_json takes JSON text or a path, got {type(text_or_path).__name__}"
        )
    if isinstance(text_or_path, str):
        stripped = text_or_path.lstrip()
        if stripped.startswith(("{", "[")):
            return text_or_path, "compression config text"
    path = Path(text_or_path)
    try:
        is_dir, is_file = path.is_dir(), path.is_file()
    except OSError:  # a name too long or otherwise unusable as a path: text, then
        is_dir = is_file = False
    if is_dir:
        raise ValueError(f"compression config path {str(path)!r} is a directory, not a file")
    if not is_file:
        if isinstance(text_or_path, str):
            try:  # JSON text that is not an object ("3", "null", '"gblr"')
                json.loads(text_or_path)
            except json.JSONDecodeError:
                pass
            else:
                return text_or_path, "compression config text"
        raise ValueError(f"compression config file {str(path)!r} does not exist")
    where = f"compression config file {str(path)!r}"
    try:
        return path.read_text(encoding="utf-8"), where
    except UnicodeDecodeError as err:
        raise ValueError(f"{where} is not UTF-8 text: {err}") from None
    except OSError as err:
        raise ValueError(f"{where} cannot be read: {err}") from None
