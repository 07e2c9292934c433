"""The ``neurons`` method: an MLP keeps whole inner units. Greedy selection against brute force, a planted
MLP whose dropped units the kept ones carry exactly, estimates equal to fits, equivalence with the dense
model it materializes to, save/load round trips, the budget choosing it, and bad input refused."""

import itertools

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import tqcompressor as tq
from tqcompressor.allocation import allocation_plan, compressible_modules
from tqcompressor.calibration import collect
from tqcompressor.methods import is_compressed
from tqcompressor.methods.neurons import forward_selection, mlp_parts, refit
from tqcompressor.sequential import compress_sequentially

MLPS = r"model\.layers\.\d+\.mlp"


def tiny_llama(seed: int = 0, layers: int = 2, inner: int = 64) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=inner,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=None,
    )
    return LlamaForCausalLM(config).eval()


def token_ids(rows: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 100, (rows, 32), generator=torch.Generator().manual_seed(seed))


def plant_duplicates(mlp: nn.Module) -> None:
    """Units 32..63 become copies of units 0..31 with their up rows scaled: h_{32+i} = (i + 2) h_i, so the
    first half carries every unit exactly."""
    with torch.no_grad():
        for i in range(32):
            mlp.gate_proj.weight[32 + i] = mlp.gate_proj.weight[i]
            mlp.up_proj.weight[32 + i] = (i + 2) * mlp.up_proj.weight[i]


def test_forward_selection_is_the_brute_force_greedy_and_its_errors_are_the_refits():
    generator = torch.Generator().manual_seed(0)
    h = torch.randn(80, 9, generator=generator, dtype=torch.float64) @ torch.randn(
        9, 9, generator=generator, dtype=torch.float64
    )
    c, w = h.T @ h, torch.randn(9, 4, generator=generator, dtype=torch.float64)
    metric = torch.randn(4, 4, generator=generator, dtype=torch.float64)
    metric = metric @ metric.T

    def error(kept: list[int], m: torch.Tensor) -> float:
        delta = h[:, kept] @ refit(c, w, torch.tensor(kept), ridge=0.0) - h @ w
        return float(((delta @ m) * delta).sum())

    for m, given in ((torch.eye(4, dtype=torch.float64), None), (metric, metric)):
        selection = forward_selection(c, w, 6, given)
        greedy: list[int] = []
        for _ in range(6):
            greedy.append(min((j for j in range(9) if j not in greedy), key=lambda j: error([*greedy, j], m)))
        assert selection.order.tolist() == greedy
        for k in range(1, 7):
            kept = selection.order[:k].tolist()
            assert selection.weighted[k] == pytest.approx(error(kept, m), rel=1e-9)
            plain = error(kept, torch.eye(4, dtype=torch.float64)) / float((h @ w).square().sum())
            assert selection.relative[k] == pytest.approx(plain, rel=1e-9)
    # Several units a step: another order, but its errors are still exactly those of its refits.
    blocked = forward_selection(c, w, 7, metric, block=3)
    assert len(set(blocked.order.tolist())) == 7
    for k in range(1, 8):
        assert blocked.weighted[k] == pytest.approx(error(blocked.order[:k].tolist(), metric), rel=1e-9)
    # Greedy is not the best subset, but on this problem it is within a few percent of it.
    best = min(error(list(s), torch.eye(4, dtype=torch.float64)) for s in itertools.combinations(range(9), 3))
    assert error(forward_selection(c, w, 3).order.tolist(), torch.eye(4, dtype=torch.float64)) <= 1.1 * best


def test_a_planted_mlp_keeps_one_unit_of_each_pair_and_loses_nothing():
    model = tiny_llama()
    for layer in model.model.layers:
        plant_duplicates(layer.mlp)
    ids = token_ids()
    with torch.no_grad():
        reference = model(ids).logits
    plan = tq.CompressionPlan([tq.Rule(MLPS, tq.NeuronsConfig(units=32))])
    stats = tq.calibrate(model, plan, ids, progress=False)
    report = tq.compress_(model, plan, calibration=stats, progress=False)
    for layer in model.model.layers:
        kept = layer.mlp.down_proj.index
        assert layer.mlp.gate_proj.weight.shape == (32, 32) and len(set((kept % 32).tolist())) == 32
    assert all(r.error < 1e-4 < r.error_plain for r in report.layers)
    with torch.no_grad():
        assert torch.allclose(
            model(token_ids(seed=1)).logits, tiny_llama_planted()(token_ids(seed=1)).logits, atol=1e-4
        )
        assert torch.allclose(model(ids).logits, reference, atol=1e-4)


def tiny_llama_planted() -> LlamaForCausalLM:
    model = tiny_llama()
    for layer in model.model.layers:
        plant_duplicates(layer.mlp)
    return model


