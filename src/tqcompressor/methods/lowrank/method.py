"""The ``lowrank`` method (alias ``svd``): truncated SVD, W ≈ U V, for linear layers and embedding tables."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ...linalg import calibrated_error, fisher_loss, output_factor, output_ridge, weighted_error, whitening_factor
from ...statistics import InputStats, TokenStats
from ..base import CompressionMethod, Estimate, FitReport, MethodConfig
from ..registry import register
from ..targets import LINEAR_TYPES, dense_weight
from .factors import rank_for_params, scaled_svd, truncated_svd, whitened_singular_vectors, whitened_svd
from .modules import LowRankEmbedding, LowRankLinear

# Offered to a budget, as fractions of the rank that keeps the dense count; fine steps, so that large
# modules (an embedding) can meet a budget.
RANK_FRACTIONS = (0.875, 0.75, 0.625, 0.5, 0.4375, 0.375, 0.3125, 0.25, 0.1875, 0.125, 0.0625)


@dataclass
class LowRankConfig(MethodConfig):
    """Keep ``rank`` singular directions, or the rank whose factors hold about ``ratio`` of the dense
    parameters (rounded to the nearest rank)."""

    method = "lowrank"
    rank: int | None = None
    ratio: float | None = None
    whitening: Literal["cholesky", "diagonal"] | None = None  # with calibration; default cholesky

    def check(self) -> None:
        if (self.rank is None) == (self.ratio is None):
            raise ValueError("give exactly one of 'rank' or 'ratio'")
        if self.rank is not None and (not isinstance(self.rank, int) or self.rank < 1):
            raise ValueError(f"field 'rank' must be a positive integer, got {self.rank!r}")
        if self.ratio is not None and not 0 < self.ratio <= 1:
            raise ValueError(f"field 'ratio' must be in (0, 1], got {self.ratio}")
        if self.whitening not in (None, "cholesky", "diagonal"):
            raise ValueError(f"field 'whitening' must be 'cholesky' or 'diagonal', got {self.whitening!r}")

    def calibration_fields(self) -> list[str]:
        return ["whitening"] if self.whitening is not None else []

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

    def estimates(self, module: nn.Module, stats: InputStats | TokenStats) -> list[Estimate]:
        """Exact: the calibrated fit at rank k loses the tail of the singular values of SᵀW (whitened
        rows; times T with a Fisher output metric) or of W with rows scaled by the square root of their
        token frequency (embeddings; times T, C = T Tᵀ, with a tied head's input second moment C)."""
        kl = None
        if isinstance(module, nn.Embedding):
            weight = module.weight.detach()
            scaled = stats.weights().sqrt()[:, None] * weight.double()
            if stats.head_second_moment is not None:
                scaled = scaled @ whitening_factor(stats.head_second_moment)
            energy = torch.linalg.svdvals(scaled) ** 2
        elif isinstance(module, LINEAR_TYPES):
            weight = dense_weight(module)[0].detach()
            g = stats.output_second_moment
            right = None if g is None else output_factor(g)
            _, s, vh = whitened_singular_vectors(weight, whitening_factor(stats.second_moment), right)
            energy = s**2
            if right is not None:
                # Direction i costs σᵢ² vᵢᵀ T⁻¹ G T⁻ᵀ vᵢ of the Fisher loss, T Tᵀ = G + ρI: σᵢ² (1 − ρ‖T⁻ᵀvᵢ‖²).
                shrink = torch.linalg.solve_triangular(right.T, vh.T, upper=True).square().sum(0)
                kl = 0.5 * (energy * (1 - output_ridge(g) * shrink)).flip(0).cumsum(0).flip(0)
        else:
            return []
        rows, cols = weight.shape
        tail = energy.flip(0).cumsum(0).flip(0) / (float(energy.sum()) or 1.0)  # Σ_{i >= k} σ_i², relative
        full = rows * cols // (rows + cols)
        ranks = sorted({max(1, int(full * fraction)) for fraction in RANK_FRACTIONS}, reverse=True)
        return [
            Estimate(LowRankConfig(rank=rank), rank * (rows + cols), float(tail[rank]), _at(kl, rank))
            for rank in ranks
            if rank < min(rows, cols)
        ]

    def fit(self, module: nn.Module, config: LowRankConfig, stats: InputStats | TokenStats | None = None):
        embedding = isinstance(module, nn.Embedding)
        weight, bias, layout = (module.weight.detach(), None, None) if embedding else dense_weight(module)
        rank = config.rank_for(*weight.shape)
        plain = truncated_svd(weight, rank)
        if stats is None:
            factors, report = plain, FitReport(list(weight.shape), f"rank {rank}", plain.relative_error(weight))
        elif isinstance(stats, TokenStats):
            # Each token's row weighs as often as it occurs (smoothed); a tied head's logit error for it
            # as often as it is predicted, which frequency approximates, times its hidden states' moment.
            weights, head = stats.weights(), stats.head_second_moment
            factors = scaled_svd(weight, rank, weights.sqrt(), head)
            measure = lambda w: weighted_error(weight, w, weights, head)  # noqa: E731
            how = "frequency" if head is None else "frequency, tied head"
            report = _calibrated_report(weight, rank, factors, plain, measure, how)
        else:
            c, g = stats.second_moment, stats.output_second_moment
            if config.whitening == "diagonal":
                if g is not None:
                    raise ValueError("diagonal whitening takes no Fisher output metric: use cholesky whitening")
                factors = scaled_svd(weight, rank, c.diagonal().clamp_min(0).sqrt())
            else:
                factors = whitened_svd(weight, rank, c, g)
            measure = lambda w: calibrated_error(weight, w, c)  # noqa: E731
            how = (config.whitening or "cholesky") + ("" if g is None else ", Fisher outputs")
            report = _calibrated_report(weight, rank, factors, plain, measure, how)
            if g is not None:
                report.details["kl"] = fisher_loss(weight, factors.reconstruct(), c, g)
        layer = LowRankEmbedding(factors) if embedding else LowRankLinear(factors, bias, layout)
        return layer, report


def _at(values: torch.Tensor | None, index: int) -> float | None:
    return None if values is None else float(values[index])


def _calibrated_report(weight, rank, factors, plain, measure: Callable[[torch.Tensor], float], how: str) -> FitReport:
    """Errors on the calibration objective: of the fit installed, and of the data-free SVD (plain)."""
    return FitReport(
        list(weight.shape),
        f"rank {rank} ({how})",
        measure(factors.reconstruct()),
        measure(plain.reconstruct()),
        objective="calibrated",
        details={"frobenius": factors.relative_error(weight), "frobenius_plain": plain.relative_error(weight)},
    )


register(LowRankMethod(), aliases=("svd",))
