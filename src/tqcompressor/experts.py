"""Mixture-of-Experts experts as linear layers.

transformers stores a layer's experts as 3-D tensors, ``gate_up_proj`` (or ``up_proj``) and ``down_proj``
with one matrix per expert, behind one interface (``integrations/moe.py``: classes decorated with
``use_experts_implementation`` say their layout in ``is_transposed``, ``has_gate``, ``has_bias`` and
``has_post_expert_norm``, gate with ``_apply_gate``, and dispatch the product to the implementation their
config names). Such tensors are not linear layers, so no plan or budget could reach them, though they
hold most of an MoE model's parameters (Mixtral-like: 80%).

``unfuse_experts`` turns every such module into one ``nn.Linear`` per expert and projection, under the
tensor's own name (``experts.down_proj.3``): calibration sees each expert's own inputs (the tokens routed to
it), and plans, budgets and every method treat an expert's projection as any other linear layer. The
module keeps its class; its dispatch goes to ``per_expert_forward``. ``fuse_experts`` stacks dense experts
back into the stock tensors (``materialize`` does, so an exported model is the stock architecture).
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.integrations.moe import ExpertsInterface

from .methods.targets import is_linear

PROJECTIONS = ("gate_up_proj", "up_proj", "down_proj")
# The experts implementation an unfused module dispatches to, registered with transformers' own interface:
# a class whose forward wraps the dispatch (Ergo normalises each route around it) keeps doing so.
IMPLEMENTATION = "tqcompressor_per_expert_linear"


def per_expert_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """Each expert's tokens through its own linear layers, gated and weighted as the fused implementations do."""
    output = torch.zeros_like(hidden_states)
    first = self.gate_up_proj if self.has_gate else self.up_proj
    for expert, (up, down) in enumerate(zip(first, self.down_proj, strict=True)):
        token, slot = torch.where(top_k_index == expert)
        if token.numel() == 0:
            continue  # an expert no token chose is not called: calibration then knows it unreached
        hidden = up(hidden_states[token])
        hidden = self._apply_gate(hidden) if self.has_gate else self.act_fn(hidden)
        hidden = down(hidden)
        if self.has_post_expert_norm:
            hidden = self.post_expert_norm(hidden)
        output.index_add_(0, token, (hidden * top_k_weights[token, slot, None]).to(output.dtype))
    return output


ExpertsInterface.register(IMPLEMENTATION, per_expert_forward)


class UnfusedExperts(nn.Module):
    """Mixed in before an experts class whose experts were unfused (``unfuse``): tells them apart."""


_UNFUSED_CLASSES: dict[type, type] = {}


def is_fused_experts(module: nn.Module) -> bool:
    """An experts module of transformers' experts interface, its experts still in 3-D tensors."""
    down = module._parameters.get("down_proj")
    return (
        hasattr(type(module), "_apply_gate")
        and hasattr(module, "is_transposed")
        and isinstance(getattr(module, "config", None), PretrainedConfig)
        and down is not None
        and down.dim() == 3
    )


def unfuse_experts(model: nn.Module) -> list[str]:
    """Turn every fused experts module of ``model`` into per-expert linear layers, in place (same outputs,
    up to summation order); returns their names. A model without any is left as it is."""
    names = [name for name, module in model.named_modules() if is_fused_experts(module)]
    for name in names:
        unfuse(model.get_submodule(name))
    return names


def unfuse(module: nn.Module) -> None:
    """One fused experts module, in place (``load`` rebuilds a saved model's this way before its weights)."""
    for projection in PROJECTIONS:
        weight = module._parameters.get(projection)
        if weight is None:
            continue
        bias = module._parameters.get(f"{projection}_bias") if module.has_bias else None
        layers = nn.ModuleList()
        for expert in range(weight.shape[0]):
            matrix = weight[expert].T if module.is_transposed else weight[expert]  # out x in, as nn.Linear's
            layer = nn.Linear(matrix.shape[1], matrix.shape[0], bias=bias is not None, device="meta")
            # Row-major, as a saved model loads it: the same layout takes the same kernels, the same logits.
            matrix = matrix.detach().clone(memory_format=torch.contiguous_format)
            layer.weight = nn.Parameter(matrix, requires_grad=weight.requires_grad)
            if bias is not None:
                layer.bias = nn.Parameter(bias[expert].detach().clone(), requires_grad=bias.requires_grad)
            layers.append(layer)
        del module._parameters[projection]
        if bias is not None:
            del module._parameters[f"{projection}_bias"]
        setattr(module, projection, layers)
    # Its own config, sharing everything but the implementation with the model's (whose other experts modules
    # keep theirs); the setter would set it in the shared sub-configs too.
    module.fused_config = module.config
    module.config = copy.copy(module.config)
    module.config._experts_implementation_internal = IMPLEMENTATION
    base = type(module)
    if base not in _UNFUSED_CLASSES:
        _UNFUSED_CLASSES[base] = type(f"Unfused{base.__name__}", (UnfusedExperts, base), {"__module__": __name__})
    module.__class__ = _UNFUSED_CLASSES[base]


def unfused_experts(model: nn.Module) -> list[str]:
    """The names of ``model``'s unfused experts modules (what ``save`` records and ``load`` redoes)."""
    return [name for name, module in model.named_modules() if isinstance(module, UnfusedExperts)]


def fuse_experts(model: nn.Module) -> list[str]:
    """Stack the linear layers of every unfused experts module whose experts are all dense back into the
    stock 3-D tensors, in place; returns their names. Modules holding a compressed expert stay unfused."""
    names = []
    for name in unfused_experts(model):
        module = model.get_submodule(name)
        if all(is_linear(layer) for p in PROJECTIONS if p in module._modules for layer in module._modules[p]):
            _fuse(module)
            names.append(name)
    return names


def _fuse(module: nn.Module) -> None:
    for projection in PROJECTIONS:
        layers = module._modules.get(projection)
        if layers is None:
            continue
        weights = [layer.weight.T if module.is_transposed else layer.weight for layer in layers]
        del module._modules[projection]
        module.register_parameter(projection, nn.Parameter(torch.stack(weights).detach()))
        if module.has_bias:
            stacked = torch.stack([layer.bias for layer in layers]).detach()
            module.register_parameter(f"{projection}_bias", nn.Parameter(stacked))
    module.config = module.fused_config
    del module.fused_config
    module.__class__ = type(module).__bases__[1]


def routed_owner(model: nn.Module, name: str) -> str | None:
    """The unfused experts module whose expert the linear layer ``name`` is (``...experts.down_proj.3`` ->
    ``...experts``), or None: an expert's layer is called only on the tokens routed to it, so on other tokens
    from one pass to the next once anything before it changes."""
    owner = name.rpartition(".")[0].rpartition(".")[0]
    return owner if owner and isinstance(model.get_submodule(owner), UnfusedExperts) else None
