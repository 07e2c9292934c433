"""The distillation objective: α·T²·KL(teacher ‖ student) + β·CE(next token) + γ·Σ MSE(hidden states)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class DistillationLoss:
    """Weights of the three terms. ``hidden_layers`` index ``output_hidden_states`` (0 = embeddings,
    i = output of block i); the MSE is averaged over elements and summed over the chosen layers.
    The KL term is scaled by T² so that its gradients keep their size as the temperature changes
    (Hinton et al., 2015)."""

    alpha: float = 1.0
    beta: float = 1.0
    gamma: float = 0.0
    temperature: float = 1.0
    hidden_layers: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if min(self.alpha, self.beta, self.gamma) < 0 or self.alpha + self.beta + self.gamma == 0:
            raise ValueError("loss weights alpha, beta, gamma must be non-negative and not all zero")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if self.gamma > 0 and not self.hidden_layers:
            raise ValueError("gamma > 0 needs hidden_layers (which hidden states to match)")

    @property
    def needs_hidden_states(self) -> bool:
        return self.gamma > 0

    @property
    def needs_teacher(self) -> bool:
        return self.alpha > 0 or self.gamma > 0

    def __call__(self, student, teacher, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Terms for next-token prediction on ``input_ids`` (batch, length); ``student`` and ``teacher``
        are model outputs (``teacher`` may be None when only CE is used). Returns every term and ``loss``."""
        logits = student.logits[:, :-1].float()
        vocab = logits.shape[-1]
        terms: dict[str, torch.Tensor] = {}
        terms["ce"] = F.cross_entropy(logits.reshape(-1, vocab), input_ids[:, 1:].reshape(-1))
        if self.alpha > 0:
            t = self.temperature
            teacher_logits = teacher.logits[:, :-1].float()
            if teacher_logits.shape[-1] != vocab:
                raise ValueError(f"teacher vocabulary {teacher_logits.shape[-1]} differs from the student's {vocab}")
            # Mean over tokens of KL(p_teacher || p_student), computed in log space for stability.
            terms["kl"] = (
                F.kl_div(
                    (logits / t).log_softmax(-1).reshape(-1, vocab),
                    (teacher_logits / t).log_softmax(-1).reshape(-1, vocab),
                    log_target=True,
                    reduction="batchmean",
                )
                * t
                * t
            )
        if self.gamma > 0:
            terms["hidden"] = sum(
                F.mse_loss(student.hidden_states[i].float(), teacher.hidden_states[i].float())
                for i in self.hidden_layers
            )
        zero = logits.new_zeros(())
        terms["loss"] = (
            self.alpha * terms.get("kl", zero) + self.beta * terms["ce"] + self.gamma * terms.get("hidden", zero)
        )
        return terms
