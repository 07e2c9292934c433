"""Kronecker layers: they compute through the factors, except a linear layer given many tokens at once,
which builds its dense matrix for that forward."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..base import CompressedModule
from ..targets import Layout, dense_embedding, dense_linear, dense_weight, layer_weight, optional_bias
from .factors import KroneckerFactors


class KroneckerLinear(CompressedModule):
    """y = x W + bias with W[input_perm][:, col_perm] = sum_i A_i ⊗ B_i, applied as two matmuls.

    Contraction order: one large GEMM with the big factor over all tokens (its multiply-adds equal
    the dense layer's at r=4 with B 2x4), then a batched small one whose inner rows are long. The
    factors are stored in the layout those matmuls read, so a forward pass never copies a weight (at
    decode time reading A, about half the dense matrix at ½ size, is the whole cost):
    A first (the cheaper order into an MLP, B 2x4): ``a`` (m1, r, n1), ``b`` (m2, r, n2);
    B first (out of an MLP, B 4x2): ``a`` (r, m1, n1), ``b`` (n2, r, m2); for one token (decode) and n2 > 1
    these layers contract with A first all the same, since then reading A once is what costs.
    The input permutation and the transposition the first GEMM needs are one gather, and so are the
    output permutation and the (n2, n1) layout the second GEMM leaves.

    From ``build_from_tokens`` tokens per forward (prefill, training) the layer builds W from the
    factors instead and takes one dense GEMM: the factorised path then moves a (tokens x r*n1*m2)
    intermediate through memory, 2.5-4.5x the dense time at r=4 though its multiply-adds equal the
    dense layer's, while building costs a few passes over W, about 1 ms at SmolLM2's MLP shape (the
    crossover on 2 cores: ``benchmarks/speed.py``). The built matrix lives for that forward only.
    """

    spec_type = "kronecker_linear"
    kind = "linear"
    build_from_tokens: int = 1024

    def __init__(self, factors: KroneckerFactors, bias: torch.Tensor | None = None, layout: Layout = "linear"):
        super().__init__()
        shape = factors.shape
        self.m1, self.n1, self.m2, self.n2, self.rank = shape.m1, shape.n1, shape.m2, shape.n2, shape.rank
        self.in_features, self.out_features = shape.in_features, shape.out_features
        self.layout = layout
        # Contract with A first unless that costs more multiply-adds (both orders give the same result).
        self.a_first = self._multiply_adds(a_first=True) <= self._multiply_adds(a_first=False)
        if self.a_first:
            self.a = self.parameter(factors.a.permute(1, 0, 2))
            self.b = self.parameter(factors.b.permute(1, 0, 2))
        else:
            self.a = self.parameter(factors.a)
            self.b = self.parameter(factors.b.permute(2, 0, 1))
        self.bias = optional_bias(bias)
        self.register_buffer("input_index", factors.row_perm.detach().clone().long())
        self.register_buffer("output_index", torch.argsort(factors.col_perm.detach()).long())
        self.refresh_orders()
        self.register_load_state_dict_post_hook(lambda module, _: module.refresh_orders())

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A as (r, m1, n1), B as (r, m2, n2)): views of the stored factors."""
        if self.a_first:
            return self.a.permute(1, 0, 2), self.b.permute(1, 0, 2)
        return self.a, self.b.permute(1, 2, 0)

    def refresh_orders(self) -> None:
        """Rebuild the two gathers forward uses; call after changing ``input_index`` or ``output_index``."""

        def permutes(index: torch.Tensor) -> bool:  # meta tensors (planning) have no values to compare
            return index.is_meta or not torch.equal(index.cpu(), torch.arange(len(index)))

        self.permutes_input, self.permutes_output = permutes(self.input_index), permutes(self.output_index)
        m1, m2, n1, n2 = self.m1, self.m2, self.n1, self.n2
        # The first GEMM reads inputs as (m2, m1): slot b of block a is original input input_index[a*m2 + b].
        transposes = m1 > 1 and m2 > 1
        gather_in = self.input_index.view(m1, m2).T.reshape(-1) if self.permutes_input or transposes else None
        # The second GEMM leaves output (c, d) of the permuted order at position d*n1 + c.
        position = self.output_index
        reorders = self.permutes_output or (n1 > 1 and n2 > 1)
        gather_out = (position % n2) * n1 + torch.div(position, n2, rounding_mode="floor") if reorders else None
        self.register_buffer("gather_in", gather_in, persistent=False)
        self.register_buffer("gather_out", gather_out, persistent=False)
        self.register_buffer("input_inverse", torch.argsort(self.input_index), persistent=False)

    def builds_weight(self, tokens: int) -> bool:
        return tokens >= self.build_from_tokens

    def contracts_a_first(self, tokens: int) -> bool:
        """The order forward takes for ``tokens`` tokens: B-first layers whose B has more than one column
        contract with A first for a single token, where reading A once is what costs."""
        return self.a_first or (tokens == 1 and self.n2 > 1)

    def multiply_adds(self, tokens: int) -> float:
        """Multiply-adds per token of a forward over ``tokens`` tokens; the dense layer's are in x out."""
        if self.builds_weight(tokens):
            dense = self.in_features * self.out_features
            return dense + self.rank * dense / tokens
        return self._multiply_adds(self.contracts_a_first(tokens))

    def _multiply_adds(self, a_first: bool) -> int:
        r, m1, n1, m2, n2 = self.rank, self.m1, self.n1, self.m2, self.n2
        if a_first:
            return m1 * r * n1 * m2 + m2 * r * n2 * n1
        return m2 * r * n2 * m1 + m1 * r * n1 * n2

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
        # At decode each layer costs tens of microseconds, so Python-level work here shows up in tokens/s:
        # no dtype casts that do nothing, and plain 2-D matmuls for one token (a broadcast batched
        # matmul costs about twice as much at that size).
        lead = x.shape[:-1]
        r, m1, n1, m2, n2 = self.rank, self.m1, self.n1, self.m2, self.n2
        a, b = self.a, self.b
        if a.dtype != x.dtype:
            a, b = a.to(x.dtype), b.to(x.dtype)
        x = x.reshape(-1, self.in_features)
        tokens = x.shape[0]
        if self.builds_weight(tokens):
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return F.linear(x, self.weight_out_in(a, b), bias).view(*lead, self.out_features)
        if self.gather_in is not None:
            x = x.index_select(1, self.gather_in)  # (tokens, m2 * m1)
        if self.a_first:
            t = x.view(tokens * m2, m1) @ a.view(m1, r * n1)
            y = b.view(m2 * r, n2).T @ (t.view(m2 * r, n1) if tokens == 1 else t.view(tokens, m2 * r, n1))
        elif self.contracts_a_first(tokens):
            # r small products that read A once beat the GEMM of n2 rows that B first leaves, though
            # they cost more multiply-adds (SmolLM2's down_proj at ½: 21 against 39 µs); same layout.
            t = x.view(m2, m1) @ a  # (r, m2, n1)
            y = b.view(n2, r * m2) @ t.view(r * m2, n1)
        else:
            t = b.view(n2 * r, m2) @ x.view(tokens, m2, m1)
            y = t.view(tokens * n2, r * m1) @ a.view(r * m1, n1)
        y = y.reshape(tokens, self.out_features)
        if self.gather_out is not None:
            y = y.index_select(1, self.gather_out)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*lead, self.out_features)

    def weight_out_in(self, a: torch.Tensor | None = None, b: torch.Tensor | None = None) -> torch.Tensor:
        """W.T (out x in), the layout ``F.linear`` reads, from the stored factors (or ``a``, ``b`` in their
        layout, e.g. cast): one GEMM of inner size r, a transposing copy and the two permutations, each
        a pass over W; permuting rows and columns after the copy is cheaper than either gather on x
        once tokens outnumber in*out/(in + out)."""
        a, b = (self.a, self.b) if a is None else (a, b)
        r, m1, n1, m2, n2 = self.rank, self.m1, self.n1, self.m2, self.n2
        if self.a_first:  # (m1, r, n1), (m2, r, n2)
            a, b = a.permute(1, 0, 2), b.permute(1, 0, 2)
        else:  # (r, m1, n1), (n2, r, m2)
            b = b.permute(1, 2, 0)
        # rows (c, a), columns (d, b): entry sum_r A[r, a, c] B[r, b, d]
        products = a.permute(2, 1, 0).reshape(n1 * m1, r) @ b.permute(0, 2, 1).reshape(r, n2 * m2)
        weight = products.view(n1, m1, n2, m2).permute(0, 2, 1, 3).reshape(self.out_features, self.in_features)
        if self.permutes_output:
            weight = weight.index_select(0, self.output_index)
        if self.permutes_input:
            weight = weight.index_select(1, self.input_inverse)
        return weight

    def dense_weight(self) -> torch.Tensor:
        """The equivalent W (in x out), row-major."""
        return self.weight_out_in().T.contiguous()

    @property
    def weight(self) -> torch.Tensor:
        return layer_weight(self, self.layout, self.a)

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
        return self.scaled(self.expand(F.embedding(input_ids, self.base)))

    def reduce(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden @ Oᵀ, O the linear map ``expand`` applies to rows of ``base``: each stage's gather and
        scale undone, in reverse order."""
        for stage in reversed(range(len(self.scales))):
            scale = self.scales[stage].to(hidden.dtype)
            inverse = torch.argsort(self.stage_index(stage))
            hidden = hidden.index_select(-1, inverse).unflatten(-1, (-1, scale.numel())) @ scale
        return hidden

    def attend(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden @ E.T through the factors: one small matmul after ``reduce``."""
        return self.reduce(hidden) @ self.base.to(hidden.dtype).T

    @property
    def weight(self) -> torch.Tensor:
        """The dense (vocab x d) matrix; for export and tests only."""
        return self.expand(self.base)

    def to_dense(self) -> nn.Embedding:
        return dense_embedding(self.weight, self.embed_scale)

    def extra_repr(self) -> str:
        ks = "x".join(str(s.numel()) for s in self.scales)
        return f"{self.num_embeddings}, {self.embedding_dim}, base_dim={self.base.shape[1]}, k={ks}"
