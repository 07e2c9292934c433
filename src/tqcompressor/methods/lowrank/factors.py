"""Truncated-SVD factorisation W ≈ U V, the baseline every Kronecker result is compared against."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...linalg import check_weight, whitening_factor, working_dtype


@dataclass
class LowRankFactors:
    u: torch.Tensor  # (in_features, rank)
    v: torch.Tensor  # (rank, out_features)

    @property
    def rank(self) -> int:
        return self.u.shape[1]

    @property
    def num_params(self) -> int:
        return self.u.numel() + self.v.numel()

    def reconstruct(self) -> torch.Tensor:
        return self.u @ self.v

    def relative_error(self, weight: torch.Tensor) -> float:
        target = weight.to(torch.float64)
        return float(torch.linalg.norm(target - self.reconstruct().double()) / torch.linalg.norm(target))


def truncated_svd(weight: torch.Tensor, rank: int) -> LowRankFactors:
    """Best rank-``rank`` approximation (Eckart–Young), split evenly as U·sqrt(S) and sqrt(S)·V^T."""
    _check_rank(weight, rank)
    u, s, vh = torch.linalg.svd(weight.to(working_dtype(weight)), full_matrices=False)
    root = s[:rank].sqrt()
    return LowRankFactors((u[:, :rank] * root).to(weight.dtype), (root[:, None] * vh[:rank]).to(weight.dtype))


def rank_for_params(in_features: int, out_features: int, num_params: int) -> int:
    """Rank of a truncated SVD (U: in x k, V: k x out) with about ``num_params`` parameters."""
    rank = max(1, round(num_params / (in_features + out_features)))
    return min(rank, in_features, out_features)


def whitened_svd(weight: torch.Tensor, rank: int, second_moment: torch.Tensor) -> LowRankFactors:
    """Rank-``rank`` W ≈ U V minimising ‖X (W − U V)‖ over calibration inputs X with XᵀX = C.

    With C = S Sᵀ, ‖X Δ‖ = ‖Sᵀ Δ‖, so the truncated SVD of Sᵀ W is optimal (SVD-LLM) and U = S⁻ᵀ U'."""
    _check_rank(weight, rank)
    factor = whitening_factor(second_moment)
    u, s, vh = torch.linalg.svd(factor.T @ weight.double(), full_matrices=False)
    root = s[:rank].sqrt()
    left = torch.linalg.solve_triangular(factor.T, u[:, :rank] * root, upper=True)
    return LowRankFactors(left.to(weight.dtype), (root[:, None] * vh[:rank]).to(weight.dtype))


def scaled_svd(
    weight: torch.Tensor, rank: int, row_scale: torch.Tensor, column_second_moment: torch.Tensor | None = None
) -> LowRankFactors:
    """Rank-``rank`` W ≈ U V minimising ‖diag(s) (W − U V)‖: per-row weights, e.g. each input channel's
    RMS (ASVD-style diagonal whitening) or each token's frequency for an embedding table. With
    ``column_second_moment`` C = T Tᵀ it minimises ‖diag(s) (W − U V) T‖ (a tied head's logit error):
    the truncated SVD of diag(s) W T, with V = V' T⁻¹."""
    _check_rank(weight, rank)
    scale = row_scale.double().clamp_min(float(row_scale.max()) * 1e-8 + torch.finfo(torch.float64).tiny)
    scaled = scale[:, None] * weight.double()
    factor = None if column_second_moment is None else whitening_factor(column_second_moment)
    u, s, vh = torch.linalg.svd(scaled if factor is None else scaled @ factor, full_matrices=False)
    root = s[:rank].sqrt()
    left = (u[:, :rank] * root) / scale[:, None]
    right = root[:, None] * vh[:rank]
    if factor is not None:  # R T = R' for lower-triangular T: Tᵀ Rᵀ = R'ᵀ
        right = torch.linalg.solve_triangular(factor.T, right.T, upper=True).T
    return LowRankFactors(left.to(weight.dtype), right.to(weight.dtype))


def _check_rank(weight: torch.Tensor, rank: int) -> None:
    check_weight(weight)
    if not 1 <= rank <= min(weight.shape):
        raise ValueError(f"rank must be between 1 and {min(weight.shape)} for a {tuple(weight.shape)} matrix")
