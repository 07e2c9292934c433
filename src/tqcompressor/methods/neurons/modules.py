"""A linear layer that keeps some of an MLP's inner units: the rows of them it produces (``side="outputs"``:
gate, up, GPT-2's c_fc) or the rows of the output projection that read them (``side="inputs"``: down,
c_proj). The MLP around it runs its own forward at the smaller width."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from ..base import CompressedModule
from ..targets import Layout, dense_linear, optional_bias

Side = Literal["outputs", "inputs"]


class KeptUnitsLinear(CompressedModule):
    """y = x W_K (+ b): ``weight_kept`` holds the kept columns (outputs side, in x k) or rows (inputs side,
    k x out) of the dense in x out weight; ``index`` the units they are, in the dense layer's order."""

    spec_type = "kept_units_linear"
    kind = "linear"
    cut_with_siblings = True

    def __init__(
        self,
        weight: torch.Tensor,
        index: torch.Tensor,
        side: Side,
        dense_features: int,
        bias: torch.Tensor | None = None,
        layout: Layout = "linear",
    ):
        super().__init__()
        if side not in ("outputs", "inputs"):
            raise ValueError(f"side must be 'outputs' or 'inputs', got {side!r}")
        self.side, self.layout = side, layout
        self.in_features, self.out_features = weight.shape
        self.dense_features = dense_features  # the units the dense layer has on that side
        self.weight_kept = self.parameter(weight)
        self.register_buffer("index", index.detach().clone().long())
        self.bias = optional_bias(bias)

    def to_spec(self) -> dict[str, Any]:
        return {
            "in": self.in_features,
            "out": self.out_features,
            "side": self.side,
            "dense": self.dense_features,
            "layout": self.layout,
            "bias": self.bias is not None,
        }

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> KeptUnitsLinear:
        units = spec["out"] if spec["side"] == "outputs" else spec["in"]
        bias = torch.zeros(spec["out"]) if spec["bias"] else None
        return cls(
            torch.zeros(spec["in"], spec["out"]),
            torch.zeros(units, dtype=torch.long),
            spec["side"],
            spec["dense"],
            bias,
            spec["layout"],
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.weight_kept.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def dense_weight(self) -> torch.Tensor:
        """The dense in x out weight, zero for the units dropped: the same function inside its MLP."""
        if self.side == "outputs":
            dense = self.weight_kept.new_zeros(self.in_features, self.dense_features)
            return dense.index_copy(1, self.index, self.weight_kept)
        dense = self.weight_kept.new_zeros(self.dense_features, self.out_features)
        return dense.index_copy(0, self.index, self.weight_kept)

    @property
    def weight(self) -> torch.Tensor:
        """The weight this layer multiplies by, as a layer of its layout holds it (out x in for nn.Linear)."""
        return self.weight_kept.T if self.layout == "linear" else self.weight_kept

    def to_dense(self) -> nn.Module:
        bias = self.bias
        if bias is not None and self.side == "outputs":
            bias = bias.new_zeros(self.dense_features).index_copy(0, self.index, bias.detach())
        return dense_linear(self.dense_weight().detach(), bias, self.layout)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, kept {self.side} of {self.dense_features}"
