"""Named plans derived from a model's config (never hard-coded for GPT-2 small's 768 width)."""

from __future__ import annotations

from transformers import PretrainedConfig

from .plan import CompressionPlan, Rule

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
