"""The dense modules methods replace: linear layers (``nn.Linear`` and Hugging Face ``Conv1D``, whose
weights are stored transposed to each other) and embedding tables, read as matrices and built back."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

Layout = Literal["linear", "conv1d"]
LINEAR_TYPES = (nn.Linear, Conv1D)


def dense_weight(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, Layout]:
    """(W with shape in x out, bias, layout) of an ``nn.Linear`` or Hugging Face ``Conv1D``."""
    if isinstance(module, nn.Linear):
        return module.weight.detach().T, module.bias, "linear"
    if isinstance(module, Conv1D):
        return module.weight.detach(), module.bias, "conv1d"
    raise TypeError(f"cannot compress a {type(module).__name__}; expected nn.Linear or Conv1D")


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


def dense_embedding(weight: torch.Tensor) -> nn.Embedding:
    dense = nn.Embedding(*weight.shape)
    dense.weight.data = weight.detach().clone()
    return dense.to(weight.device, weight.dtype)


def optional_bias(bias: torch.Tensor | None) -> nn.Parameter | None:
    return None if bias is None else nn.Parameter(bias.detach().clone(memory_format=torch.contiguous_format))


def relative_error(approximation: torch.Tensor, reference: torch.Tensor) -> float:
    reference = reference.detach().double()
    return float(torch.linalg.norm(approximation.detach().double() - reference) / torch.linalg.norm(reference))


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
