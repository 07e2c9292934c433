"""Kronecker layers: they compute through the factors and never build the dense matrix in forward."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..base import CompressedModule
from ..targets import Layout, dense_embedding, dense_linear, dense_weight, optional_bias
from .factors import KroneckerFactors


class KroneckerLinear(CompressedModule):
    """y = x W + bias with W[input_perm][:, col_perm] = sum_i A_i ⊗ B_i, applied as two matmuls.

    The factors are stored in the layout the matmuls read, ``a`` as (m1, r, n1) and ``b`` as
    (m2, r, n2), so a forward pass never copies a weight: at decode time reading A (about half the
    dense matrix at ½ size) is the whole cost, and a per-call rearranged copy would triple it.
    """

    spec_type = "kronecker_linear"
    kind = "linear"

    def __init__(self, factors: KroneckerFactors, bias: torch.Tensor | None = None, layout: Layout = "linear"):
        super().__init__()
        shape = factors.shape
        self.m1, self.n1, self.m2, self.n2, self.rank = shape.m1, shape.n1, shape.m2, shape.n2, shape.rank
        self.in_features, self.out_features = shape.in_features, shape.out_features
        self.layout = layout
        self.a = self.parameter(factors.a.transpose(0, 1))
        self.b = self.parameter(factors.b.transpose(0, 1))
        self.bias = optional_bias(bias)
        self.register_buffer("input_index", factors.row_perm.detach().clone().long())
        self.register_buffer("output_index", torch.argsort(factors.col_perm.detach()).long())
        self.refresh_orders()
        self.register_load_state_dict_post_hook(lambda module, _: module.refresh_orders())
        # Contract with A first unless that costs more multiply-adds (both orders give the same result).
        self.a_first = self.multiply_adds(a_first=True) <= self.multiply_adds(a_first=False)

    def refresh_orders(self) -> None:
        """Note which sides really permute; call after changing ``input_index`` or ``output_index``.
        An identity order skips its gather, which costs as much as a copy of the activations."""

        def permutes(index: torch.Tensor) -> bool:  # meta tensors (planning) have no values to compare
            return index.is_meta or not torch.equal(index.cpu(), torch.arange(len(index)))

        self.permutes_input, self.permutes_output = permutes(self.input_index), permutes(self.output_index)

    def input_permutation(self) -> torch.Tensor | None:
        return self.input_index if self.permutes_input else None

    def drop_input_permutation(self) -> None:
        self.input_index.copy_(torch.arange(self.in_features))
        self.refresh_orders()

    def permute_outputs(self, index: torch.Tensor) -> None:
        with torch.no_grad():
            self.output_index.copy_(self.output_index[index])
            if self.bias is not None:
                self.bias.copy_(self.bias[index])
        self.refresh_orders()

    def multiply_adds(self, a_first: bool | None = None) -> int:
        """Multiply-adds per token in one contraction order (default: the chosen one); dense: in x out."""
        r, m1, n1, m2, n2 = self.rank, self.m1, self.n1, self.m2, self.n2
        if self.a_first if a_first is None else a_first:
            return m1 * r * n1 * m2 + m2 * r * n2 * n1
        return m2 * r * n2 * m1 + m1 * r * n1 * n2

    @classmethod
    def from_module(cls, module: nn.Module, factors: KroneckerFactors) -> KroneckerLinear:
        weight, bias, layout = dense_weight(module)
        factors.shape.check_matrix(*weight.shape)
        return cls(factors, bias, layout)

    def to_spec(self) -> dict[str, Any]:
        return {
            "shape": [self.m1, self.n1, self.m2, self.n2, self.rank],
            "layout": self.layout,
            "bias": self.bias is not None,
        }

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> KroneckerLinear:
        m1, n1, m2, n2, r = spec["shape"]
        factors = KroneckerFactors(
            torch.zeros(r, m1, n1), torch.zeros(r, m2, n2), torch.arange(m1 * m2), torch.arange(n1 * n2)
        )
        return cls(factors, torch.zeros(n1 * n2) if spec["bias"] else None, spec["layout"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        r, m1, n1, m2, n2 = self.rank, self.m1, self.n1, self.m2, self.n2
        a, b = self.a.to(x.dtype), self.b.to(x.dtype)
        x = x.reshape(-1, self.in_features)
        if self.permutes_input:
            x = x.index_select(1, self.input_index)
        tokens = x.shape[0]
        # One large GEMM over all tokens, then a small one over the (slot, term) pairs.
        if self.a_first:
            t = x.view(tokens, m1, m2).transpose(1, 2).reshape(tokens * m2, m1) @ a.view(m1, r * n1)
            y = t.view(tokens, m2 * r, n1).transpose(1, 2) @ b.view(m2 * r, n2)
        else:
            t = x.view(tokens * m1, m2) @ b.view(m2, r * n2)
            y = (t.view(tokens, m1 * r, n2).transpose(1, 2) @ a.view(m1 * r, n1)).transpose(1, 2)
        y = y.reshape(tokens, self.out_features)
        if self.permutes_output:
            y = y.index_select(1, self.output_index)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*lead, self.out_features)

    def dense_weight(self) -> torch.Tensor:
        """The equivalent W (in x out); only for export and tests, never used in forward."""
        permuted = torch.einsum("arc,brd->abcd", self.a, self.b).reshape(self.in_features, self.out_features)
        weight = torch.empty_like(permuted)
        weight[self.input_index] = permuted[:, self.output_index]
        return weight

    def to_dense(self) -> nn.Module:
        return dense_linear(self.dense_weight().detach(), self.bias, self.layout)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, rank={self.rank}, "
            f"A={self.m1}x{self.n1}, B={self.m2}x{self.n2}, bias={self.bias is not None}, "
            f"layout={self.layout}"
        )


class KroneckerEmbedding(CompressedModule):
    """E = expand(base): each stage s maps rows of width d to width d*k_s as (row ⊗ scale_s)[:, index_s].

    One stage is the paper's kron(E', b)[:, p]; compressing again (÷2 then ÷2) factors ``base`` and
    adds an inner stage, so the outer stages are kept exactly.
    """

    spec_type = "kronecker_embedding"
    kind = "embedding"

    def __init__(self, base: torch.Tensor, scales: list[torch.Tensor], indices: list[torch.Tensor]):
        super().__init__()
        if len(scales) != len(indices) or not scales:
            raise ValueError("a KroneckerEmbedding needs one index per scale and at least one stage")
        self.base = self.parameter(base)
        self.scales = nn.ParameterList([self.parameter(s.reshape(-1)) for s in scales])
        for i, index in enumerate(indices):
            self.register_buffer(f"index_{i}", index.detach().clone().long())
        self.num_embeddings = base.shape[0]
        self.embedding_dim = base.shape[1] * math.prod(s.numel() for s in scales)

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

    def to_spec(self) -> dict[str, Any]:
        return {
            "vocab": self.num_embeddings,
            "base_dim": self.base.shape[1],
            "factors": [s.numel() for s in self.scales],
        }

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> KroneckerEmbedding:
        width, scales, indices = spec["base_dim"], [], []
        for k in spec["factors"]:
            width *= k
            scales.append(torch.zeros(k))
            indices.append(torch.arange(width))
        return cls(torch.zeros(spec["vocab"], spec["base_dim"]), scales, indices)

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
        return dense_embedding(self.weight)

    def extra_repr(self) -> str:
        ks = "x".join(str(s.numel()) for s in self.scales)
        return f"{self.num_embeddings}, {self.embedding_dim}, base_dim={self.base.shape[1]}, k={ks}"
