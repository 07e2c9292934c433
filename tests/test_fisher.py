"""The Fisher output metric: output gradients collected on real text, the KL they predict, low-rank and
Kronecker fits that weigh output directions by it, and budgets priced in KL without measuring the linear
layers."""

import copy
import math

import pytest
import torch
from conftest import tiny_gpt2_dir
from test_calibration import alternating_step_problem, anisotropic_inputs, direct_a_step
from transformers import GPT2Config, GPT2LMHeadModel

import tqcompressor as tq
from tqcompressor import allocation as allocation_module
from tqcompressor.allocation import allocation_plan, compressible_modules, linear_layers
from tqcompressor.calibration import CalibrationStats, collect
from tqcompressor.linalg import calibrated_error, fisher_loss, ridged_output_metric
from tqcompressor.loading import load_model
from tqcompressor.methods import get_method
from tqcompressor.methods.kronecker.calibrated import _a_step, _b_step, _objective, calibrated_factors, objective
from tqcompressor.methods.kronecker.method import _fit_objective
from tqcompressor.methods.kronecker.shapes import KroneckerShape
from tqcompressor.methods.lowrank.factors import scaled_svd, whitened_svd
from tqcompressor.methods.targets import dense_weight
from tqcompressor.statistics import InputStats

NAMES = ["transformer.h.0.mlp.c_fc", "transformer.h.1.attn.c_proj", "transformer.h.1.mlp.c_proj"]


def sharp_gpt2() -> GPT2LMHeadModel:
    """A tiny GPT-2 whose predictions are far from uniform (large embeddings), so gradients are informative."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=120, n_positions=64)).eval()
    with torch.no_grad():
        model.transformer.wte.weight.mul_(8)
    return model


def token_ids(rows: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 120, (rows, 32), generator=torch.Generator().manual_seed(seed))


def kl_of(model, changed, ids) -> float:
    with torch.no_grad():
        p, q = model(ids).logits.log_softmax(-1), changed(ids).logits.log_softmax(-1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def test_the_fisher_loss_predicts_the_kl_of_a_small_change_to_a_layer():
    model = sharp_gpt2()
    ids = token_ids()
    stats = collect(model, NAMES, ids, progress=False, fisher=True)
    assert not any(p.requires_grad is False for p in model.parameters())  # the weights' flags are restored
    assert all(p.grad is None for p in model.parameters())  # and they got no gradients
    for name in NAMES:
        layer = stats.for_module(name)
        weight = dense_weight(model.get_submodule(name))[0]
        delta = torch.randn(weight.shape, generator=torch.Generator().manual_seed(1)) * weight.std() * 0.05
        changed = copy.deepcopy(model)
        with torch.no_grad():
            changed.get_submodule(name).weight.add_(delta)
        predicted = fisher_loss(weight, weight + delta, layer.second_moment, layer.output_second_moment)
        assert predicted == pytest.approx(kl_of(model, changed, ids), rel=0.3)


def test_a_layer_that_does_not_reach_the_predictions_has_no_fisher_weight():
    model = sharp_gpt2()
    with torch.no_grad():
        model.transformer.h[1].mlp.c_proj.weight.zero_()  # c_fc feeds nothing on to the predictions
    stats = collect(
        model, ["transformer.h.1.mlp.c_fc", "transformer.h.0.mlp.c_fc"], token_ids(16), progress=False, fisher=True
    )
    assert float(stats.outputs["transformer.h.1.mlp.c_fc"].abs().max()) == 0.0
    assert float(stats.outputs["transformer.h.0.mlp.c_fc"].diagonal().min()) > 0


def planted_layer(seed: int = 0):
    """W whose larger part lies in output directions the Fisher ignores: a fit that ignores G spends its
    rank there, one that weighs the outputs by G (plus its ridge) on the four that matter."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(24, 24, generator=g, dtype=torch.float64))[0]
    matter, ignored = basis[:, :4], basis[:, 4:]
    x = torch.randn(400, 16, generator=g, dtype=torch.float64)
    weight = torch.randn(16, 4, generator=g, dtype=torch.float64) @ matter.T
    weight += 2 * torch.randn(16, 20, generator=g, dtype=torch.float64) @ ignored.T
    fisher = matter @ matter.T + 1e-6 * ignored @ ignored.T
    return weight, x.T @ x, fisher


