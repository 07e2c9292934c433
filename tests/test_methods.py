"""The method registry: a method defined in this file alone goes through compress → save → load →
materialize, and the built-in methods' parameter formulas agree with the modules they build."""

from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

import tqcompressor as tq
from tqcompressor.methods import CompressedModule, CompressionMethod, FitReport, MethodConfig, register, unregister
from tqcompressor.methods.targets import LINEAR_TYPES, dense_linear, dense_weight, relative_error


class TopRowsLinear(CompressedModule):
    """y = x[:, rows] @ W[rows] + bias: keeps the k input rows of W with the largest norms."""

    spec_type = "toy_top_rows"
    kind = "linear"

    def __init__(self, rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, in_features: int, layout):
        super().__init__()
        self.in_features, self.layout = in_features, layout
        self.register_buffer("rows", rows.clone())
        self.weight = self.parameter(weight)
        self.bias = None if bias is None else self.parameter(bias)

    def to_spec(self) -> dict[str, Any]:
        k, out = self.weight.shape
        return {"in": self.in_features, "out": out, "k": k, "bias": self.bias is not None, "layout": self.layout}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> "TopRowsLinear":
        bias = torch.zeros(spec["out"]) if spec["bias"] else None
        rows = torch.arange(spec["k"])
        return cls(rows, torch.zeros(spec["k"], spec["out"]), bias, spec["in"], spec["layout"])

    def dense_weight(self) -> torch.Tensor:
        weight = torch.zeros(self.in_features, self.weight.shape[1], dtype=self.weight.dtype)
        weight[self.rows] = self.weight.detach()
        return weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.index_select(-1, self.rows) @ self.weight
        return y if self.bias is None else y + self.bias

    def to_dense(self) -> nn.Module:
        return dense_linear(self.dense_weight(), self.bias, self.layout)


@dataclass
class TopRowsConfig(MethodConfig):
    method = "toy-top-rows"
    k: int | None = None

    def check(self) -> None:
        if self.k is None or self.k < 1:
            raise ValueError("field 'k' must be a positive integer")


class TopRows(CompressionMethod):
    name = "toy-top-rows"
    config_class = TopRowsConfig
    modules = (TopRowsLinear,)

    def plan(self, module: nn.Module, config: TopRowsConfig) -> TopRowsLinear:
        if not isinstance(module, LINEAR_TYPES):
            raise ValueError(f"a {type(module).__name__} cannot be compressed by method 'toy-top-rows'")
        weight, bias, layout = dense_weight(module)
        spec = {"in": weight.shape[0], "out": weight.shape[1], "k": config.k, "bias": bias is not None}
        return TopRowsLinear.from_spec({**spec, "layout": layout})

    def parameters(self, config: TopRowsConfig, rows: int, cols: int) -> int:
        return config.k * cols

    def fit(self, module: nn.Module, config: TopRowsConfig, stats=None):
        weight, bias, layout = dense_weight(module)
        rows = weight.norm(dim=1).topk(config.k).indices.sort().values
        layer = TopRowsLinear(rows, weight[rows], bias, weight.shape[0], layout)
        return layer, FitReport(
            list(weight.shape), f"top {config.k} rows", relative_error(layer.dense_weight(), weight)
        )


@pytest.fixture
def toy_method():
    register(TopRows())
    yield
    unregister("toy-top-rows")


def test_a_method_registered_from_a_test_file_compresses_saves_loads_and_materializes(toy_method, tmp_path):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=32)).eval()
    plan = tq.CompressionPlan.from_dict(
        {"name": "toy", "rules": [{"pattern": r"transformer\.h\.\d+\.mlp\.c_fc", "method": "toy-top-rows", "k": 8}]}
    )
    expected = tq.planned_parameters(model, plan)
    report = tq.compress_(model, plan, progress=False)
    assert report.params_after == expected == tq.count_parameters(model)
    assert [layer.method for layer in report.layers] == ["toy-top-rows"] * 2
    assert isinstance(model.transformer.h[0].mlp.c_fc, TopRowsLinear)
    ids = torch.randint(0, 100, (2, 9))
    logits = model(ids).logits
    tq.save(model, tmp_path / "toy")
    loaded = tq.load(tmp_path / "toy")
    assert isinstance(loaded.transformer.h[1].mlp.c_fc, TopRowsLinear)
    torch.testing.assert_close(loaded(ids).logits, logits, rtol=0, atol=0)
    tq.materialize(loaded)
    assert not any(isinstance(m, CompressedModule) for m in loaded.modules())
    torch.testing.assert_close(loaded(ids).logits, logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="field 'k' must be"):
        tq.CompressionPlan.from_dict({"rules": [{"pattern": "x", "method": "toy-top-rows"}]})


def test_loading_a_model_whose_method_is_not_registered_says_so(toy_method, tmp_path):
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=100, n_positions=32))
    tq.compress_(
        model, tq.CompressionPlan([tq.Rule(r"transformer\.h\.0\.mlp\.c_fc", TopRowsConfig(k=4))]), progress=False
    )
    tq.save(model, tmp_path / "toy")
    unregister("toy-top-rows")
    try:
        with pytest.raises(ValueError, match="unknown compressed module type 'toy_top_rows'"):
            tq.load(tmp_path / "toy")
    finally:
        register(TopRows())


@pytest.mark.parametrize(
    ("config", "module"),
    [
        (tq.KroneckerConfig(shape=(16, 32, 2, 4), rank=3, iterations=1), nn.Linear(32, 128, bias=False)),
        (tq.KroneckerConfig(ratio=0.25, iterations=1), nn.Linear(48, 40, bias=False)),
        (tq.KroneckerConfig(embedding_factor=4, iterations=1), nn.Embedding(50, 32)),
        (tq.LowRankConfig(ratio=0.3), nn.Linear(48, 40, bias=False)),
        (tq.LowRankConfig(rank=5), nn.Embedding(50, 32)),
    ],
)
def test_parameter_formulas_match_the_planned_and_fitted_modules(config, module):
    method = tq.get_method(config.method)
    rows, cols = module.weight.shape if isinstance(module, nn.Embedding) else module.weight.T.shape
    with torch.device("meta"):
        planned = method.plan(module, config)
    fitted, report = method.fit(module, config)
    assert type(planned) is type(fitted)
    assert method.parameters(config, rows, cols) == tq.count_parameters(fitted) == tq.count_parameters(planned)
    assert report.shape == [rows, cols] and 0 <= report.error < 1
