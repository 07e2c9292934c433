"""The dense modules methods replace: linear layers (``nn.Linear`` and Hugging Face ``Conv1D``, whose
weights are stored transposed to each other) and embedding tables, read as matrices and built back."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import nn
from torch.utils._pytree import tree_map
from transformers.pytorch_utils import Conv1D

from ..linalg import relative
from .base import CompressedModule

Layout = Literal["linear", "conv1d"]
LINEAR_TYPES = (nn.Linear, Conv1D)
# Subclasses whose own forward still computes x Wᵀ + b. Of the eight nn.Linear subclasses in transformers
# 5.25 only Falcon's is; the others route to experts (Phi-MoE, Llama 4), group, rescale or look up.
_PLAIN_LINEAR_SUBCLASSES = {"transformers.models.falcon.modeling_falcon.FalconLinear"}


def is_linear(module: nn.Module) -> bool:
    """An ``nn.Linear`` or ``Conv1D`` whose forward is the product alone, so a compressed layer can stand
    in for it."""
    kind = type(module)
    return isinstance(module, LINEAR_TYPES) and (
        kind.forward in (nn.Linear.forward, Conv1D.forward)
        or f"{kind.__module__}.{kind.__qualname__}" in _PLAIN_LINEAR_SUBCLASSES
    )


def dense_weight(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, Layout]:
    """(W with shape in x out, bias, layout) of an ``nn.Linear`` or Hugging Face ``Conv1D``."""
    if isinstance(module, LINEAR_TYPES) and not is_linear(module):
        raise TypeError(
            f"cannot compress a {type(module).__name__}: its forward computes more than its weight's product "
            "(a router's top-k choice, a rescaling, ...), which no compressed layer would"
        )
    if isinstance(module, nn.Linear):
        return module.weight.detach().T, module.bias, "linear"
    if isinstance(module, Conv1D):
        return module.weight.detach(), module.bias, "conv1d"
    raise TypeError(f"cannot compress a {type(module).__name__}; expected nn.Linear or Conv1D")


def layer_weight(module: nn.Module, layout: Layout, like: torch.Tensor) -> torch.Tensor:
    """``module.dense_weight()`` (in x out) as the ``weight`` of a layer of ``layout`` (nn.Linear's out x in,
    Conv1D's in x out; ``like``: a factor, for dtype and device), for models that read a layer's weight
    instead of calling it (Mamba's ``dt_proj.weight @ x``, T5's cast to ``wo.weight.dtype``)."""
    rows, cols = module.in_features, module.out_features

    def compute() -> torch.Tensor:
        weight_io = module.dense_weight()
        return weight_io.T if layout == "linear" else weight_io

    return computed_weight(compute, (cols, rows) if layout == "linear" else (rows, cols), like)


def computed_weight(compute: Callable[[], torch.Tensor], shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """A weight computed from factors at each read: ``compute()`` itself while autograd records (gradients
    reach the factors); otherwise a tensor that computes it only when an operation uses its values, so a
    read for its dtype, device or shape costs nothing (Mamba casts its input to ``lm_head.weight.dtype``
    at every forward: computing a compressed tied embedding there made generation 4-5x slower)."""
    if torch.is_grad_enabled():
        return compute()
    return _Deferred(compute, shape, like.dtype, like.device)


class _Deferred(torch.Tensor):
    """Shape, dtype and device without values; any operation on it runs on ``compute()``."""

    @staticmethod
    def __new__(cls, compute: Callable[[], torch.Tensor], shape, dtype, device):
        tensor = torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=device)
        tensor.compute = compute
        return tensor

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        def values(x):
            return x.compute() if isinstance(x, _Deferred) else x

        return func(*tree_map(values, args), **tree_map(values, kwargs or {}))


def dense_linear(weight_io: torch.Tensor, bias: torch.Tensor | None, layout: Layout) -> nn.Module:
    """The ``nn.Linear`` or ``Conv1D`` computing x @ weight_io + bias."""
    in_features, out_features = weight_io.shape
    if layout == "conv1d":
        module = Conv1D(out_features, in_features)
        module.weight.data = weight_io.detach().clone()
        module.bias.data = bias.detach().clone() if bias is not None else torch.zeros_like(module.bias)
    else:
        module = nn.Linear(in_features, out_features, bias=bias is not None)
        module.weight.data = weight_io.detach().T.clone()
        if bias is not None:
            module.bias.data = bias.detach().clone()
    return module.to(weight_io.device, weight_io.dtype)


# What a token embedding may hold beyond nn.Embedding's and still be a lookup times a constant: Hugging
# Face's *ScaledWordEmbedding classes (Gemma, BART, M2M100 and others) multiply each row by embed_scale.
_SCALE_ATTRIBUTES = {"embed_scale", "scalar_embed_scale"}
_PLAIN_ATTRIBUTES = set(vars(nn.Embedding(1, 1)))


class ScaledEmbedding(nn.Embedding):
    """A dense table whose rows come out times ``embed_scale``: what a compressed embedding that stands in
    for a scaled one materializes as (its state dict is the table alone, as the original's)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, embed_scale: float):
        super().__init__(num_embeddings, embedding_dim)
        self.embed_scale = embed_scale

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return super().forward(input_ids) * self.embed_scale


def embedding_scale(module: nn.Module) -> float | None:
    """The constant a token embedding (dense or compressed) multiplies the rows it looks up by, None for a
    plain lookup. Raises for an embedding whose forward does more (a norm, rows of its own, positions),
    which no compressed table can stand in for."""
    if isinstance(module, CompressedModule):
        return module.embed_scale
    if type(module).forward is nn.Embedding.forward:
        return None
    own = (
        {name for name in vars(module) if not name.startswith("_")} - _PLAIN_ATTRIBUTES  # not HF's bookkeeping
        | {name for name, _ in module.named_buffers()}
        | {name for name, _ in module.named_parameters() if name != "weight"}
        | {name for name, _ in module.named_children()}
    )
    if "embed_scale" not in own or not own <= _SCALE_ATTRIBUTES:
        raise ValueError(
            f"{type(module).__name__} computes more than a table lookup in its forward; only nn.Embedding and "
            "embeddings that scale their rows by embed_scale can be compressed"
        )
    return float(module.embed_scale)


def dense_embedding(weight: torch.Tensor, embed_scale: float | None = None) -> nn.Embedding:
    dense = nn.Embedding(*weight.shape) if embed_scale is None else ScaledEmbedding(*weight.shape, embed_scale)
    dense.weight.data = weight.detach().clone()
    return dense.to(weight.device, weight.dtype)


def optional_bias(bias: torch.Tensor | None) -> nn.Parameter | None:
    return None if bias is None else nn.Parameter(bias.detach().clone(memory_format=torch.contiguous_format))


def relative_error(approximation: torch.Tensor, reference: torch.Tensor) -> float:
    reference = reference.detach().double()
    return relative((approximation.detach().double() - reference).square().sum(), reference.square().sum())


def permute_dense_outputs(module: nn.Module, index: torch.Tensor) -> None:
    """Make a dense linear layer produce y[..., index] instead of y (its weight columns and bias)."""
    _, bias, layout = dense_weight(module)
    with torch.no_grad():
        if layout == "conv1d":
            module.weight.copy_(module.weight[:, index])
        else:
            module.weight.copy_(module.weight[index])
        if bias is not None:
            module.bias.copy_(module.bias[index])
