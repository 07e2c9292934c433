"""Calibration statistics as methods receive them: what a layer's inputs look like on real text."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class InputStats:
    """Σ x xᵀ over every calibration token x that entered a linear layer (float64, in x in)."""

    second_moment: torch.Tensor
    tokens: int


@dataclass
class TokenStats:
    """How often each token id occurred in the calibration text (float64, vocab)."""

    counts: torch.Tensor

    def weights(self, smoothing: float = 0.1) -> torch.Tensor:
        """Row weights for an embedding fit: token frequencies mixed with ``smoothing`` of the uniform
        distribution, so that tokens the calibration text never shows still count."""
        frequency = self.counts / self.counts.sum().clamp_min(1)
        return (1 - smoothing) * frequency + smoothing / len(self.counts)
