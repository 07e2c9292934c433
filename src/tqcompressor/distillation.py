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
        logits = student.logits[:, :-1]
        vocab = logits.shape[-1]
        teacher_logits = None
        if self.alpha > 0:
            teacher_logits = teacher.logits[:, :-1]
            if teacher_logits.shape[-1] != vocab:
                raise ValueError(f"teacher vocabulary {teacher_logits.shape[-1]} differs from the student's {vocab}")
            teacher_logits = teacher_logits.reshape(-1, vocab)
        loss, ce, kl = _LogitLoss.apply(
            logits.reshape(-1, vocab),
            teacher_logits,
            input_ids[:, 1:].reshape(-1),
            self.alpha,
            self.beta,
            self.temperature,
        )
        terms: dict[str, torch.Tensor] = {"ce": ce}
        if self.alpha > 0:
            terms["kl"] = kl
        if self.gamma > 0:
            terms["hidden"] = sum(
                F.mse_loss(student.hidden_states[i].float(), teacher.hidden_states[i].float())
                for i in self.hidden_layers
            )
        terms["loss"] = loss + self.gamma * terms["hidden"] if self.gamma > 0 else loss
        return terms


class _LogitLoss(torch.autograd.Function):
    """α·T²·KL(teacher ‖ student) + β·CE over (tokens, vocab) logits, computed in row chunks that stay in
    cache, with the gradient formed in the same pass: (α·T·(softmax(s/T) - p_t) + β·(softmax(s) - onehot)) / N.
    On a CPU these vocabulary-wide elementwise passes, not the matrix products, dominate a training step;
    this does a few instead of a dozen full-size ones (the idea of fused cross-entropy kernels)."""

    # Rows x vocab per chunk. On a CPU about 2 MB in float32, which stays in cache. On an accelerator each
    # chunk costs a dozen kernel launches and the Python around them, so chunks are as large as a bounded
    # working memory allows (256 MB in float32): at the CPU size a step of 32 x 256 tokens of GPT-2's
    # vocabulary was 820 chunks, and the H100 distilled only 28k tokens/s.
    CPU_CHUNK_ELEMENTS = 1 << 19
    ACCELERATOR_CHUNK_ELEMENTS = 1 << 26

    @staticmethod
    def chunk_rows(device: torch.device, vocab: int) -> int:
        cpu = device.type == "cpu"
        return max(1, (_LogitLoss.CPU_CHUNK_ELEMENTS if cpu else _LogitLoss.ACCELERATOR_CHUNK_ELEMENTS) // vocab)

    @staticmethod
    def forward(ctx, logits, teacher_logits, targets, alpha, beta, temperature):
        rows, vocab = logits.shape
        chunk = _LogitLoss.chunk_rows(logits.device, vocab)
        grad = torch.empty_like(logits) if logits.requires_grad else None
        ce_sum = logits.new_zeros((), dtype=torch.float64)
        kl_sum = logits.new_zeros((), dtype=torch.float64)
        t = temperature
        compute = torch.promote_types(logits.dtype, torch.float32)  # bf16 logits are reduced in float32
        for start in range(0, rows, chunk):
            part = slice(start, start + chunk)
            s = logits[part].to(compute)
            target = targets[part]
            log_p = s.log_softmax(-1)
            ce_sum += -log_p.gather(1, target[:, None]).sum().double()
            g = log_p.exp_().mul_(beta)  # β·softmax(s)
            g[torch.arange(len(target)), target] -= beta
            if teacher_logits is not None and alpha > 0:
                log_q = (teacher_logits[part].to(compute) / t).log_softmax(-1)
                log_p_t = (s / t).log_softmax(-1)
                q = log_q.exp()
                kl_sum += (q * (log_q - log_p_t)).sum().double()
                g.add_(log_p_t.exp_().sub_(q), alpha=alpha * t)
            if grad is not None:
                grad[part] = g
        ce, kl = (ce_sum / rows).float(), (kl_sum / rows * t * t).float()
        loss = (beta * ce + alpha * kl) if teacher_logits is not None else beta * ce
        if grad is not None:
            grad.div_(rows)
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(ce, kl)
        return loss, ce, kl

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_kl):
        (grad,) = ctx.saved_tensors
        return grad * grad_loss.to(grad.dtype), None, None, None, None, None
