"""Compression plans: which modules to compress, and with which method's config. Rules apply in order,
so a rule that names an already-compressed embedding compresses it again (the paper's ÷2 then ÷2).

In a plan file a rule is ``{pattern: REGEX, method: NAME, ...that method's fields}`` (``method``
defaults to ``kronecker``); in Python it is ``Rule(pattern, KroneckerConfig(...))``."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .methods import CompressionMethod, MethodConfig, get_method

DEFAULT_METHOD = "kronecker"


@dataclass
class Rule:
    """Compress every module whose full name matches ``pattern`` (a regular expression, full match)."""

    pattern: str
    config: MethodConfig

    def __post_init__(self) -> None:
        try:
            re.compile(self.pattern)
        except re.error as err:
            raise ValueError(f"rule pattern '{self.pattern}' is not a valid regular expression: {err}") from err
        if not isinstance(self.config, MethodConfig):
            raise TypeError(f"rule '{self.pattern}': config must be a method config, got {type(self.config).__name__}")

    @property
    def method(self) -> CompressionMethod:
        return get_method(self.config.method)

    def matches(self, name: str) -> bool:
        return re.fullmatch(self.pattern, name) is not None

    def to_dict(self) -> dict[str, Any]:
        return {"pattern": self.pattern, "method": self.config.method, **self.config.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Rule:
        if not isinstance(data, dict) or "pattern" not in data:
            raise ValueError(f"a plan rule must be a mapping with a 'pattern', got {data!r}")
        options = dict(data)
        pattern = options.pop("pattern")
        try:
            method = get_method(options.pop("method", DEFAULT_METHOD))
            config = method.config_class.from_dict(options)
        except (ValueError, TypeError) as err:
            raise ValueError(f"plan rule '{pattern}': {err}") from err
        return cls(pattern, config)


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
        self.rules = [rule if isinstance(rule, Rule) else Rule.from_dict(rule) for rule in self.rules]
        if not self.rules:
            raise ValueError("a compression plan needs at least one rule")

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "tie_head": self.tie_head,
            "description": self.description,
            "extra": self.extra,
            "rules": [rule.to_dict() for rule in self.rules],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CompressionPlan:
        if not isinstance(data, dict) or "rules" not in data:
            raise ValueError("a plan must be a mapping with a 'rules' list")
        known = {"rules", "name", "tie_head", "description", "extra"}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown plan keys {sorted(unknown)}; expected {sorted(known)}")
        return cls(**{**data, "rules": [Rule.from_dict(rule) for rule in data["rules"]]})

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
        path.write_text(json.dumps(data, indent=2) if path.suffix == ".json" else yaml.safe_dump(data, sort_keys=False))