def test_the_fisher_fit_lowers_the_fisher_loss_and_its_estimate_is_exact():
    weight, c, g = planted_layer()
    plain = whitened_svd(weight, 4, c).reconstruct()
    weighted = whitened_svd(weight, 4, c, g).reconstruct()
    assert fisher_loss(weight, weighted, c, g) < 0.6 * fisher_loss(weight, plain, c, g)
    assert calibrated_error(weight, weighted, c) > calibrated_error(weight, plain, c)  # it spent the rank elsewhere
    module = torch.nn.Linear(16, 24, bias=False).double()
    with torch.no_grad():
        module.weight.copy_(weight.T)
    stats = InputStats(c, 400, g)
    method = get_method("lowrank")
    for estimate in method.estimates(module, stats):
        _, report = method.fit(module, estimate.config, stats)
        assert estimate.kl == pytest.approx(report.details["kl"], rel=1e-9, abs=1e-12)
        assert estimate.loss > 0


def test_an_isotropic_fisher_leaves_the_fit_as_the_input_metric_alone_makes_it():
    weight, c, _ = planted_layer(1)
    alone = whitened_svd(weight, 5, c).reconstruct()
    isotropic = whitened_svd(weight, 5, c, 3.0 * torch.eye(24, dtype=torch.float64)).reconstruct()
    torch.testing.assert_close(isotropic, alone, rtol=1e-9, atol=1e-9)


def test_weighted_fits_split_every_term_evenly_whatever_the_weights_scale():
    """Output gradients are those of a mean loss, so G is tiny: the fit must not depend on its scale, and
    neither factor may carry it, since an optimiser steps every entry alike and would wreck the small one."""
    weight, c, g = planted_layer(2)
    fits = [whitened_svd(weight, 4, c, g * scale) for scale in (1.0, 1e-12)]
    fits.append(scaled_svd(weight, 4, torch.linspace(1e-9, 1e-6, 16, dtype=torch.float64), g * 1e-12))
    torch.testing.assert_close(fits[1].reconstruct(), fits[0].reconstruct(), rtol=1e-6, atol=1e-9)
    for fit in fits:
        torch.testing.assert_close(fit.u.norm(dim=0), fit.v.norm(dim=1), rtol=1e-9, atol=0)


