"""A stage that continues a multi-stage run instead of starting over.

Every stage of a run reads the data from where the stage before it stopped (a stage that started
from the first batch again would see the same sequences as every other stage). Restarting AdamW and
its warm-up at every compression step throws away the moment estimates of every parameter the step
did not touch and sends the learning rate back through zero; the paper's argument for compressing in
steps assumes the student keeps what it learned. A continuing stage therefore follows the run's one
warm-up + cosine schedule, keeps the optimizer state of the parameters that the step left unchanged,
and warms up only the parameters the step created (their moments start at zero)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

FINAL_OPTIMIZER = "optimizer.safetensors"  # beside a stage's final model, for the stage after it
SEPARATOR = "#"  # parameter names contain dots, never '#'


@dataclass
class Continuation:
    first_step: int  # optimizer steps the run made before this stage
    run_steps: int  # optimizer steps of the whole run
    optimizer_state: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # by parameter name
    restart: bool = False  # fresh AdamW and a warm-up + cosine schedule of the stage's own (data moves on)

    def __post_init__(self) -> None:
        if not 0 <= self.first_step < self.run_steps:
            raise ValueError(f"a stage starting at step {self.first_step} lies outside a {self.run_steps}-step run")
        if self.restart and self.optimizer_state:
            raise ValueError("a stage that restarts the optimizer cannot carry optimizer state")


def optimizer_state_by_name(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    names = {id(p): name for name, p in model.named_parameters()}
    return {
        names[id(p)]: {key: value.detach().cpu().clone() for key, value in entries.items()}
        for p, entries in optimizer.state.items()
        if id(p) in names
    }


def write_optimizer_state(state: dict[str, dict[str, torch.Tensor]], path: Path) -> None:
    tensors = {
        f"{name}{SEPARATOR}{key}": value.contiguous()
        for name, entries in state.items()
        for key, value in entries.items()
    }
    save_file(tensors, str(path))


def read_optimizer_state(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    state: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in load_file(str(path)).items():
        name, entry = key.rsplit(SEPARATOR, 1)
        state.setdefault(name, {})[entry] = value
    return state


def parameter_values(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().clone() for name, p in model.named_parameters()}


def unchanged_parameters(before: dict[str, torch.Tensor], after: nn.Module) -> set[str]:
    """Names whose parameter holds the same values in ``after`` as in ``before`` (``parameter_values`` of
    the model before a compression step): what the step kept."""
    return {
        name
        for name, p in after.named_parameters()
        if name in before and before[name].shape == p.shape and torch.equal(before[name], p.detach().cpu())
    }
