"""Input checks and working precision shared by every factorisation."""

from __future__ import annotations

import torch


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
