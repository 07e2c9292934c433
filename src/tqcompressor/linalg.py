"""Input checks and working precision shared by every factorisation."""

from __future__ import annotations

import math

import torch


def relative(squared_error: torch.Tensor | float, squared_reference: torch.Tensor | float) -> float:
    """(error / reference)^½. A reference of zeros (a layer of zero weights, inputs that are all zero) is
    matched by no error at all and by nothing else."""
    error, reference = max(float(squared_error), 0.0), float(squared_reference)
    if reference > 0:
        return (error / reference) ** 0.5
    return 0.0 if error == 0 else math.inf


def check_weight(weight: torch.Tensor, name: str = "weight") -> None:
    if weight.ndim != 2:
        raise ValueError(f"{name} must be a 2-D matrix, got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {weight.dtype}")
    if not torch.isfinite(weight).all():
        bad = int((~torch.isfinite(weight)).sum())
        raise ValueError(f"{name} contains {bad} NaN or infinite values; cannot decompose it")


def working_dtype(weight: torch.Tensor) -> torch.dtype:
    """float64 where it is affordable (exactness in tests), float32 for large matrices."""
    return torch.float64 if weight.numel() <= 1 << 22 else torch.float32


def whitening_factor(second_moment: torch.Tensor) -> torch.Tensor:
    """Lower-triangular S with S Sᵀ = C (+ the smallest ridge λ·mean(diag C)·I that makes C positive
    definite: too few or collinear calibration inputs leave C singular)."""
    c = second_moment.double()
    scale = float(c.diagonal().mean()) or 1.0
    ridge = 0.0
    for attempt in range(12):
        factor, info = torch.linalg.cholesky_ex(c + ridge * scale * torch.eye(len(c), dtype=c.dtype, device=c.device))
        if int(info) == 0:
            return factor
        ridge = 1e-10 * 10**attempt
    raise ValueError("the calibration second moment is not positive definite even with a ridge")


# The ridge that keeps a Fisher output metric (``output_factor``) well conditioned, relative to its mean
# diagonal: the Fisher's small directions are estimated from few gradients. Budgets chosen and fitted at
# once among low-rank candidates on 32k calibration tokens, held-out ppl by ridge (ad-hoc sweep):
# SmolLM2 at 70%: 0.03: 85.3, 0.1: 84.4, 0.3: 75.7, 1: 80.4, 3: 90.7, 10: 105.3; SmolLM2 at 50%:
# 0.1: 245.1, 0.3: 234.9, 1: 254.8; house teacher at 14.1M: 0.1: 137.1, 0.3: 137.3, 1: 137.8.
OUTPUT_RIDGE = 0.3


def output_factor(output_second_moment: torch.Tensor) -> torch.Tensor:
    """Lower-triangular T with T Tᵀ = G + ``OUTPUT_RIDGE``·mean(diag G)·I, G = Σ g gᵀ over the loss
    gradients g of a layer's outputs: the output metric of a Fisher-weighted fit."""
    return whitening_factor(ridged_output_metric(output_second_moment))


def ridged_output_metric(output_second_moment: torch.Tensor) -> torch.Tensor:
    """G + ρI (float64), ρ = ``output_ridge(G)``: the output metric Fisher-weighted fits minimise under."""
    g = output_second_moment.double()
    return g + output_ridge(g) * torch.eye(len(g), dtype=g.dtype, device=g.device)


def output_ridge(output_second_moment: torch.Tensor) -> float:
    """ρ = ``OUTPUT_RIDGE``·mean(diag G), the ridge ``output_factor`` adds to G."""
    return OUTPUT_RIDGE * float(output_second_moment.double().diagonal().mean())


def fisher_loss(
    weight: torch.Tensor, approximation: torch.Tensor, second_moment: torch.Tensor, output_second_moment: torch.Tensor
) -> float:
    """½ tr(Δᵀ C Δ G), Δ = W − Ŵ: the second-order change a layer's error causes under the
    Kronecker-factored Fisher (inputs and output gradients independent). When G sums the gradients of
    the mean loss under labels drawn from the model itself (``calibration.fisher_moments``), it
    estimates the KL of the model's predictions from the original's, in nats per token."""
    delta = weight.detach().double() - approximation.detach().double()
    c, g = second_moment.double(), output_second_moment.double()
    return 0.5 * float(((c @ delta) * (delta @ g)).sum())


def weighted_error(
    weight: torch.Tensor,
    approximation: torch.Tensor,
    row_weights: torch.Tensor,
    column_second_moment: torch.Tensor | None = None,
) -> float:
    """(Σ_v w_v ‖W_v − Ŵ_v‖² / Σ_v w_v ‖W_v‖²)^½: rows weighted, e.g. embedding rows by token frequency;
    with ``column_second_moment`` C each row's norm is ‖·‖_C (Δ_v C Δ_vᵀ), e.g. a tied head's logit error."""
    w, weight = row_weights.double()[:, None], weight.detach().double()
    delta = weight - approximation.detach().double()
    if column_second_moment is None:
        return relative((w * delta**2).sum(), (w * weight**2).sum())
    c = column_second_moment.double()
    return relative((w * delta * (delta @ c)).sum(), (w * weight * (weight @ c)).sum())


def calibrated_error(weight: torch.Tensor, approximation: torch.Tensor, second_moment: torch.Tensor) -> float:
    """‖X (W − Ŵ)‖ / ‖X W‖ over the calibration inputs X, from C = XᵀX alone (W: in x out)."""
    c = second_moment.double()
    w = weight.detach().double()
    delta = w - approximation.detach().double()
    return relative((delta * (c @ delta)).sum(), (w * (c @ w)).sum())


def aimed_weight(
    weight: torch.Tensor, second_moment: torch.Tensor, cross_moment: torch.Tensor, damping: float
) -> torch.Tensor:
    """W* = W + (C + λI)⁻¹ (M − C) W with C = X̃ᵀX̃ and M = X̃ᵀX: the layer computing X̃ W* is the
    least-squares match of X W (undamped), so a fit minimising ‖X̃ (W* − Ŵ)‖ minimises ‖X̃ Ŵ − X W‖:
    what a layer fed X̃ must compute to give what it gave on X. λ = ``damping`` · mean(diag C) keeps
    W in the directions the inputs barely span, as GPTQ damps its Hessian. W: in x out."""
    c, w = second_moment.double(), weight.double()
    ridge = damping * float(c.diagonal().mean()) * torch.eye(len(c), dtype=c.dtype, device=c.device)
    return w + torch.linalg.solve(c + ridge, (cross_moment.double() - c) @ w)
