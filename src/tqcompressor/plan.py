"""Compression plans: which modules to compress, and how. Rules apply in order, so a rule that names
an already-compressed embedding compresses it again (the paper's ÷2 then ÷2)."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

Method = Literal["kronecker", "svd"]
METHODS = ("kronecker", "svd")


@dataclass
class Rule:
    """Compress every module whose full name matches ``pattern`` (a regular expression, full match).

    Linear/Conv1D weights: ``shape`` = [m1, n1, m2, n2] with ``rank`` terms, or a target ``ratio``
    (factor shapes proposed from it). Embeddings: ``embedding_factor`` k divides the width
    (vocab x d -> vocab x d/k ⊗ 1 x k). ``method: svd`` uses truncated SVD (``rank`` or ``ratio``).
    ``permute``: search permutations (both sides), or "rows"/"cols"/False.
    """

    pattern: str
    method: Method = "kronecker"
    shape: tuple[int, int, int, int] | None = None
    rank: int | None = None
    ratio: float | None = None
    embedding_factor: int | None = None
    permute: bool | Literal["rows", "cols"] = True
    iterations: int = 6
    restarts: int = 0
    seed: int = 0
    time_budget: float | None = 60.0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"rule {self.pattern!r}: unknown method {self.method!r}; use one of {METHODS}")
        try:
            re.compile(self.pattern)
        except re.error as err:
            raise ValueError(f"rule pattern {self.pattern!r} is not a valid regular expression: {err}") from err
        if self.shape is not None:
            if len(self.shape) != 4:
                raise ValueError(f"rule {self.pattern!r}: shape must be [m1, n1, m2, n2], got {self.shape}")
            self.shape = tuple(int(x) for x in self.shape)  # type: ignore[assignment]
        if self.ratio is not None and not 0 < self.ratio <= 1:
            raise ValueError(f"rule {self.pattern!r}: ratio must be in (0, 1], got {self.ratio}")
        if self.embedding_factor is not None and self.embedding_factor < 2:
            raise ValueError(f"rule {self.pattern!r}: embedding_factor must be at least 2")
        if self.permute not in (True, False, "rows", "cols"):
            raise ValueError(f"rule {self.pattern!r}: permute must be true, false, 'rows' or 'cols'")

    def matches(self, name: str) -> bool:
        return re.fullmatch(self.pattern, name) is not None

    @property
    def search_rows(self) -> bool:
        return self.permute in (True, "rows")

    @property
    def search_cols(self) -> bool:
        return self.permute in (True, "cols")


@dataclass
class CompressionPlan:
    rules: list[Rule]
    name: str = "custom"
    # With the token embedding compressed, logits come from the compressed factors (tie kept). False
    # keeps a separate dense head, which is counted in full.
    tie_head: bool = True
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.rules = [rule if isinstance(rule, Rule) else Rule(**rule) for rule in self.rules]
        if not self.rules:
            raise ValueError("a compression plan needs at least one rule")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for rule in data["rules"]:
            if rule["shape"] is not None:
                rule["shape"] = list(rule["shape"])
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CompressionPlan:
        if not isinstance(data, dict) or "rules" not in data:
            raise ValueError("a plan must be a mapping with a 'rules' list")
        known = {"rules", "name", "tie_head", "description", "extra"}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown plan keys {sorted(unknown)}; expected {sorted(known)}")
        rules = []
        for i, rule in enumerate(data["rules"]):
            try:
                rules.append(Rule(**rule))
            except TypeError as err:
                raise ValueError(f"plan rule {i}: {err}") from err
        return cls(**{**data, "rules": rules})

    @classmethod
    def load(cls, path: str | Path) -> CompressionPlan:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"plan file {path} does not exist")
        text = path.read_text()
        try:
            data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as err:
            raise ValueError(f"cannot parse plan file {path}: {err}") from err
        return cls.from_dict(data)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        data = self.to_dict()
        path.write_text(json.dumps(data, indent=2) if path.suffix == ".json" else yaml.safe_dump(data))
