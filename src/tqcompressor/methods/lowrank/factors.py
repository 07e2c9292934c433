"""Truncated-SVD factorisation W ≈ U V, the baseline every Kronecker result is compared against."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...linalg import check_weight, output_factor, relative, whitening_factor, working_dtype


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

    def balanced(self, dtype: torch.dtype) -> LowRankFactors:
        """The same product, in ``dtype``, with each rank-one term's two factors of equal norm. A whitened
        fit's split can be off by orders of magnitude (a Fisher metric's scale is that of a mean loss's
        gradients), and optimisers step every entry alike, so distilling would wreck the small side: the
        house teacher's Fisher-fitted student went from held-out ppl 118.5 to 388.9 in 4M tokens of
        distillation before this, and to 92.3 in 2M after it."""
        u, v = self.u.double(), self.v.double()
        u_norm, v_norm = u.norm(dim=0), v.norm(dim=1)
        scale = torch.where((u_norm > 0) & (v_norm > 0), (v_norm / u_norm).sqrt(), torch.ones_like(u_norm))
        return LowRankFactors((u * scale).to(dtype), (v / scale[:, None]).to(dtype))

    def relative_error(self, weight: torch.Tensor) -> float:
        target = weight.to(torch.float64)
        return relative((target - self.reconstruct().double()).square().sum(), target.square().sum())


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


def whitened_svd(
    weight: torch.Tensor, rank: int, second_moment: torch.Tensor, output_second_moment: torch.Tensor | None = None
) -> LowRankFactors:
    """Rank-``rank`` W ≈ U V minimising ‖X (W − U V)‖ over calibration inputs X with XᵀX = C.

    With C = S Sᵀ, ‖X Δ‖ = ‖Sᵀ Δ‖, so the truncated SVD of Sᵀ W is optimal (SVD-LLM) and U = S⁻ᵀ U'.
    With ``output_second_moment`` G it minimises ‖Sᵀ Δ T‖, T Tᵀ = G + ridge (``linalg.output_factor``):
    the SVD of Sᵀ W T, and V = V' T⁻¹."""
    _check_rank(weight, rank)
    left_factor = whitening_factor(second_moment)
    right_factor = None if output_second_moment is None else output_factor(output_second_moment)
    u, s, vh = whitened_singular_vectors(weight, left_factor, right_factor)
    root = s[:rank].sqrt()
    left = torch.linalg.solve_triangular(left_factor.T, u[:, :rank] * root, upper=True)
    right = root[:, None] * vh[:rank]
    if right_factor is not None:  # R T = R' for lower-triangular T: Tᵀ Rᵀ = R'ᵀ
        right = torch.linalg.solve_triangular(right_factor.T, right.T, upper=True).T
    return LowRankFactors(left, right).balanced(weight.dtype)


def whitened_singular_vectors(
    weight: torch.Tensor, left_factor: torch.Tensor, right_factor: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The thin SVD of Sᵀ W, or of Sᵀ W T with an output metric's factor T (``whitened_svd``)."""
    whitened = left_factor.T @ weight.double()
    return torch.linalg.svd(whitened if right_factor is None else whitened @ right_factor, full_matrices=False)


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
    return LowRankFactors(left, right).balanced(weight.dtype)


def _check_rank(weight: torch.Tensor, rank: int) -> None:
    check_weight(weight)
    if not 1 <= rank <= min(weight.shape):
        raise ValueError(f"rank must be between 1 and {min(weight.shape)} for a {tuple(weight.shape)} matrix")
