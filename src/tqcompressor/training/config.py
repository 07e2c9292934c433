"""Training settings, the learning-rate schedule, and which settings a resumed run must share."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Literal

from ..distillation import DistillationLoss

# Settings that may change between a run and its resume without changing the trajectory.
CADENCE = {"eval_every", "eval_blocks", "checkpoint_every", "log_every"}


@dataclass
class TrainConfig:
    tokens: int  # training tokens; steps = ceil(tokens / (batch_size * block_size))
    batch_size: int = 16  # sequences per optimizer step, over all processes and accumulation steps
    micro_batch_size: int = 4  # sequences per forward pass on one process
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_fraction: float = 0.05
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    bf16: bool = True  # bf16 autocast where the device computes bf16 natively (``computes_bf16_natively``)
    trainable: Literal["all", "compressed"] = "all"
    eval_every: int = 50
    eval_blocks: int = 16
    checkpoint_every: int = 100
    log_every: int = 10
    seed: int = 0
    loss: DistillationLoss = field(default_factory=DistillationLoss)

    def __post_init__(self) -> None:
        if isinstance(self.loss, dict):
            self.loss = DistillationLoss(**self.loss)
        if self.tokens <= 0:
            raise ValueError(f"tokens must be positive, got {self.tokens}")
        if self.batch_size <= 0 or self.micro_batch_size <= 0 or self.batch_size % self.micro_batch_size:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be a positive multiple of micro_batch_size "
                f"({self.micro_batch_size})"
            )
        if self.trainable not in ("all", "compressed"):
            raise ValueError(f"trainable must be 'all' or 'compressed', got {self.trainable!r}")
        if not 0 <= self.warmup_fraction < 1 or self.lr <= 0:
            raise ValueError("need lr > 0 and 0 <= warmup_fraction < 1")

    def steps(self, block_size: int) -> int:
        return max(1, math.ceil(self.tokens / (self.batch_size * block_size)))

    def lr_at(self, step: int, total: int) -> float:
        warmup = round(self.warmup_fraction * total)
        if step < warmup:
            return self.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * cosine)

    def check_resumes(self, saved: dict) -> None:
        """Refuse to resume a checkpoint trained with other settings (cadence aside)."""
        current = asdict(self)
        changed = sorted(k for k in current if k not in CADENCE and saved.get(k) != current[k])
        if changed:
            detail = ", ".join(f"{k}: {saved.get(k)} -> {current[k]}" for k in changed)
            raise ValueError(f"cannot resume: the checkpoint was trained with different settings ({detail})")
