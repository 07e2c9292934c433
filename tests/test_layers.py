import copy

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from tqcompressor import (
    KroneckerEmbedding,
    KroneckerLinear,
    KroneckerShape,
    LowRankLinear,
    TiedEmbeddingHead,
    count_parameters,
    search_permutations,
    tied_parameters,
    truncated_svd,
)
from tqcompressor.methods.kronecker.factors import KroneckerFactors
from tqcompressor.methods.targets import dense_weight


def _permuted_factors(weight_io: torch.Tensor, shape: KroneckerShape):
    # A couple of search rounds give non-trivial permutations, which the layer must honour.
    return search_permutations(weight_io, shape, iterations=2, starts=("spectral",)).factors


def _dense(kind: str, in_features: int, out_features: int) -> nn.Module:
    torch.manual_seed(0)
    if kind == "linear":
        return nn.Linear(in_features, out_features).double()
    module = Conv1D(out_features, in_features).double()
    nn.init.normal_(module.bias)
    return module


@pytest.mark.parametrize("builds", [False, True], ids=["factorised", "built"])
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("dims", [(12, 16, 2, 4, 3), (6, 32, 4, 2, 2), (24, 8, 1, 8, 1)])
def test_kronecker_linear_forward_and_gradients_equal_the_dense_layer(kind, dims, builds):
    shape = KroneckerShape(*dims)
    dense_in = _dense(kind, shape.in_features, shape.out_features)
    weight, _, _ = dense_weight(dense_in)
    factors = _permuted_factors(weight, shape)
    layer = KroneckerLinear.from_module(dense_in, factors)
    layer.build_from_tokens = 15 if builds else 16  # the forward below has 15 tokens
    assert not torch.equal(layer.input_index, torch.arange(shape.in_features)) or shape.m2 == 1
    dense = layer.to_dense()
    assert type(dense) is type(dense_in)
    torch.testing.assert_close(dense_weight(dense)[0], factors.reconstruct(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.weight, dense.weight, rtol=1e-12, atol=1e-12)  # the layout it replaced
    x = torch.randn(3, 5, shape.in_features, dtype=torch.float64, requires_grad=True)
    assert layer.builds_weight(15) == builds
    y, y_dense = layer(x), dense(x)
    torch.testing.assert_close(y, y_dense, rtol=1e-10, atol=1e-10)
    assert y.shape == (3, 5, shape.out_features)
    # Gradients: the factor gradients must equal the dense gradient pulled back through W(a, b).
    upstream = torch.randn_like(y)
    (y * upstream).sum().backward()
    grad_x = x.grad.clone()
    x.grad = None
    (dense(x) * upstream).sum().backward()
    torch.testing.assert_close(grad_x, x.grad, rtol=1e-10, atol=1e-10)
    a, b = layer.a.detach().requires_grad_(), layer.b.detach().requires_grad_()
    probe = copy.deepcopy(layer)
    probe.a, probe.b = nn.Parameter(a), nn.Parameter(b)
    dense_grad = x.detach().reshape(-1, shape.in_features).T @ upstream.reshape(-1, shape.out_features)
    (probe.dense_weight() * dense_grad).sum().backward()
    torch.testing.assert_close(layer.a.grad, probe.a.grad, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(layer.b.grad, probe.b.grad, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("tokens", [0, 1, 7])  # one token takes the decode path (plain 2-D matmuls)
def test_both_contraction_orders_compute_the_dense_product(tokens):
    chosen = set()
    for shape in (KroneckerShape(4, 6, 3, 5, 2), KroneckerShape(6, 4, 5, 3, 2)):
        factors = _permuted_factors(torch.randn(shape.in_features, shape.out_features, dtype=torch.float64), shape)
        layer = KroneckerLinear(factors, torch.randn(shape.out_features, dtype=torch.float64))
        chosen.add(layer.a_first)
        x = torch.randn(1, tokens, shape.in_features, dtype=torch.float64)
        expected = x @ factors.reconstruct() + layer.bias
        torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
    assert chosen == {True, False}


@pytest.mark.parametrize("tokens", [1, 5])  # one token: the decode path adds the bias in its GEMM
def test_unpermuted_layers_compute_the_dense_product_in_both_orders(tokens):
    chosen = set()
    for shape in (KroneckerShape(4, 6, 3, 5, 2), KroneckerShape(6, 4, 5, 3, 2)):
        m, n = shape.in_features, shape.out_features
        factors = KroneckerFactors(
            torch.randn(shape.rank, shape.m1, shape.n1, dtype=torch.float64),
            torch.randn(shape.rank, shape.m2, shape.n2, dtype=torch.float64),
            torch.arange(m),
            torch.arange(n),
        )
        layer = KroneckerLinear(factors, torch.randn(n, dtype=torch.float64))
        assert not (layer.permutes_input or layer.permutes_output)
        chosen.add(layer.a_first)
        x = torch.randn(tokens, m, dtype=torch.float64)
        torch.testing.assert_close(layer(x), x @ factors.reconstruct() + layer.bias, rtol=1e-12, atol=1e-12)
    assert chosen == {True, False}


def test_kronecker_multiply_adds_count_what_forward_computes_at_each_token_count():
    from torch.utils.flop_counter import FlopCounterMode

    b_first = None
    for shape in (KroneckerShape(4, 6, 3, 5, 2), KroneckerShape(6, 4, 5, 3, 2)):
        layer = KroneckerLinear(_permuted_factors(torch.randn(shape.in_features, shape.out_features), shape))
        b_first = layer if not layer.a_first else b_first
        layer.build_from_tokens = 8
        for tokens in (1, 7, 8):
            with FlopCounterMode(display=False) as counter:
                layer(torch.randn(tokens, shape.in_features))
            assert counter.get_total_flops() == 2 * tokens * layer.multiply_adds(tokens)
        dense = shape.in_features * shape.out_features
        assert layer.multiply_adds(8) == dense + shape.rank * dense / 8  # built once, then one GEMM
    assert b_first.contracts_a_first(1) and not b_first.contracts_a_first(7)
    assert b_first.multiply_adds(1) != b_first.multiply_adds(7)


def test_identity_orders_skip_their_gathers_and_loaded_orders_are_honoured():
    shape = KroneckerShape(4, 6, 3, 5, 2)
    weight = torch.randn(12, 30, dtype=torch.float64)
    permuted = KroneckerLinear(_permuted_factors(weight, shape))
    assert permuted.permutes_input and permuted.permutes_output
    plain = KroneckerLinear.from_spec(permuted.to_spec()).double()
    assert not (plain.permutes_input or plain.permutes_output)
    plain.load_state_dict(permuted.state_dict())  # the loaded orders switch the gathers back on
    assert plain.permutes_input and plain.permutes_output
    for tokens in (1, 5):  # one token takes the decode path, which gathers only a permuted output
        x = torch.randn(tokens, 12, dtype=torch.float64)
        torch.testing.assert_close(plain(x), x @ permuted.dense_weight(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("tokens", [1, 6, 8])  # 8 tokens: built
def test_kronecker_linear_runs_under_bf16_autocast_and_in_float32(tokens):
    for shape in (KroneckerShape(384, 768, 2, 4, 4), KroneckerShape(192, 1536, 4, 2, 4)):  # A first, B first
        dense = nn.Linear(shape.in_features, shape.out_features)
        layer = KroneckerLinear.from_module(dense, _permuted_factors(dense.weight.detach().T, shape))
        layer.build_from_tokens = 8
        x = torch.randn(1, tokens, shape.in_features)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y.float(), layer(x), rtol=0.05, atol=0.05)
        assert count_parameters(layer) == 4 * (shape.m1 * shape.n1 + shape.m2 * shape.n2) + shape.out_features


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_low_rank_linear_equals_its_dense_form(kind):
    dense_in = _dense(kind, 20, 12)
    weight, _, _ = dense_weight(dense_in)
    layer = LowRankLinear.from_module(dense_in, truncated_svd(weight, 4))
    x = torch.randn(2, 3, 20, dtype=torch.float64)
    torch.testing.assert_close(layer(x), layer.to_dense()(x))
    assert layer.weight.shape == dense_in.weight.shape
    torch.testing.assert_close(layer.weight, layer.to_dense().weight)
    assert count_parameters(layer) == 4 * 32 + 12


def _embedding_factors(weight: torch.Tensor, k: int):
    vocab, dim = weight.shape
    shape = KroneckerShape(vocab, dim // k, 1, k, 1)
    return search_permutations(weight, shape, rows=True, iterations=3).factors


def test_kronecker_embedding_twice_and_tied_head_equal_dense_equivalents():
    torch.manual_seed(0)
    dense = nn.Embedding(50, 16).double()
    once = KroneckerEmbedding.from_factors(_embedding_factors(dense.weight.detach(), 2))
    assert once.base.shape == (50, 8) and once.embedding_dim == 16
    twice = KroneckerEmbedding.from_factors(_embedding_factors(once.base.detach(), 2), inner_of=once)
    assert twice.base.shape == (50, 4) and len(twice.scales) == 2
    # The outer stage is kept exactly; only the base was approximated again.
    torch.testing.assert_close(twice.scales[1], once.scales[0])
    torch.testing.assert_close(twice.index_1, once.index_0)
    ids = torch.randint(0, 50, (3, 7))
    for layer in (once, twice):
        dense_equivalent = layer.to_dense()
        torch.testing.assert_close(layer(ids), dense_equivalent(ids))
        hidden = torch.randn(3, 7, 16, dtype=torch.float64)
        head = TiedEmbeddingHead(layer)
        torch.testing.assert_close(head(hidden), hidden @ dense_equivalent.weight.T)
        torch.testing.assert_close(head.weight, dense_equivalent.weight)
    assert count_parameters(twice) == 50 * 4 + 2 + 2


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_a_weight_read_without_gradients_computes_it_only_when_its_values_are_used(kind, monkeypatch):
    """Mamba casts its input to ``lm_head.weight.dtype`` at every forward: computing a compressed tied
    embedding's table for that made generation 4-5x slower."""
    torch.manual_seed(0)
    dense_in = _dense(kind, 20, 12)
    low_rank = LowRankLinear.from_module(dense_in, truncated_svd(dense_weight(dense_in)[0], 4))
    kronecker = KroneckerLinear.from_module(
        dense_in, _permuted_factors(dense_weight(dense_in)[0], KroneckerShape(4, 3, 5, 4, 2))
    )
    embedding = KroneckerEmbedding.from_factors(_embedding_factors(nn.Embedding(50, 16).double().weight.detach(), 2))
    head = TiedEmbeddingHead(embedding)
    for module, owner, method in (
        (low_rank, low_rank, "dense_weight"),
        (kronecker, kronecker, "dense_weight"),
        (head, embedding, "expand"),
    ):
        expected = (embedding if module is head else module).to_dense().weight.detach()
        computed = getattr(owner, method)
        calls = []
        monkeypatch.setattr(
            owner, method, lambda *args, computed=computed, calls=calls: calls.append(1) or computed(*args)
        )
        with torch.no_grad():
            weight = module.weight
            assert (weight.shape, weight.dtype, weight.device) == (expected.shape, expected.dtype, expected.device)
            assert not calls
            x = torch.randn(expected.shape[1], 3, dtype=torch.float64)
            torch.testing.assert_close(weight @ x, expected @ x)
            assert type(weight @ x) is torch.Tensor and calls
        monkeypatch.undo()
        assert module.weight.requires_grad  # with gradients, computed at once from the factors


def test_embedding_of_kronecker_structure_is_exact_after_column_search():
    g = torch.Generator().manual_seed(0)
    base, scale = (
        torch.randn(40, 6, generator=g, dtype=torch.float64),
        torch.randn(1, 2, generator=g).double(),
    )
    exact = torch.kron(base, scale)[:, torch.randperm(12, generator=g)]
    layer = KroneckerEmbedding.from_factors(_embedding_factors(exact, 2))
    torch.testing.assert_close(layer.weight, exact, rtol=1e-9, atol=1e-9)


def test_tied_head_counts_the_embedding_once():
    layer = KroneckerEmbedding.from_factors(_embedding_factors(torch.randn(30, 8), 2))
    model = nn.ModuleDict({"wte": layer, "lm_head": TiedEmbeddingHead(layer)})
    assert count_parameters(model) == 30 * 4 + 2
    assert "lm_head.embedding.base" not in model.state_dict()
    copied = copy.deepcopy(model)
    assert copied["lm_head"].embedding is copied["wte"]


def test_count_parameters_sees_ties_by_shared_storage():
    a, b = nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False)
    b.weight = nn.Parameter(a.weight.data)  # a distinct Parameter object over the same memory
    model = nn.Sequential(a, b)
    assert count_parameters(model) == 16
    assert tied_parameters(model) == [["0.weight", "1.weight"]]


def test_bad_modules_and_shapes_are_rejected():
    with pytest.raises(TypeError, match="cannot compress a Conv2d"):
        dense_weight(nn.Conv2d(2, 2, 3))
    factors = _permuted_factors(torch.randn(16, 32), KroneckerShape(8, 8, 2, 4, 1))
    with pytest.raises(ValueError, match="16x32"):
        KroneckerLinear.from_module(nn.Linear(16, 16), factors)
    with pytest.raises(ValueError, match="rank 1"):
        KroneckerEmbedding.from_factors(factors)
