"""Depth reduction, the DistilGPT-2 baseline: keep some of the teacher's transformer blocks (every other
one by default), with their weights, and renumber them so that the KV cache and saving still work."""

from __future__ import annotations

from torch import nn

from .presets import architecture


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


def keep_layers_(model: nn.Module, keep: str | list[int] = "even") -> list[int]:
    """Drop every transformer block but those ``keep`` names, in place; returns the kept indices.
    Model families: those the presets know (GPT-2 and the LLaMA family)."""
    arch, _, _, layers = architecture(model.config)
    if getattr(model.config, "scale_attn_by_inverse_layer_idx", False):
        raise ValueError("this model scales attention by its layer index; renumbered blocks would change it")
    chosen = kept_layers(layers, keep)
    parent_name, _, attribute = arch.blocks.rpartition(".")
    parent = model.get_submodule(parent_name)
    blocks = getattr(parent, attribute)
    setattr(parent, attribute, nn.ModuleList(blocks[i] for i in chosen))
    for new_index, block in enumerate(getattr(parent, attribute)):
        for module in block.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index  # the KV cache is indexed by it
    setattr(model.config, arch.layers, len(chosen))
    layer_types = getattr(model.config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == layers:
        model.config.layer_types = [layer_types[i] for i in chosen]
    return chosen
