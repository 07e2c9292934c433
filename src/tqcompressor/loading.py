"""Open what a user names as a model: a tqcompressor directory, a Hugging Face directory or Hub name,
or a GGUF file (dequantized to float32)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

from .serialization import load, read_config


def load_model(name_or_path: str, gguf_file: str | None = None) -> tuple[nn.Module, object]:
    """(model in eval mode and in float32, tokenizer). ``name_or_path`` may be a ``.gguf`` file itself, or
    a directory holding ``gguf_file``."""
    from transformers import AutoConfig, AutoTokenizer

    path = Path(name_or_path)
    if path.suffix == ".gguf":
        if gguf_file is not None:
            raise ValueError(f"{name_or_path} is a GGUF file already; --gguf-file names one inside a directory")
        path, gguf_file = path.parent, path.name
    if gguf_file is not None:
        return _load_gguf(path, gguf_file)
    # A path that exists must hold a model (read_config says clearly where it does not); else a Hub name.
    if path.exists() and "tqcompressor" in read_config(path):
        model = load(name_or_path)
    else:
        # float32 whatever the checkpoint stores (most current LLMs store bf16): fits and calibration
        # statistics want the precision, and a CPU without native bf16 (AVX2) emulates it
        # (``computes_bf16_natively``).
        model_type = model_class(AutoConfig.from_pretrained(name_or_path))
        model = model_type.from_pretrained(name_or_path, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(name_or_path)


def stored_dtype(name_or_path: str, gguf_file: str | None = None) -> torch.dtype:
    """The floating dtype a model's checkpoint stores, which its compressed copy is saved in: the config's
    ``dtype``; float32 for GGUF files (their quantized formats have no torch counterpart) and configs
    that name none."""
    from transformers import AutoConfig

    if Path(name_or_path).suffix == ".gguf" or gguf_file is not None:
        return torch.float32
    # A compressed run's config.json is its base model's, so transformers reads its dtype (or an older
    # config's torch_dtype) the same way.
    dtype = getattr(AutoConfig.from_pretrained(name_or_path), "dtype", None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def model_class(config) -> type:
    """The class the config names (``architectures``: causal LM, masked LM, classifier, ...); a causal LM
    for configs that name none but have one, else the bare ``AutoModel``."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    for name in getattr(config, "architectures", None) or []:
        found = getattr(transformers, name, None)
        if found is not None:
            return found
    if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return transformers.AutoModelForCausalLM
    return transformers.AutoModel


def is_causal_lm(model: nn.Module) -> bool:
    """Whether perplexity means something for ``model`` (it predicts the next token)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return type(model).__name__ in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


def _load_gguf(directory: Path, name: str) -> tuple[nn.Module, object]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise ValueError("reading GGUF files needs the gguf package: pip install gguf")
    if not (directory / name).is_file():
        raise FileNotFoundError(f"{directory / name} does not exist")
    quantized = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are float32 now; a GGUF-flagged model refuses to save
    model = type(quantized)(config)
    model.load_state_dict(quantized.state_dict(), strict=False)
    model.tie_weights()
    return model.eval(), AutoTokenizer.from_pretrained(directory, gguf_file=name)


def check_runs_on_token_ids(model: nn.Module, work: str, instead: str) -> None:
    """Raises for an encoder-decoder model: ``work`` runs a model on token ids alone, and its forward needs
    the decoder's inputs too (which text those should be is the user's call, not ours)."""
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        raise ValueError(
            f"{type(model).__name__} is an encoder-decoder model; {work} runs a model on token ids alone: {instead}"
        )
