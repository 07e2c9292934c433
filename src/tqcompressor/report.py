"""Per-layer and whole-model compression reports (stored in a saved model's config.json)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class LayerReport:
    name: str
    kind: str
    weight_shape: list[int]
    factors: str
    params_before: int
    params_after: int
    error_plain: float  # relative Frobenius error without the method's refinements (e.g. permutations)
    error: float  # relative Frobenius error of what was installed
    seconds: float
    best_start: str = ""
    method: str = ""  # empty in reports saved before methods were named
    objective: str = "frobenius"  # what the errors measure: "frobenius", or "calibrated" (on real inputs)
    details: dict[str, float] = field(default_factory=dict)


@dataclass
class CompressionReport:
    plan: str
    layers: list[LayerReport]
    params_before: int
    params_after: int
    head: str
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> CompressionReport:
        return cls(**{**data, "layers": [LayerReport(**layer) for layer in data["layers"]]})

    def table(self) -> str:
        lines = [
            f"plan: {self.plan}",
            f"{'module':42} {'kind':20} {'shape':>12} {'factors':24} {'before':>10} {'after':>10} "
            f"{'err plain':>9} {'err':>7} {'s':>6} objective",
        ]
        for r in self.layers:
            shape = "x".join(map(str, r.weight_shape))
            lines.append(
                f"{r.name:42} {r.kind:20} {shape:>12} {r.factors:24} {r.params_before:>10,} {r.params_after:>10,} "
                f"{r.error_plain:>9.4f} {r.error:>7.4f} {r.seconds:>6.1f} {r.objective}"
            )
        lines.append(
            f"parameters: {self.params_before:,} -> {self.params_after:,} "
            f"({self.params_after / max(self.params_before, 1):.1%}); LM head: {self.head}"
        )
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)
