"""Checkpoints: the save format plus ``optimizer.safetensors`` and ``trainer_state.json`` (no pickles),
written atomically, so a run killed at any moment resumes from the last complete one."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..serialization import load, save

CHECKPOINT = "checkpoint"
OPTIMIZER_FILE, STATE_FILE = "optimizer.safetensors", "trainer_state.json"


def write_checkpoint(out: Path, student: nn.Module, optimizer: torch.optim.Optimizer, state: dict, tokenizer) -> None:
    """``out/checkpoint``: the student, the optimizer's tensors and ``state`` (step, config, history)."""
    raw = optimizer.state_dict()
    tensors = {
        f"{index}.{key}": value.detach().cpu().contiguous()
        for index, entries in raw["state"].items()
        for key, value in entries.items()
    }
    state = {**state, "optimizer": {"param_groups": raw["param_groups"]}}

    def write_state(folder: Path) -> None:
        save_file(tensors, str(folder / OPTIMIZER_FILE))
        (folder / STATE_FILE).write_text(json.dumps(state, indent=1))

    save(student, out / CHECKPOINT, tokenizer, overwrite=True, write_extra=write_state)


def read_checkpoint(out: Path) -> tuple[nn.Module, dict]:
    """(the checkpointed student, its state); ``restore_optimizer`` loads the rest."""
    folder = out / CHECKPOINT
    return load(folder), json.loads((folder / STATE_FILE).read_text())


def restore_optimizer(optimizer: torch.optim.Optimizer, out: Path, state: dict) -> None:
    tensors = load_file(str(out / CHECKPOINT / OPTIMIZER_FILE))
    entries: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        entries.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": entries, "param_groups": state["optimizer"]["param_groups"]})
