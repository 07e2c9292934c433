"""Named plans, derived from the model's config: module names from ``config.model_type``, factor shapes
from its widths (never hard-coded for GPT-2 small's 768)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn
from transformers import PretrainedConfig

from .methods import is_embedding
from .methods.kronecker import KroneckerConfig
from .methods.lowrank import LowRankConfig, rank_for_params
from .methods.targets import dense_weight
from .params import count_parameters
from .plan import CompressionPlan, Rule
from .surgery import planned_parameters, resolve

PRESETS = ("tqcompressedgpt2", "kngpt2")


@dataclass(frozen=True)
class Architecture:
    """Where the paper's recipe acts in one model family (module-name regular expressions)."""

    embedding: str
    layer: str  # with {layers}: an alternation of layer indices
    mlp_in: tuple[str, ...]  # in x out = width x inner
    mlp_out: tuple[str, ...]  # in x out = inner x width
    width: str  # config attribute names
    inner: str
    layers: str
    blocks: str  # the ModuleList of transformer blocks


GPT2 = Architecture(
    r"transformer\.wte",
    r"transformer\.h\.({layers})\.mlp\.",
    ("c_fc",),
    ("c_proj",),
    "n_embd",
    "n_inner",
    "n_layer",
    "transformer.h",
)
LLAMA = Architecture(
    r"model\.embed_tokens",
    r"model\.layers\.({layers})\.mlp\.",
    ("gate_proj", "up_proj"),
    ("down_proj",),
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "model.layers",
)
ARCHITECTURES = {"gpt2": GPT2, "llama": LLAMA, "mistral": LLAMA, "qwen2": LLAMA, "qwen3": LLAMA}


def architecture(config: PretrainedConfig) -> tuple[Architecture, int, int, int]:
    """(module names, width, MLP inner width, layers) of a supported model family."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"the presets know model types {', '.join(ARCHITECTURES)}, not {model_type!r}; write a plan file for it"
        )
    arch = ARCHITECTURES[model_type]
    width, layers = getattr(config, arch.width), getattr(config, arch.layers)
    inner = getattr(config, arch.inner, None) or 4 * width  # GPT-2's n_inner may be None
    if width % 4 or inner % 4:
        raise ValueError(f"the presets need the model and MLP widths divisible by 4, got {width} and {inner}")
    return arch, width, inner, layers


def halved_mlp_rules(config: PretrainedConfig, layers: str, permute: bool = True, **search) -> list[Rule]:
    r"""Every MLP projection of the blocks ``layers`` (a regex alternation of indices, e.g. ``1|3|5`` or
    ``\d+``) at ½ its parameters, the paper's way."""
    arch, width, inner, _ = architecture(config)
    prefix = arch.layer.format(layers=layers)
    # A carries almost all parameters; B is 2x4 (into the MLP) or 4x2 (out of it); 4 terms halve the matrix.
    grow = KroneckerConfig(shape=(width // 2, inner // 4, 2, 4), rank=4, permute=permute, **search)
    shrink = KroneckerConfig(shape=(inner // 4, width // 2, 4, 2), rank=4, permute=permute, **search)
    rules = [Rule(prefix + re.escape(name), grow) for name in arch.mlp_in]
    return rules + [Rule(prefix + re.escape(name), shrink) for name in arch.mlp_out]


def paper_steps(config: PretrainedConfig, permute: bool = True, **search) -> list[CompressionPlan]:
    """The paper's recipe as steps: token embedding ÷2, odd-layer MLPs 2x (r=4), token embedding ÷2."""
    arch, _, _, layers = architecture(config)
    embedding = Rule(arch.embedding, KroneckerConfig(embedding_factor=2, permute=permute, **search))
    mlp = halved_mlp_rules(config, "|".join(str(i) for i in range(1, layers, 2)), permute, **search)
    name = "tqcompressedgpt2" if permute else "kngpt2"
    return [
        CompressionPlan([embedding], name=f"{name}-step1-embedding"),
        CompressionPlan(mlp, name=f"{name}-step2-mlp"),
        CompressionPlan([embedding], name=f"{name}-step3-embedding"),
    ]


def preset_steps(name: str, config: PretrainedConfig, tie_head: bool = True, **search) -> list[CompressionPlan]:
    """``tqcompressedgpt2`` (permutations searched) or ``kngpt2`` (none): the paper's GPT-2 recipe,
    mapped onto the model's family, as its three steps. ``search``: the Kronecker search fields
    (``time_budget``, ``iterations``, ...)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    try:
        steps = paper_steps(config, permute=name == "tqcompressedgpt2", **search)
    except ValueError as err:
        raise ValueError(f"preset {name}: {err}") from err
    for step in steps:
        step.tie_head = tie_head
    return steps


def preset(name: str, config: PretrainedConfig, tie_head: bool = True, **search) -> CompressionPlan:
    """The preset's steps as one plan."""
    steps = preset_steps(name, config, tie_head, **search)
    description = (
        "token embedding width /2 then /2 again, odd-layer MLP projections 2x with r=4, attention untouched, "
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
        own = [Rule(re.escape(name), rule.config) for rule in plan.rules if rule.matches(name)]
        module = model.get_submodule(name)
        target = planned_parameters(model, CompressionPlan(own, tie_head=True)) - total + count_parameters(module)
        if is_embedding(module):
            rows, cols = module.weight.shape
        else:
            weight, bias, _ = dense_weight(module)
            rows, cols = weight.shape
            target -= 0 if bias is None else bias.numel()
        rules.append(Rule(re.escape(name), LowRankConfig(rank=rank_for_params(rows, cols, target))))
    return CompressionPlan(
        rules,
        name=f"svd-matching-{plan.name}",
        tie_head=plan.tie_head,
        description=f"truncated SVD at the parameter count of {plan.name}",
    )