@pytest.mark.parametrize("inner", [64, 1024])  # one unit a step, and four
def test_estimates_are_the_fits_errors_and_kl(inner):
    model = tiny_llama(inner=inner)
    ids = token_ids(40)
    stats = collect(model, compressible_modules(model), ids, progress=False, fisher=True)
    mlp = model.model.layers[1].mlp
    method = tq.get_method("neurons")
    estimates = method.estimates(mlp, stats.for_module("model.layers.1.mlp"))
    assert len(estimates) > 5 and all(e.kl is not None for e in estimates)
    for estimate in estimates[::3]:
        fitted, report = method.fit(mlp, estimate.config, stats.for_module("model.layers.1.mlp"))
        assert tq.count_parameters(fitted) == estimate.params
        assert report.error**2 == pytest.approx(estimate.loss, rel=1e-4)
        assert report.details["kl"] == pytest.approx(estimate.kl, rel=1e-4)
    losses = [e.loss for e in estimates]
    assert losses == sorted(losses)  # fewer units, more error
    assert method.estimates(model.model.layers[1].self_attn, stats.for_module("model.layers.1.self_attn")) == []


def test_a_budget_counts_the_biases_a_cut_drops():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=100, n_positions=64)).eval()
    name = "transformer.h.0.mlp"
    stats = collect(model, compressible_modules(model), token_ids(8), progress=False, fisher=True)
    mlp = model.get_submodule(name)
    weights = sum(child.weight.numel() for child in mlp.children() if hasattr(child, "weight"))
    for estimate in tq.get_method("neurons").estimates(mlp, stats.for_module(name))[::4]:
        fitted, _ = tq.get_method("neurons").fit(mlp, estimate.config, stats.for_module(name))
        assert tq.count_parameters(fitted) - tq.count_parameters(mlp) == estimate.params - weights


@pytest.mark.parametrize("gpt2", [False, True])
def test_materialized_saved_and_loaded_models_compute_the_same(tmp_path, gpt2):
    if gpt2:  # Conv1D layers with biases, one producer
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64)).eval()
        with torch.no_grad():  # GPT-2 starts its biases at zero: a kept unit's bias must be its own
            for name, parameter in model.named_parameters():
                if name.endswith("bias"):
                    parameter.normal_(0, 0.5)
        pattern = r"transformer\.h\.\d+\.mlp"
    else:
        model, pattern = tiny_llama(), MLPS
    ids = token_ids()
    plan = tq.CompressionPlan([tq.Rule(pattern, tq.NeuronsConfig(ratio=0.4))])
    planned = tq.planned_parameters(model, plan)
    report = tq.compress_(model, plan, calibration=tq.calibrate(model, plan, ids, progress=False), progress=False)
    assert report.params_after == planned == tq.count_parameters(model) < report.params_before
    with torch.no_grad():
        logits = model(ids).logits
        tq.save(model, tmp_path / "cut")
        loaded = tq.load(tmp_path / "cut")
        assert torch.equal(loaded(ids).logits, logits)  # the same modules and weights: the same kernels
        with pytest.raises(ValueError, match=r"cut together with .*(up_proj|c_fc)"):
            tq.materialize(loaded, r".*\.0\.mlp\.(c_proj|down_proj)")  # the producers would not fit it
        assert torch.equal(loaded(ids).logits, logits)  # refused before anything changed
        dense = tq.materialize(loaded, r".*\.0\.mlp\..*")
        assert torch.allclose(dense(ids).logits, logits, atol=1e-5)
        dense = tq.materialize(loaded)
        assert not any(is_compressed(m) for m in dense.modules())
        assert torch.allclose(dense(ids).logits, logits, atol=1e-5)  # zero rows and columns added


def test_data_free_cuts_keep_the_units_with_the_largest_output_rows():
    mlp = tiny_llama().model.layers[0].mlp
    fitted, report = tq.get_method("neurons").fit(mlp, tq.NeuronsConfig(units=8))
    norms = mlp.down_proj.weight.square().sum(0)
    assert set(fitted.down_proj.index.tolist()) == set(norms.topk(8).indices.tolist())
    assert torch.equal(fitted.down_proj.weight_kept, mlp.down_proj.weight.T[fitted.down_proj.index])
    assert report.objective == "frobenius" and report.error == report.error_plain


