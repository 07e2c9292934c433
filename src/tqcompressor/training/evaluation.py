"""Held-out next-token loss of the student during training (every process computes the same)."""

from __future__ import annotations

import math

import torch
from torch import nn

from .step import autocast


@torch.no_grad()
def heldout_loss(student: nn.Module, blocks: torch.Tensor, micro_batch_size: int, device, bf16: bool) -> dict:
    student.eval()
    total = 0.0
    for batch in blocks.split(micro_batch_size):
        input_ids = batch.to(device)
        with autocast(device, bf16):
            logits = student(input_ids).logits[:, :-1].float()
        total += float(
            nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1))
        ) * len(batch)
    loss = total / len(blocks)
    return {"heldout_loss": loss, "heldout_ppl": math.exp(min(loss, 700.0))}
