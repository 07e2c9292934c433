"""Calibration statistics as methods receive them: what a layer's inputs look like on real text."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch


@dataclass
class InputStats:
    """Σ x xᵀ over every calibration token x that entered a linear layer (float64, in x in), and, when
    the Fisher was collected (``calibration.fisher``), Σ g gᵀ over the loss gradients g of its outputs
    (float64, out x out): how much each output direction matters to the model's predictions."""

    second_moment: torch.Tensor
    tokens: int
    output_second_moment: torch.Tensor | None = None


@dataclass
class TokenStats:
    """How often each token id occurred in the calibration text (float64, vocab), and, for an embedding
    an output head is tied to, Σ h hᵀ over the head's inputs (float64, dim x dim): the head's logit
    error for token v is (E_v − Ê_v)·h, and the final hidden states are far from isotropic (SmolLM2's
    second moment spans eigenvalues 0.02 to 902), so a fit that weighs every embedding column alike
    spends its rank where the head never looks."""

    counts: torch.Tensor
    head_second_moment: torch.Tensor | None = None

    def weights(self, smoothing: float = 0.1) -> torch.Tensor:
        """Row weights for an embedding fit: token frequencies mixed with ``smoothing`` of the uniform
        distribution, so that tokens the calibration text never shows still count."""
        frequency = self.counts / self.counts.sum().clamp_min(1)
        return (1 - smoothing) * frequency + smoothing / len(self.counts)


def on_device(stats, device: torch.device):
    """``stats`` (``InputStats``, ``TokenStats``, a dict of them by child name, or None) with every tensor
    on ``device``: statistics collected on one device fit a layer on another."""
    if stats is None:
        return None
    if isinstance(stats, dict):
        return {name: on_device(child, device) for name, child in stats.items()}
    moved = {f.name: getattr(stats, f.name) for f in fields(stats) if isinstance(getattr(stats, f.name), torch.Tensor)}
    return replace(stats, **{name: tensor.to(device) for name, tensor in moved.items()})
