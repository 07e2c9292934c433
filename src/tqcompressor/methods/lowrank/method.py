"""The ``lowrank`` method (alias ``svd``): truncated SVD, W ≈ U V, for linear layers and embedding tables."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from ..base import CompressionMethod, FitReport, MethodConfig
from ..registry import register
from ..targets import LINEAR_TYPES, dense_weight
from .factors import rank_for_params, truncated_svd
from .modules import LowRankEmbedding, LowRankLinear


@dataclass
class LowRankConfig(MethodConfig):
    """Keep ``rank`` singular directions, or the rank whose factors hold about ``ratio`` of the dense
    parameters (rounded to the nearest rank)."""

    method = "lowrank"
    rank: int | None = None
    ratio: float | None = None

    def check(self) -> None:
        if (self.rank is None) == (self.ratio is None):
            raise ValueError("give exactly one of 'rank' or 'ratio'")
        if self.rank is not None and (not isinstance(self.rank, int) or self.rank < 1):
            raise ValueError(f"field 'rank' must be a positive integer, got {self.rank!r}")
        if self.ratio is not None and not 0 < self.ratio <= 1:
            raise ValueError(f"field 'ratio' must be in (0, 1], got {self.ratio}")

    def rank_for(self, rows: int, cols: int) -> int:
        rank = self.rank if self.rank is not None else rank_for_params(rows, cols, round(self.ratio * rows * cols))
        if rank > min(rows, cols):
            raise ValueError(f"rank {rank} exceeds {min(rows, cols)}, the largest for a {rows}x{cols} matrix")
        return rank


class LowRankMethod(CompressionMethod):
    name = "lowrank"
    config_class = LowRankConfig
    modules = (LowRankLinear, LowRankEmbedding)

    def plan(self, module: nn.Module, config: LowRankConfig) -> LowRankLinear | LowRankEmbedding:
        if isinstance(module, LINEAR_TYPES):
            weight, bias, layout = dense_weight(module)
            rows, cols = weight.shape
            spec = {"in": rows, "out": cols, "rank": config.rank_for(rows, cols), "layout": layout}
            return LowRankLinear.from_spec({**spec, "bias": bias is not None})
        if isinstance(module, nn.Embedding):
            vocab, dim = module.weight.shape
            return LowRankEmbedding.from_spec({"vocab": vocab, "dim": dim, "rank": config.rank_for(vocab, dim)})
        raise ValueError(
            f"a {type(module).__name__} cannot be compressed by method 'lowrank' "
            "(it takes nn.Linear, Conv1D, nn.Embedding)"
        )

    def parameters(self, config: LowRankConfig, rows: int, cols: int) -> int:
        return config.rank_for(rows, cols) * (rows + cols)

    def fit(self, module: nn.Module, config: LowRankConfig, stats: Any = None):
        if isinstance(module, nn.Embedding):
            weight = module.weight.detach()
            rank = config.rank_for(*weight.shape)
            factors = truncated_svd(weight, rank)
            layer = LowRankEmbedding(factors)
        else:
            weight, bias, layout = dense_weight(module)
            rank = config.rank_for(*weight.shape)
            factors = truncated_svd(weight, rank)
            layer = LowRankLinear(factors, bias, layout)
        return layer, FitReport(list(weight.shape), f"rank {rank}", factors.relative_error(weight))


register(LowRankMethod(), aliases=("svd",))
