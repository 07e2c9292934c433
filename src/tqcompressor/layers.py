"""Drop-in torch modules for compressed weights. They compute through the factors and never build
the dense matrix in forward; ``to_dense()`` gives the equivalent original-architecture module."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from .kronecker import KroneckerFactors
from .lowrank import LowRankFactors

Layout = Literal["linear", "conv1d"]


def dense_weight(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, Layout]:
    """(W with shape in x out, bias, layout) of an ``nn.Linear`` or Hugging Face ``Conv1D``."""
    if isinstance(module, nn.Linear):
        return module.weight.detach().T, module.bias, "linear"
    if isinstance(module, Conv1D):
        return module.weight.detach(), module.bias, "conv1d"
    raise TypeError(f"cannot compress a {type(module).__name__}; expected nn.Linear or Conv1D")


def _dense_module(weight_io: torch.Tensor, bias: torch.Tensor | None, layout: Layout) -> nn.Module:
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


def _parameter(tensor: torch.Tensor) -> nn.Parameter:
    # Always row-major: SVD factors come out column-major, and a saved model loads row-major. Equal
    # layouts make a reloaded model take the same GEMM kernels, so its logits are bit-identical.
    return nn.Parameter(tensor.detach().clone(memory_format=torch.contiguous_format))


def _optional_bias(bias: torch.Tensor | None) -> nn.Parameter | None:
    return None if bias is None else _parameter(bias)


class KroneckerLinear(nn.Module):
    """y = x W + bias with W[input_perm][:, col_perm] = sum_i a[i] ⊗ b[i], applied as two matmuls."""

    def __init__(self, factors: KroneckerFactors, bias: torch.Tensor | None = None, layout: Layout = "linear"):
        super().__init__()
        shape = factors.shape
        self.m1, self.n1, self.m2, self.n2, self.rank = shape.m1, shape.n1, shape.m2, shape.n2, shape.rank
        self.in_features, self.out_features = shape.in_features, shape.out_features
        self.layout = layout
        self.a = _parameter(factors.a)
        self.b = _parameter(factors.b)
        self.bias = _optional_bias(bias)
        self.register_buffer("input_index", factors.row_perm.detach().clone().long())
        self.register_buffer("output_index", torch.argsort(factors.col_perm.detach()).long())
        # Contract the big factor first when it shrinks the intermediate (e.g. GPT-2 c_fc: A 384x768, B 2x4).
        r, m1, n1, m2, n2 = self.rank, self.m1, self.n1, self.m2, self.n2
        self.a_first = r * m1 * n1 * m2 + r * n1 * m2 * n2 <= r * m1 * m2 * n2 + r * m1 * n2 * n1

    @classmethod
    def from_module(cls, module: nn.Module, factors: KroneckerFactors) -> KroneckerLinear:
        weight, bias, layout = dense_weight(module)
        factors.shape.check_matrix(*weight.shape)
        return cls(factors, bias, layout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        r, m1, n1, m2, n2 = self.rank, self.m1, self.n1, self.m2, self.n2
        a, b = self.a.to(x.dtype), self.b.to(x.dtype)
        x = x.reshape(-1, self.in_features).index_select(1, self.input_index).view(-1, m1, m2)
        tokens = x.shape[0]
        # Each step is one large GEMM over all tokens; the second contracts the (slot, term) pairs.
        if self.a_first:
            t = x.transpose(1, 2).reshape(tokens * m2, m1) @ a.permute(1, 0, 2).reshape(m1, r * n1)
            y = t.view(tokens, m2 * r, n1).transpose(1, 2) @ b.permute(1, 0, 2).reshape(m2 * r, n2)
        else:
            t = x.reshape(tokens * m1, m2) @ b.permute(1, 0, 2).reshape(m2, r * n2)
            y = (t.view(tokens, m1 * r, n2).transpose(1, 2) @ a.permute(1, 0, 2).reshape(m1 * r, n1)).transpose(1, 2)
        y = y.reshape(tokens, self.out_features).index_select(1, self.output_index)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*lead, self.out_features)

    def dense_weight(self) -> torch.Tensor:
        """The equivalent W (in x out); only for export and tests, never used in forward."""
        permuted = torch.einsum("rac,rbd->abcd", self.a, self.b).reshape(self.in_features, self.out_features)
        weight = torch.empty_like(permuted)
        weight[self.input_index] = permuted[:, self.output_index]
        return weight

    def to_dense(self) -> nn.Module:
        return _dense_module(self.dense_weight().detach(), self.bias, self.layout)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, rank={self.rank}, "
            f"A={self.m1}x{self.n1}, B={self.m2}x{self.n2}, bias={self.bias is not None}, "
            f"layout={self.layout}"
        )


class LowRankLinear(nn.Module):
    """y = (x U) V + bias: the truncated-SVD baseline as a layer."""

    def __init__(self, factors: LowRankFactors, bias: torch.Tensor | None = None, layout: Layout = "linear"):
        super().__init__()
        self.in_features, self.out_features = factors.u.shape[0], factors.v.shape[1]
        self.layout = layout
        self.u = _parameter(factors.u)
        self.v = _parameter(factors.v)
        self.bias = _optional_bias(bias)

    @classmethod
    def from_module(cls, module: nn.Module, factors: LowRankFactors) -> LowRankLinear:
        weight, bias, layout = dense_weight(module)
        if (factors.u.shape[0], factors.v.shape[1]) != tuple(weight.shape):
            raise ValueError(f"low-rank factors do not match a {tuple(weight.shape)} weight")
        return cls(factors, bias, layout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = (x @ self.u.to(x.dtype)) @ self.v.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def dense_weight(self) -> torch.Tensor:
        return self.u @ self.v

    def to_dense(self) -> nn.Module:
        return _dense_module(self.dense_weight().detach(), self.bias, self.layout)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.u.shape[1]}"


class KroneckerEmbedding(nn.Module):
    """E = expand(base): each stage s maps rows of width d to width d*k_s as (row ⊗ scale_s)[:, index_s].

    One stage is the paper's kron(E', b)[:, p]; compressing again (÷2 then ÷2) factors ``base`` and
    adds an inner stage, so the outer stages are kept exactly.
    """

    def __init__(self, base: torch.Tensor, scales: list[torch.Tensor], indices: list[torch.Tensor]):
        super().__init__()
        if len(scales) != len(indices) or not scales:
            raise ValueError("a KroneckerEmbedding needs one index per scale and at least one stage")
        self.base = _parameter(base)
        self.scales = nn.ParameterList([_parameter(s.reshape(-1)) for s in scales])
        for i, index in enumerate(indices):
            self.register_buffer(f"index_{i}", index.detach().clone().long())
        self.num_embeddings = base.shape[0]
        self.embedding_dim = base.shape[1] * int(torch.tensor([s.numel() for s in scales]).prod())

    @classmethod
    def from_factors(cls, factors: KroneckerFactors, inner_of: KroneckerEmbedding | None = None):
        """Build from factors of E (or of ``inner_of.base``), E[:, col_perm] ≈ a[0] ⊗ b[0]."""
        shape = factors.shape
        if shape.rank != 1 or shape.m2 != 1:
            raise ValueError(f"embedding factors must have rank 1 and B of one row, got {shape.describe()}")
        scale, index = factors.b[0, 0], torch.argsort(factors.col_perm)
        if inner_of is None:
            return cls(factors.a[0], [scale], [index])
        outer = [(s, inner_of.stage_index(i)) for i, s in enumerate(inner_of.scales)]
        return cls(factors.a[0], [scale] + [s for s, _ in outer], [index] + [i for _, i in outer])

    def stage_index(self, stage: int) -> torch.Tensor:
        return getattr(self, f"index_{stage}")

    def expand(self, rows: torch.Tensor) -> torch.Tensor:
        for stage, scale in enumerate(self.scales):
            rows = (rows.unsqueeze(-1) * scale.to(rows.dtype)).flatten(-2)
            rows = rows.index_select(-1, self.stage_index(stage))
        return rows

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.expand(F.embedding(input_ids, self.base))

    def attend(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden @ E.T through the factors: undo each stage's gather and scale, then one small matmul."""
        for stage in reversed(range(len(self.scales))):
            scale = self.scales[stage].to(hidden.dtype)
            inverse = torch.argsort(self.stage_index(stage))
            hidden = hidden.index_select(-1, inverse).unflatten(-1, (-1, scale.numel())) @ scale
        return hidden @ self.base.to(hidden.dtype).T

    @property
    def weight(self) -> torch.Tensor:
        """The dense (vocab x d) matrix; for export and tests only."""
        return self.expand(self.base)

    def to_dense(self) -> nn.Embedding:
        dense = nn.Embedding(self.num_embeddings, self.embedding_dim)
        dense.weight.data = self.weight.detach().clone()
        return dense.to(self.base.device, self.base.dtype)

    def extra_repr(self) -> str:
        ks = "x".join(str(s.numel()) for s in self.scales)
        return f"{self.num_embeddings}, {self.embedding_dim}, base_dim={self.base.shape[1]}, k={ks}"


