"""Named plans derived from a model's config (never hard-coded for GPT-2 small's 768 width)."""

from __future__ import annotations

import re
from dataclasses import replace

from torch import nn
from transformers import PretrainedConfig

from .layers import dense_weight
from .params import count_parameters
from .plan import CompressionPlan, Rule
from .shapes import svd_rank_for_params
from .surgery import EMBEDDING_TYPES, planned_parameters, resolve

PRESETS = ("tqcompressedgpt2", "kngpt2")


def _gpt2_dims(config: PretrainedConfig) -> tuple[int, int, int]:
    if getattr(config, "model_type", None) != "gpt2":
        raise ValueError(
            f"the GPT-2 presets need a GPT-2 model (model_type 'gpt2'), got {getattr(config, 'model_type', None)!r}; "
            "write a plan file for other architectures"
        )
    width, layers = config.n_embd, config.n_layer
    inner = config.n_inner or 4 * width
    if width % 4 or inner % 4:
        raise ValueError(f"GPT-2 presets need n_embd and n_inner divisible by 4, got {width} and {inner}")
    return width, inner, layers


def gpt2_steps(config: PretrainedConfig, permute: bool = True, **search) -> list[CompressionPlan]:
    """The paper's recipe as steps: token embedding ÷2, odd-layer MLPs 2x (r=4), token embedding ÷2."""
    width, inner, layers = _gpt2_dims(config)
    odd = "|".join(str(i) for i in range(1, layers, 2))
    embedding = Rule(r"transformer\.wte", embedding_factor=2, permute=permute, **search)
    mlp = [
        # A carries almost all parameters; B is 2x4 (c_fc) or 4x2 (c_proj); 4 terms halve the matrix.
        Rule(
            rf"transformer\.h\.({odd})\.mlp\.c_fc",
            shape=(width // 2, inner // 4, 2, 4),
            rank=4,
            permute=permute,
            **search,
        ),
        Rule(
            rf"transformer\.h\.({odd})\.mlp\.c_proj",
            shape=(inner // 4, width // 2, 4, 2),
            rank=4,
            permute=permute,
            **search,
        ),
    ]
    name = "tqcompressedgpt2" if permute else "kngpt2"
    return [
        CompressionPlan([embedding], name=f"{name}-step1-embedding"),
        CompressionPlan(mlp, name=f"{name}-step2-mlp"),
        CompressionPlan([embedding], name=f"{name}-step3-embedding"),
    ]


def preset(name: str, config: PretrainedConfig, tie_head: bool = True, **search) -> CompressionPlan:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    steps = gpt2_steps(config, permute=name == "tqcompressedgpt2", **search)
    description = (
        "token embedding width /2 then /2 again, odd-layer MLP c_fc/c_proj 2x with r=4, attention untouched, "
        + ("permutations searched" if name == "tqcompressedgpt2" else "no permutations (KnGPT-2 baseline)")
    )
    return CompressionPlan(
        [rule for step in steps for rule in step.rules], name=name, tie_head=tie_head, description=description
    )


def matching_svd_plan(model: nn.Module, plan: CompressionPlan) -> CompressionPlan:
    """Truncated SVD of the modules ``plan`` compresses, each at about the parameter count the plan
    leaves it: the low-rank baseline at equal size. Ranks round to the nearest integer."""
    total = count_parameters(model)
    rules = []
    for name in dict.fromkeys(name for _, name in resolve(model, plan)):
        own = [replace(rule, pattern=re.escape(name)) for rule in plan.rules if rule.matches(name)]
        target = planned_parameters(model, CompressionPlan(own, tie_head=True)) - total
        module = model.get_submodule(name)
        target += count_parameters(module)
        if isinstance(module, EMBEDDING_TYPES):
            rows, cols = module.num_embeddings, module.embedding_dim
        else:
            weight, bias, _ = dense_weight(module)
            rows, cols = weight.shape
            target -= 0 if bias is None else bias.numel()
        rank = svd_rank_for_params(rows, cols, target)
        rules.append(Rule(re.escape(name), method="svd", rank=rank))
    return CompressionPlan(
        rules,
        name=f"svd-matching-{plan.name}",
        tie_head=plan.tie_head,
        description=f"truncated SVD at the parameter count of {plan.name}",
    )