def test_a_budget_chooses_neurons_where_an_mlp_carries_its_units_twice():
    def planted() -> LlamaForCausalLM:
        model = tiny_llama(layers=3)
        plant_duplicates(model.model.layers[1].mlp)
        return model

    model = planted()
    ids = token_ids(16)
    names = [n for n in compressible_modules(model) if "embed" not in n]
    stats = collect(model, names, ids, progress=False, fisher=True)
    target = tq.count_parameters(model) - 3_500
    allocation = allocation_plan(model, stats, target)
    chosen = allocation.chosen["model.layers.1.mlp"]
    assert chosen.method == "neurons" and chosen.config.units <= 32 and chosen.kl < 1e-9
    assert "model.layers.1.mlp.down_proj" not in allocation.chosen
    report = tq.compress_(model, allocation.plan, calibration=stats, progress=False)
    assert report.params_after == allocation.params <= target
    lowrank = allocation_plan(planted(), stats, target, methods=["lowrank"])
    assert {c.method for c in lowrank.chosen.values()} <= {"dense", "lowrank"}
    assert "model.layers.1.mlp.down_proj" in lowrank.chosen
    only = allocation_plan(planted(), stats, target, methods=["neurons"])
    assert {rule.config.method for rule in only.plan.rules} == {"neurons"} and only.params <= target
    assert "model.layers.1.mlp" in only.chosen and all(".mlp" in name for name in only.chosen)  # the rest: no candidate


def test_a_sequential_fit_cuts_mlps_on_the_compressed_stream():
    model, original = tiny_llama(layers=3), tiny_llama(layers=3)
    ids = token_ids(12)
    plan = tq.CompressionPlan(
        [
            tq.Rule(r"model\.layers\.[02]\.mlp", tq.NeuronsConfig(ratio=0.5)),
            tq.Rule(r"model\.layers\.\d+\.self_attn\.o_proj", tq.LowRankConfig(rank=8)),
        ]
    )
    report = compress_sequentially(model, plan, ids, progress=False, anchor=1.0)
    assert [layer.name for layer in report.layers] == [
        "model.layers.0.self_attn.o_proj",
        "model.layers.0.mlp",
        "model.layers.1.self_attn.o_proj",
        "model.layers.2.self_attn.o_proj",
        "model.layers.2.mlp",
    ]
    assert report.params_after == tq.planned_parameters(original, plan)
    # Each MLP fitted on its own block's inputs in the compressed stream: the same cut at once is worse there.
    at_once = tiny_llama(layers=3)
    tq.compress_(at_once, plan, calibration=tq.calibrate(at_once, plan, ids, progress=False), progress=False)
    held = token_ids(8, seed=3)
    with torch.no_grad():
        target = original(held).logits.log_softmax(-1)

        def kl(m):
            return float((target.exp() * (target - m(held).logits.log_softmax(-1))).sum(-1).mean())

        assert kl(model) < kl(at_once)


class NormedMLP(nn.Module):
    """An MLP that normalizes its inner units together: dropping some changes the others."""

    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        h = self.up(x)
        return self.down(h / h.norm(dim=-1, keepdim=True))


def test_bad_input_is_refused_before_anything_changes():
    for options, message in (({}, "exactly one"), ({"units": 3, "ratio": 0.5}, "exactly one")):
        with pytest.raises(ValueError, match=message):
            tq.NeuronsConfig(**options)
    with pytest.raises(ValueError, match="'ratio' must be in"):
        tq.NeuronsConfig(ratio=1.5)
    with pytest.raises(ValueError, match="'units' must be a positive integer"):
        tq.NeuronsConfig(units=0)
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for rules, message in (
        ([tq.Rule(MLPS, tq.NeuronsConfig(units=65))], "cannot keep 65 units of an MLP with 64"),
        ([tq.Rule(r"model\.layers\.0\.self_attn", tq.NeuronsConfig(units=4))], "not an MLP"),
        ([tq.Rule(r"model\.layers\.0\.mlp\.down_proj", tq.NeuronsConfig(units=4))], "not an MLP"),
        (
            [tq.Rule(MLPS, tq.NeuronsConfig(units=8)), tq.Rule(r".*down_proj", tq.LowRankConfig(rank=2))],
            "target both model.layers.0.mlp and model.layers.0.mlp.down_proj",
        ),
    ):
        with pytest.raises(ValueError, match=message):
            tq.compress_(model, tq.CompressionPlan(rules), progress=False)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    normed = NormedMLP()
    assert mlp_parts(normed) is not None  # its shapes are an MLP's; its forward is not
    with pytest.raises(ValueError, match="mixes its inner units"):
        tq.get_method("neurons").fit(normed, tq.NeuronsConfig(units=8))


def test_a_plan_file_rule_and_the_units_it_keeps(tmp_path):
    path = tmp_path / "plan.yaml"
    path.write_text("name: cut\nrules:\n  - {pattern: 'model\\.layers\\.\\d+\\.mlp', method: neurons, ratio: 0.25}\n")
    plan = tq.CompressionPlan.load(path)
    assert plan.rules[0].config == tq.NeuronsConfig(ratio=0.25)
    model = tiny_llama()
    tq.compress_(model, path, progress=False)
    assert model.model.layers[1].mlp.up_proj.weight.shape == (16, 32)
    assert plan.to_dict()["rules"][0] == {"pattern": r"model\.layers\.\d+\.mlp", "method": "neurons", "ratio": 0.25}
