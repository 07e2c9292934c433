"""Depth reduction, the DistilGPT-2 baseline: keep some of the teacher's transformer blocks (every other
one by default), with their weights, and renumber them so that the KV cache and saving still work."""

from __future__ import annotations

import copy
import re

import torch
from torch import nn

from .experts import unfuse, unfused_experts
from .methods import CompressedModule


def kept_layers(layers: int, keep: str | list[int]) -> list[int]:
    """The block indices ``keep`` names: "even" (0, 2, 4, ...: DistilGPT-2's choice), "odd", or a list."""
    if keep == "even":
        return list(range(0, layers, 2))
    if keep == "odd":
        return list(range(1, layers, 2))
    if isinstance(keep, str):
        raise ValueError(f"keep must be 'even', 'odd' or a list of block indices, got {keep!r}")
    chosen = sorted(set(keep))
    if not chosen or chosen[0] < 0 or chosen[-1] >= layers:
        raise ValueError(f"block indices must lie in 0..{layers - 1}, got {keep}")
    return chosen


def _block_list(model: nn.Module) -> str:
    """The name of the one ``nn.ModuleList`` that holds the model's transformer blocks: as long as its
    config's layer count, and not inside another such list."""
    layers = getattr(model.config, "num_hidden_layers", None)
    if not isinstance(layers, int):
        raise ValueError(f"{type(model).__name__}'s config gives no layer count (num_hidden_layers)")
    found: list[str] = []
    for name, module in model.named_modules():
        inside = any(name.startswith(f"{outer}.") for outer in found)
        if isinstance(module, nn.ModuleList) and len(module) == layers and not inside:
            found.append(name)
    if len(found) != 1:
        where = f"{len(found)} lists of {layers} modules ({', '.join(found)})" if found else f"no list of {layers}"
        raise ValueError(f"cannot tell {type(model).__name__}'s transformer blocks apart: {where}")
    return found[0]


def _keep_in_config(config, layers: int, chosen: list[int]) -> None:
    """Make ``config`` that of the model with blocks ``chosen`` of ``layers``, in place (the model's modules
    hold this object): every per-layer list (layer_types, Llama 4's no_rope_layers, ...) keeps the entries
    of those blocks."""
    for key, value in list(vars(config).items()):
        if isinstance(value, list | tuple) and len(value) == layers and key != "architectures":
            setattr(config, key, type(value)(value[i] for i in chosen))
    config.num_hidden_layers = len(chosen)


def keep_layers_(model: nn.Module, keep: str | list[int] = "even") -> list[int]:
    """Drop every transformer block but those ``keep`` names, in place; returns the kept indices. Refuses,
    changing nothing, a choice the config would build other modules for (Qwen2-MoE with an expert layer
    every other block: its even blocks are dense, two blocks built anew would not both be) or that does
    not run."""
    if getattr(model.config, "scale_attn_by_inverse_layer_idx", False):
        raise ValueError("this model scales attention by its layer index; renumbered blocks would change it")
    if any(isinstance(module, CompressedModule) for module in model.modules()):
        # The check below builds the dense architecture, which a compressed model no longer matches.
        raise ValueError("keep the blocks of the dense model, then compress it")
    name = _block_list(model)
    layers = model.config.num_hidden_layers
    chosen = kept_layers(layers, keep)
    _refuse_other_modules(model, name, chosen)
    parent_name, _, attribute = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    blocks, settings = getattr(parent, attribute), dict(vars(model.config))
    numbers = [(module, module.layer_idx) for module in blocks.modules() if hasattr(module, "layer_idx")]
    setattr(parent, attribute, nn.ModuleList(blocks[i] for i in chosen))
    for new_index, block in enumerate(getattr(parent, attribute)):
        for module in block.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index  # the KV cache is indexed by it
    _keep_in_config(model.config, layers, chosen)
    try:
        _runs(model)
    except Exception as err:
        setattr(parent, attribute, blocks)
        for module, index in numbers:
            module.layer_idx = index
        vars(model.config).update(settings)
        raise ValueError(f"{type(model).__name__} with blocks {chosen} alone does not run: {err}") from err
    return chosen


def _refuse_other_modules(model: nn.Module, name: str, chosen: list[int]) -> None:
    """Raise unless the model built anew (on the meta device) from the config of blocks ``chosen`` of the
    list ``name`` has the parameters those blocks, renumbered, bring."""
    config = copy.deepcopy(model.config)
    _keep_in_config(config, config.num_hidden_layers, chosen)
    renumbered = {str(old): str(new) for new, old in enumerate(chosen)}
    pattern = re.compile(rf"^{re.escape(name)}\.(\d+)\.")

    def kept_as(key: str) -> str | None:
        match = pattern.match(key)
        if match is None:
            return key
        return f"{name}.{renumbered[match[1]]}.{key[match.end() :]}" if match[1] in renumbered else None

    kept = {kept_as(key): tensor.shape for key, tensor in model.state_dict().items() if kept_as(key) is not None}
    with torch.device("meta"):
        rebuilt = type(model)(config)
        for experts in filter(None, map(kept_as, unfused_experts(model))):
            unfuse(rebuilt.get_submodule(experts))  # as the model's own were
        built = {key: tensor.shape for key, tensor in rebuilt.state_dict().items()}
    if built != kept:
        differ = sorted(set(built) ^ set(kept)) or [key for key in built if built[key] != kept[key]]
        raise ValueError(
            f"{type(model).__name__} builds other modules for blocks {chosen} renumbered (its config ties them "
            f"to their index): {', '.join(differ[:3])} differ"
        )


@torch.no_grad()
def _runs(model: nn.Module) -> None:
    """Run two tokens through ``model`` (some layer mixes need a block of a kind the choice left out:
    Qwen3-Next's even blocks are all linear attention, and its forward then fails)."""
    weight = next(model.parameters())
    if weight.device.type != "meta":
        was_training = model.training
        model.eval()
        try:
            model(torch.zeros((1, 2), dtype=torch.long, device=weight.device))
        finally:
            model.train(was_training)