class LowRankEmbedding(nn.Module):
    """E = U V (vocab x k, k x d): the truncated-SVD baseline for embeddings, with a factorised head."""

    def __init__(self, factors: LowRankFactors):
        super().__init__()
        self.u = _parameter(factors.u)
        self.v = _parameter(factors.v)
        self.num_embeddings, self.embedding_dim = self.u.shape[0], self.v.shape[1]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.u) @ self.v.to(self.u.dtype)

    def attend(self, hidden: torch.Tensor) -> torch.Tensor:
        return (hidden @ self.v.to(hidden.dtype).T) @ self.u.to(hidden.dtype).T

    @property
    def weight(self) -> torch.Tensor:
        return self.u @ self.v

    def to_dense(self) -> nn.Embedding:
        dense = nn.Embedding(self.num_embeddings, self.embedding_dim)
        dense.weight.data = self.weight.detach().clone()
        return dense.to(self.u.device, self.u.dtype)


class TiedEmbeddingHead(nn.Module):
    """An LM head tied to a compressed embedding: logits = hidden @ E.T, with no dense copy of E.

    The embedding is referenced, not registered, so its parameters appear (and are counted) once.
    """

    def __init__(self, embedding: KroneckerEmbedding | LowRankEmbedding, bias: torch.Tensor | None = None):
        super().__init__()
        self.__dict__["embedding"] = embedding
        # A bias Parameter is kept as is: BERT shares its decoder bias with another module.
        self.bias = bias if isinstance(bias, nn.Parameter) else _optional_bias(bias)
        self.in_features, self.out_features = embedding.embedding_dim, embedding.num_embeddings

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.embedding.attend(hidden)
        return logits if self.bias is None else logits + self.bias.to(logits.dtype)