def positive_definite(size: int, seed: int, spread: float = 1e-3) -> torch.Tensor:
    """Eigenvalues from 1 down to ``spread``, in a random basis."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(size, size, generator=g, dtype=torch.float64))[0]
    eigenvalues = torch.logspace(0, math.log10(spread), size, dtype=torch.float64)
    return basis @ torch.diag(eigenvalues) @ basis.T


def test_kronecker_steps_under_a_kronecker_fisher_are_the_exact_least_squares_minimisers():
    w, x, c, a, b, c4, cw4 = alternating_step_problem()
    n1, n2 = a.shape[2], b.shape[2]
    g1, g2 = positive_definite(n1, 5), positive_definite(n2, 6)
    fisher = torch.kron(g1, g2)
    norm = float((w * (c @ w @ fisher)).sum())
    assert _objective(norm, c4, cw4, a, b, g1, g2) == pytest.approx(objective(w, c, a, b, fisher))
    # tr(ΔᵀCΔG) = ‖X Δ T‖² for T Tᵀ = G.
    direct = direct_a_step(x, w, b, n1, torch.linalg.cholesky(fisher))
    stepped = _a_step(c4, cw4, b, g2)
    assert objective(w, c, stepped, b, fisher) == pytest.approx(objective(w, c, direct, b, fisher))
    new_b = _b_step(c4, cw4, a, g1)
    for _ in range(3):  # no perturbation of the solved B lowers the objective
        assert objective(w, c, a, new_b, fisher) <= objective(w, c, a, new_b + 1e-3 * torch.randn_like(new_b), fisher)


def kronecker_layer(fisher: torch.Tensor, weight: torch.Tensor) -> torch.nn.Linear:
    module = torch.nn.Linear(*weight.shape, bias=False).double()
    with torch.no_grad():
        module.weight.copy_(weight.T)
    return module


def test_a_kronecker_fit_weighs_the_outputs_by_the_fisher():
    shape = KroneckerShape(8, 6, 4, 5, 2)
    g = torch.Generator().manual_seed(7)
    x = anisotropic_inputs(2000, 32, seed=8)
    c = x.T @ x
    fisher = torch.kron(positive_definite(6, 9, 1e-4), positive_definite(5, 10, 1e-4))
    planted = torch.einsum(
        "rac,rbd->abcd",
        torch.randn(2, 8, 6, generator=g, dtype=torch.float64),
        torch.randn(2, 4, 5, generator=g, dtype=torch.float64),
    ).reshape(32, 30)
    exact, _ = calibrated_factors(planted, shape, c, output_metric=fisher)
    assert fisher_loss(planted, exact.reconstruct(), c, fisher) < 1e-9 * fisher_loss(planted, 0 * planted, c, fisher)

    w = torch.randn(32, 30, generator=g, dtype=torch.float64)
    alone, _ = calibrated_factors(w, shape, c)
    weighted, history = calibrated_factors(w, shape, c, output_metric=fisher)
    assert history[-1] <= history[0]
    assert fisher_loss(w, weighted.reconstruct(), c, fisher) < 0.8 * fisher_loss(w, alone.reconstruct(), c, fisher)

    # The method fits with the Fisher in the statistics, reports its KL, and prices its candidates in KL.
    module, method = kronecker_layer(fisher, w), get_method("kronecker")
    config = method.config_class(shape=(8, 6, 4, 5), rank=2, permute=False)
    _, plain = method.fit(module, config, InputStats(c, 2000))
    _, report = method.fit(module, config, InputStats(c, 2000, fisher))
    assert report.best_start == "identity, Fisher"
    assert report.details["kl"] < 0.8 * fisher_loss(w, alone.reconstruct(), c, fisher)
    assert report.error > plain.error  # it spent its terms where the Fisher looks
    estimates = method.estimates(module, InputStats(c, 2000, fisher))
    assert estimates and all(e.kl is not None and e.kl > 0 for e in estimates)


def test_the_fisher_never_leaves_a_kronecker_fit_worse_on_its_own_objective():
    """A Fisher far from a Kronecker product (rank 4, in a random basis) misleads the refinement, which
    takes it as G₁ ⊗ G₂; the fit on C alone is still among the ones the exact objective chooses from."""
    weight, c, fisher = planted_layer(1)
    module, method = kronecker_layer(fisher, weight), get_method("kronecker")
    metric = ridged_output_metric(fisher)
    for shape in ((4, 6, 4, 4), (8, 4, 2, 6)):
        config = method.config_class(shape=shape, rank=2, time_budget=float("inf"))
        alone, _ = method.fit(module, config, InputStats(c, 400))
        weighted, _ = method.fit(module, config, InputStats(c, 400, fisher))
        installed = {
            fit: dense_weight(layer.to_dense())[0] for fit, layer in (("alone", alone), ("weighted", weighted))
        }
        chosen = _fit_objective(weight, installed["weighted"], c, metric)
        assert chosen <= _fit_objective(weight, installed["alone"], c, metric) * (1 + 1e-9)


def test_fisher_statistics_save_load_and_refuse_another_model(tmp_path):
    model = sharp_gpt2()
    stats = collect(model, compressible_modules(model), token_ids(16), progress=False, fisher=True)
    assert set(stats.outputs) == set(linear_layers(model))
    loaded = CalibrationStats.load(stats.save(tmp_path / "stats.safetensors"))
    for name, g in stats.outputs.items():
        assert torch.equal(loaded.for_module(name).output_second_moment, g)
    assert loaded.for_module("transformer.wte").counts.shape == (120,)
    loaded.check(model, compressible_modules(model))
    loaded.outputs["transformer.h.0.mlp.c_fc"] = torch.eye(5, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"Fisher statistics for transformer\.h\.0\.mlp\.c_fc"):
        loaded.check(model, ["transformer.h.0.mlp.c_fc"])


def test_a_budget_prices_linear_layers_by_the_fisher_and_measures_only_the_embedding(monkeypatch):
    model = sharp_gpt2()
    with torch.no_grad():  # block 1's MLP adds almost nothing: the Fisher says so without a measurement
        model.transformer.h[1].mlp.c_proj.weight.mul_(1e-4)
    ids = token_ids(24)
    stats = collect(model, compressible_modules(model), ids, progress=False, fisher=True)
    mlp = [f"transformer.h.1.mlp.{n}" for n in ("c_fc", "c_proj")]
    saving = sum(model.get_submodule(n).weight.numel() for n in mlp) // 2
    target = tq.count_parameters(model) - saving
    with pytest.raises(ValueError, match=r"transformer\.wte have no Fisher estimate"):
        allocation_plan(model, stats, target)
    measured = []
    real = allocation_module.measure_divergence

    def recording(model, chosen, *args, **kwargs):
        measured.extend(chosen)
        return real(model, chosen, *args, **kwargs)

    monkeypatch.setattr(allocation_module, "measure_divergence", recording)
    allocation = allocation_plan(model, stats, target, sensitivity_blocks=ids[:4])
    assert set(measured) == {"transformer.wte"}
    # The harmless MLP pays for all of it, cut whole (``neurons``) or projection by projection.
    whole = allocation.chosen.get("transformer.h.1.mlp")
    kept = whole.params if whole is not None else sum(allocation.chosen[n].params for n in mlp)
    freed = sum(model.get_submodule(n).weight.numel() for n in mlp) - kept
    assert freed >= saving and allocation.params <= target
    for name, chosen in allocation.chosen.items():
        assert name == "transformer.wte" or chosen.cost == chosen.kl
    # Linear layers alone need no measurement at all.
    linear_only = collect(model, linear_layers(model), ids, progress=False, fisher=True)
    measured.clear()
    alone = allocation_plan(model, linear_only, target, sensitivity_blocks=ids[:4])
    assert measured == [] and alone.params <= target


def test_fisher_from_the_command_line(tmp_path, capsys):
    from tqcompressor.cli import main

    model_dir = tiny_gpt2_dir(tmp_path)
    base = ["compress", "--model", str(model_dir), "--quiet"]
    calibrated = [*base, "--calibration", str(tmp_path / "books")]
    assert main([*base, "--preset", "tqcompressedgpt2", "--fisher", "--out", str(tmp_path / "x")]) == 2
    assert "--fisher apply to --calibration DATA only" in capsys.readouterr().err
    target = ["--target-ratio", "0.05"]
    assert main([*calibrated, *target, "--fisher", "--no-sensitivity", "--out", str(tmp_path / "y")]) == 2
    assert "drop --no-sensitivity" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    budget = [*calibrated, *target, "--sensitivity-tokens", "64", "--methods", "lowrank"]
    for flags, name in (([], "fisher"), (["--no-fisher"], "measured")):  # the Fisher is a budget's default
        saved = ["--save-calibration", str(tmp_path / f"{name}.safetensors")]
        assert main([*budget, *flags, *saved, "--out", str(tmp_path / name)]) == 0
    collected = CalibrationStats.load(tmp_path / "fisher.safetensors").outputs
    assert set(collected) == set(linear_layers(load_model(str(model_dir))[0]))
    assert not CalibrationStats.load(tmp_path / "measured.safetensors").outputs
    table = (tmp_path / "fisher" / "allocation.txt").read_text().splitlines()
    assert all(line.split()[-1] != "-" for line in table[1:-1])  # every module priced in KL
    assert main([*budget, "--no-sequential", "--out", str(tmp_path / "at-once")]) == 0
    assert tq.count_parameters(tq.load(tmp_path / "at-once")) == tq.count_parameters(tq.load(tmp_path / "fisher"))
    # A plan fitted sequentially: the output metrics reach every part's fit.
    plan = tq.CompressionPlan([tq.Rule(r".*mlp\.c_fc", tq.LowRankConfig(rank=4))])
    plan.save(tmp_path / "plan.yaml")
    planned = [*calibrated, "--plan", str(tmp_path / "plan.yaml"), "--sequential"]
    assert main([*planned, "--out", str(tmp_path / "plain")]) == 0
    assert main([*planned, "--fisher", "--out", str(tmp_path / "weighted")]) == 0
    plain, weighted = tq.load(tmp_path / "plain"), tq.load(tmp_path / "weighted")
    for block in range(2):
        name = f"transformer.h.{block}.mlp.c_fc"
        before = plain.get_submodule(name).dense_weight()
        assert not torch.allclose(weighted.get_submodule(name).dense_weight(), before, atol=1e-4)
