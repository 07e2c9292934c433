"""Fold permutations across elementwise operations, so that a permuted Kronecker MLP gathers once.

In an MLP, y = down(act(gate(x)) * up(x)) (GPT-2: c_proj(act(c_fc(x)))), the output projection's input
gather x[..., index] commutes with the elementwise activation and product: the projections feeding it
can produce their outputs in that order instead (a compressed module composes it with its own output
gather, a dense one permutes its weight columns and bias at no run-time cost), and the output
projection stops gathering. The model computes exactly the same function; only the order of the MLP's
hidden units changes. Wide gathers cost about a copy of the activations each, which shows at prefill.
"""

from __future__ import annotations

import re

from torch import nn

from .methods import CompressedModule, is_compressed
from .methods.targets import is_linear, permute_dense_outputs
from .presets import architecture


def fold_permutations(model: nn.Module) -> list[str]:
    """Hand every MLP output projection's input permutation to the projections feeding it, in place.
    Returns the output projections that no longer gather. Model families: those the presets know."""
    arch, _, _, _ = architecture(model.config)
    consumer = re.compile(arch.layer.format(layers=r"\d+") + "(" + "|".join(map(re.escape, arch.mlp_out)) + ")")
    folded = []
    for name, module in list(model.named_modules()):
        if not consumer.fullmatch(name) or not is_compressed(module):
            continue
        index = module.input_permutation()
        if index is None:
            continue
        parent = name.rpartition(".")[0]
        producers = [model.get_submodule(f"{parent}.{producer}") for producer in arch.mlp_in]
        if not all(_can_permute_outputs(p) for p in producers):
            continue  # all or nothing: a half-folded MLP would compute something else
        index = index.clone()
        for producer in producers:
            if is_compressed(producer):
                producer.permute_outputs(index)
            else:
                permute_dense_outputs(producer, index)
        module.drop_input_permutation()
        folded.append(name)
    return folded


def _can_permute_outputs(module: nn.Module) -> bool:
    if is_compressed(module):
        return type(module).permute_outputs is not CompressedModule.permute_outputs
    return is_linear(module)
