"""Block reconstruction: after closed-form fits, tune a block's parameters together by gradient descent on
its output error over the calibration batches (as BRECQ and OmniQuant do for quantised blocks). Each
closed-form fit is exact for one linear layer on its own inputs; the block's nonlinearities (the MLP's
gate, the attention's softmax) and how its layers' errors combine are what is left, and only a joint,
iterative fit reaches them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

# Adam's step for block reconstruction, from a probe of 1e-4, 1e-3 and 3e-3 on the first four blocks of
# SmolLM2's seed-1 plan at 70% (32k calibration tokens, 3 and 10 passes, the error then taken over the whole
# batch, not per token): see README, 'Block reconstruction'.
RECONSTRUCTION_LR = 1e-3


@dataclass
class Reconstruction:
    """Relative output error on the held-out batch before and after; ``epoch``: the epoch whose parameters
    were kept (0: none beat the block as it came, which was kept)."""

    before: float
    after: float
    epoch: int


def reconstruct(
    parameters: Sequence[torch.nn.Parameter],
    output: Callable[[int], torch.Tensor],
    targets: Sequence[torch.Tensor],
    epochs: int,
    lr: float = RECONSTRUCTION_LR,
    seed: int = 0,
) -> Reconstruction:
    """Minimise each batch's mean over tokens of ‖output(i) − targets[i]‖² / ‖targets[i]‖² (norms over the
    last dimension) over ``parameters`` with Adam, one step per batch, ``epochs`` passes over the batches
    but the last, in an order drawn from ``seed``. The last batch is held out: the parameters after the
    epoch with the lowest held-out error are kept, or the given ones if no epoch lowers it, so a
    reconstruction never leaves the held-out error higher than it found it."""
    if len(targets) < 2:
        raise ValueError("block reconstruction holds one calibration batch out: it needs at least two batches")
    if epochs < 1:
        raise ValueError(f"epochs must be 1 or more, got {epochs}")
    parameters = list(parameters)
    wanted = [p.requires_grad for p in parameters]
    best = [p.detach().clone() for p in parameters]
    held_out = len(targets) - 1

    def error(i: int) -> torch.Tensor:
        # Per token, not over the batch: a sequence's first token can carry hidden states a hundred times
        # larger than the rest (SmolLM2 after block 15: 98% of a 512-token sequence's squared norm) while
        # the next block normalises each token, so a batch-wide ratio would tune for that one token.
        target = targets[i]
        per_token = (output(i) - target).square().sum(-1) / target.square().sum(-1).clamp_min(
            torch.finfo(target.dtype).tiny
        )
        return per_token.mean()

    with torch.no_grad():
        before = lowest = float(error(held_out))
    kept = 0
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(parameters, lr=lr)
    try:
        for p in parameters:
            p.requires_grad_(True)
        for epoch in range(1, epochs + 1):
            with torch.enable_grad():
                for i in torch.randperm(held_out, generator=generator).tolist():
                    optimizer.zero_grad(set_to_none=True)
                    error(i).backward()
                    optimizer.step()
            with torch.no_grad():
                now = float(error(held_out))
                if now < lowest:
                    lowest, kept = now, epoch
                    best = [p.detach().clone() for p in parameters]
        with torch.no_grad():
            for p, value in zip(parameters, best, strict=True):
                p.copy_(value)
    finally:
        for p, flag in zip(parameters, wanted, strict=True):
            p.requires_grad_(flag)
            p.grad = None
    return Reconstruction(before, lowest, kept)
