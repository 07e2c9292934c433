"""What a compression method is: a config, a fit, a parameter formula and the modules it builds.

Surgery, serialization, training and evaluation talk to methods only through these classes and the
registry, so adding a method touches its own folder and nothing else.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import nn


class CompressedModule(nn.Module):
    """A module a method installs. ``spec_type`` names it in a saved ``config.json``; ``kind`` says
    whether it stands in for a linear layer or an embedding table (embeddings also provide ``attend``,
    the logits path of a head tied to them)."""

    spec_type: ClassVar[str]
    kind: ClassVar[Literal["linear", "embedding"]]
    # An embedding standing in for one that scales its rows (Gemma's √d: ``targets.embedding_scale``)
    # scales them too. Set where it replaces that one and not saved: the architecture a run is rebuilt
    # from holds the scale again.
    embed_scale: float | None = None
    # Cut together with the compressed modules beside it (an MLP's producers and consumer keep the same
    # units): alone at its dense width it would no longer fit them, so it is materialized with them only.
    cut_with_siblings: ClassVar[bool] = False

    def to_spec(self) -> dict[str, Any]:
        """The structure ``from_spec`` needs to rebuild an empty module of the same shapes (JSON)."""
        raise NotImplementedError

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> CompressedModule:
        """An empty module of the structure ``spec`` records; ``load`` fills its weights."""
        raise NotImplementedError

    def to_dense(self) -> nn.Module:
        """The equivalent module of the original architecture (``nn.Linear``, ``Conv1D``, ``nn.Embedding``)."""
        raise NotImplementedError

    def attend(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden @ E.T`` through the factors (embeddings only; a tied head reads the table unscaled)."""
        raise NotImplementedError(f"{type(self).__name__} is not an embedding")

    def scaled(self, rows: torch.Tensor) -> torch.Tensor:
        """The rows an embedding looked up, as the embedding it stands in for returns them."""
        return rows if self.embed_scale is None else rows * self.embed_scale

    def input_permutation(self) -> torch.Tensor | None:
        """The gather x[..., index] this module applies to its input first, if it has one (a linear kind
        with one can hand it to the modules producing its input: ``tqcompressor.fold_permutations``)."""
        return None

    def drop_input_permutation(self) -> None:
        raise NotImplementedError(f"{type(self).__name__} has no input permutation")

    def permute_outputs(self, index: torch.Tensor) -> None:
        """From now on produce y[..., index] instead of y."""
        raise NotImplementedError(f"{type(self).__name__} cannot reorder its outputs")

    @staticmethod
    def parameter(tensor: torch.Tensor) -> nn.Parameter:
        # Always row-major: SVD factors come out column-major, and a saved model loads row-major. Equal
        # layouts make a reloaded model take the same GEMM kernels, so its logits are bit-identical.
        return nn.Parameter(tensor.detach().clone(memory_format=torch.contiguous_format))


@dataclass
class MethodConfig:
    """A method's settings for one plan rule. Fields left ``None`` are unset: ``to_dict`` omits them,
    so a plan file round-trips exactly and a field that does not apply can be told from a default."""

    method: ClassVar[str]

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Raise ValueError naming the field when fields conflict or are out of range."""

    def calibration_fields(self) -> list[str]:
        """The fields set here that only mean something with calibration statistics."""
        return []

    def to_dict(self) -> dict[str, Any]:
        return {
            f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self) if getattr(self, f.name) is not None
        }

    @classmethod
    def from_dict(cls, options: dict[str, Any]) -> MethodConfig:
        known = [f.name for f in dataclasses.fields(cls)]
        for key in options:
            if key not in known:
                raise ValueError(
                    f"field {key!r} does not apply to method {cls.method!r} (its fields: {', '.join(known)})"
                )
        return cls(**options)


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


@dataclass
class FitReport:
    """What a fit measured, against the weight being replaced."""

    shape: list[int]  # the dense weight: in x out for linear layers, vocab x width for embeddings
    factors: str  # human-readable structure, e.g. "r=4 A 384x768 B 2x4" or "rank 64"
    error: float  # relative Frobenius error of the installed module
    error_plain: float | None = None  # the same without the method's refinements (e.g. permutations)
    best_start: str = ""
    objective: str = "frobenius"  # what ``error`` measures: "frobenius" ‖W − Ŵ‖, or "calibrated" ‖X (W − Ŵ)‖
    details: dict[str, float] = field(default_factory=dict)  # further errors a method measured


@dataclass
class Estimate:
    """A config a parameter budget may choose for one module, priced without fitting it in full."""

    config: MethodConfig
    params: int  # the weight's parameters after (a bias is kept as it is)
    # Relative squared output error on the calibration inputs, tr(ΔᵀCΔ) / tr(WᵀCW) (rows weighted by
    # token frequency for an embedding): exact, or a start that the installed fit refines (its own
    # docstring says whether that is a strict upper bound).
    loss: float
    # With a Fisher output metric in the statistics: ½ tr(Δᵀ C Δ G) (``linalg.fisher_loss``), the KL it
    # is expected to cost the model's predictions, comparable across modules as relative errors are not.
    kl: float | None = None


class CompressionMethod(ABC):
    """One registered method. ``plan`` and ``parameters`` work from shapes alone; ``fit`` computes."""

    name: ClassVar[str]
    config_class: ClassVar[type[MethodConfig]]
    modules: ClassVar[tuple[type[CompressedModule], ...]]

    @abstractmethod
    def plan(self, module: nn.Module, config: MethodConfig) -> CompressedModule:
        """An empty module of the structure ``fit(module, config)`` will return. Called under the meta
        device, on the original module or on what earlier rules planned for it; raises ValueError when
        the config does not apply to this module."""

    @abstractmethod
    def fit(self, module: nn.Module, config: MethodConfig, stats: Any = None) -> tuple[CompressedModule, FitReport]:
        """The compressed replacement of ``module``. ``stats``: calibration statistics of its inputs
        (``InputStats`` for linear layers, ``TokenStats`` for embeddings; for a module holding linear
        layers, such as an MLP cut whole, theirs by child name), or None for a data-free fit."""

    def parameters(self, config: MethodConfig, rows: int, cols: int) -> int:
        """Parameters that compressing a ``rows x cols`` matrix (no bias) with ``config`` keeps (methods that
        replace one matrix)."""
        raise NotImplementedError(f"method {self.name!r} does not replace one matrix")

    def estimates(self, module: nn.Module, stats: Any) -> list[Estimate]:
        """The configs this method offers a budget allocation for ``module``, from its calibration
        ``stats`` alone; none unless the method says how to price them."""
        return []
