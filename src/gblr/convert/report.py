"""The per-layer record of a compression: shapes, structure, cost, error, time."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["LayerRecord", "CompressionReport"]


@dataclass
class LayerRecord:
    """One replaced layer."""

    name: str
    kind: str
    in_features: int
    out_features: int
    structure: str
    budget: float
    dense_cost: int
    cost: int
    params: int
    dense_params: int
    rel_error: float
    seconds: float


@dataclass
class CompressionReport:
    """What ``gblr.compress`` did; ``str(report)`` is a table, :meth:`to_dict` JSON-ready."""

    layers: list[LayerRecord] = field(default_factory=list)
    budget: float = 1.0
    #: ``gblr.flops_report`` of the whole compressed model (dense layers included)
    flops: Any = None
    #: layers left dense on purpose, with the reason (a weight tied to one that stays dense)
    skipped: dict[str, str] = field(default_factory=dict)
    #: factorized token embeddings (kind "embedding"; their MACs are not in the totals)
    embeddings: list[LayerRecord] = field(default_factory=list)

    @property
    def dense_cost(self) -> int:
        """Summed MACs per token of the replaced layers before compression."""
        return sum(r.dense_cost for r in self.layers)

    @property
    def cost(self) -> int:
        """Summed MACs per token of the replaced layers after compression."""
        return sum(r.cost for r in self.layers)

    @property
    def cost_fraction(self) -> float:
        """``cost / dense_cost`` (0 when nothing was replaced)."""
        return self.cost / self.dense_cost if self.dense_cost else 0.0

    @property
    def mean_rel_error(self) -> float:
        """Mean relative Frobenius error of the projected weights."""
        return sum(r.rel_error for r in self.layers) / max(1, len(self.layers))

    def to_dict(self) -> dict[str, Any]:
        return {
            "budget": self.budget,
            "dense_cost": self.dense_cost,
            "cost": self.cost,
            "cost_fraction": self.cost_fraction,
            "mean_rel_error": self.mean_rel_error,
            "layers": [asdict(r) for r in self.layers],
            "skipped": dict(self.skipped),
            "embeddings": [asdict(r) for r in self.embeddings],
            "flops": self.flops.to_dict() if hasattr(self.flops, "to_dict") else None,
        }

    def table(self) -> str:
        """A plain-text table: one row per layer and a total row."""
        width = max([len("layer"), *(len(r.name) for r in self.layers)])
        head = (
            f"{'layer':<{width}}  {'shape':>11}  {'structure':<11} {'budget':>6}  "
            f"{'dense MACs':>10}  {'MACs':>9}  {'frac':>5}  {'rel.err':>7}"
        )
        lines = [head, "-" * len(head)]
        for r in self.layers:
            frac = r.cost / r.dense_cost if r.dense_cost else 0.0
            shape = f"{r.out_features}x{r.in_features}"
            lines.append(
                f"{r.name:<{width}}  {shape:>11}  {r.structure:<11} {r.budget:>6.3f}  "
                f"{r.dense_cost:>10,}  {r.cost:>9,}  {frac:>5.3f}  {r.rel_error:>7.4f}"
            )
        lines.append("-" * len(head))
        lines.append(
            f"{'total':<{width}}  {'':>11}  {'':<11} {self.budget:>6.3f}  "
            f"{self.dense_cost:>10,}  {self.cost:>9,}  {self.cost_fraction:>5.3f}  "
            f"{self.mean_rel_error:>7.4f}"
        )
        for r in self.embeddings:
            lines.append(
                f"embedding {r.name}: {r.in_features}x{r.out_features} -> rank "
                f"{r.cost // max(1, r.out_features)}, {r.params:,} of {r.dense_params:,} "
                f"parameters ({r.params / max(1, r.dense_params):.3f}), rel.err {r.rel_error:.4f}"
            )
        for name, why in self.skipped.items():
            lines.append(f"left dense: {name} ({why})")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()
