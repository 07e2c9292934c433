"""Low-rank layers: y = (x U) V, the truncated-SVD baseline as drop-in modules."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..base import CompressedModule
from ..targets import Layout, dense_embedding, dense_linear, dense_weight, layer_weight, optional_bias
from .factors import LowRankFactors


class LowRankLinear(CompressedModule):
    """y = (x U) V + bias."""

    spec_type = "lowrank_linear"
    kind = "linear"

    def __init__(self, factors: LowRankFactors, bias: torch.Tensor | None = None, layout: Layout = "linear"):
        super().__init__()
        self.in_features, self.out_features = factors.u.shape[0], factors.v.shape[1]
        self.layout = layout
        self.u = self.parameter(factors.u)
        self.v = self.parameter(factors.v)
        self.bias = optional_bias(bias)

    @classmethod
    def from_module(cls, module: nn.Module, factors: LowRankFactors) -> LowRankLinear:
        weight, bias, layout = dense_weight(module)
        if (factors.u.shape[0], factors.v.shape[1]) != tuple(weight.shape):
            raise ValueError(f"low-rank factors do not match a {tuple(weight.shape)} weight")
        return cls(factors, bias, layout)

    def to_spec(self) -> dict[str, Any]:
        return {
            "in": self.in_features,
            "out": self.out_features,
            "rank": self.u.shape[1],
            "layout": self.layout,
            "bias": self.bias is not None,
        }

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> LowRankLinear:
        factors = LowRankFactors(torch.zeros(spec["in"], spec["rank"]), torch.zeros(spec["rank"], spec["out"]))
        return cls(factors, torch.zeros(spec["out"]) if spec["bias"] else None, spec["layout"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = (x @ self.u.to(x.dtype)) @ self.v.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def permute_outputs(self, index: torch.Tensor) -> None:
        with torch.no_grad():
            self.v.copy_(self.v[:, index])
            if self.bias is not None:
                self.bias.copy_(self.bias[index])

    def dense_weight(self) -> torch.Tensor:
        return self.u @ self.v

    @property
    def weight(self) -> torch.Tensor:
        return layer_weight(self, self.layout, self.u)

    def to_dense(self) -> nn.Module:
        return dense_linear(self.dense_weight().detach(), self.bias, self.layout)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.u.shape[1]}"


class LowRankEmbedding(CompressedModule):
    """E = U V (vocab x k, k x d), with a factorised head."""

    spec_type = "lowrank_embedding"
    kind = "embedding"

    def __init__(self, factors: LowRankFactors):
        super().__init__()
        self.u = self.parameter(factors.u)
        self.v = self.parameter(factors.v)
        self.num_embeddings, self.embedding_dim = self.u.shape[0], self.v.shape[1]

    def to_spec(self) -> dict[str, Any]:
        return {"vocab": self.num_embeddings, "dim": self.embedding_dim, "rank": self.u.shape[1]}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> LowRankEmbedding:
        return cls(LowRankFactors(torch.zeros(spec["vocab"], spec["rank"]), torch.zeros(spec["rank"], spec["dim"])))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.scaled(F.embedding(input_ids, self.u) @ self.v.to(self.u.dtype))

    def attend(self, hidden: torch.Tensor) -> torch.Tensor:
        return (hidden @ self.v.to(hidden.dtype).T) @ self.u.to(hidden.dtype).T

    @property
    def weight(self) -> torch.Tensor:
        return self.u @ self.v

    def to_dense(self) -> nn.Embedding:
        return dense_embedding(self.weight, self.embed_scale)
