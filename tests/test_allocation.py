"""Budget-driven allocation: exact low-rank estimates, Kronecker bounds, a greedy provably close to the
best choice, and a budget met end to end."""

import copy
import itertools
import random

import pytest
import torch
from conftest import SlowClock, planted_matrix, tiny_gpt2_dir
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

import tqcompressor as tq
from tqcompressor.allocation import (
    Candidate,
    allocate,
    allocation_plan,
    candidates,
    compressible_modules,
    harm,
    linear_layers,
    lower_hull,
    measure_divergence,
    probe,
)
from tqcompressor.calibration import collect
from tqcompressor.linalg import calibrated_error, weighted_error
from tqcompressor.methods.kronecker import method as kronecker_method
from tqcompressor.methods.kronecker import propose_kronecker_shape
from tqcompressor.methods.kronecker import search as kronecker_search
from tqcompressor.methods.targets import dense_weight
from tqcompressor.statistics import InputStats


def random_options(rng: random.Random, modules: int = 4, per_module: int = 5) -> dict[str, list[Candidate]]:
    options = {}
    for m in range(modules):
        size, sensitivity = rng.randint(50, 200), rng.uniform(0.1, 3)
        found = [Candidate(f"m{m}", None, size, 0.0, sensitivity)]
        for _ in range(per_module):
            config, params = tq.LowRankConfig(rank=1), rng.randint(1, size - 1)
            found.append(Candidate(f"m{m}", config, params, rng.uniform(0.1, 10), sensitivity))
        options[f"m{m}"] = found
    return options


def test_greedy_on_the_hulls_is_within_one_step_of_the_best_choice():
    rng = random.Random(0)
    for _ in range(30):
        options = random_options(rng)
        total = sum(found[0].params for found in options.values())
        saving = rng.randint(1, total // 2)
        chosen = allocate(options, saving)
        assert total - sum(c.params for c in chosen.values()) >= saving
        best = min(
            sum(c.cost for c in combo)
            for combo in itertools.product(*options.values())
            if total - sum(c.params for c in combo) >= saving
        )
        greedy = sum(c.cost for c in chosen.values())
        # Greedy walks the convex relaxation: before its last step it was below the optimum, so the gap is
        # at most that step's added loss.
        largest_step = max(abs(a.cost - b.cost) for found in options.values() for a in found for b in found)
        assert best - 1e-12 <= greedy <= best + largest_step


def test_parameters_the_hull_steps_leave_spare_go_to_a_candidate_off_the_hull():
    """m's candidate of 58 parameters lies above its hull (100, 50, 10): the walk takes 50 and frees 10
    more than the budget asks; those 10 buy m the 58 back, the best choice (brute force: 4.9)."""
    lowrank = tq.LowRankConfig(rank=1)
    m = [Candidate("m", None, 100, 0.0), *(Candidate("m", lowrank, p, loss) for p, loss in ((90, 3.0), (58, 3.9)))]
    m += [Candidate("m", lowrank, 50, 4.0), Candidate("m", lowrank, 10, 20.0)]
    n = [Candidate("n", None, 100, 0.0), Candidate("n", lowrank, 40, 1.0)]
    assert [c.params for c in lower_hull(m)] == [100, 50, 10]
    chosen = allocate({"m": m, "n": n}, 100)
    assert (chosen["m"].params, chosen["n"].params) == (58, 40)


def test_lower_hull_keeps_only_convex_undominated_points():
    points = [(100, 0.0), (80, 1.0), (70, 5.0), (60, 2.5), (40, 3.0), (40, 9.0), (10, 20.0)]
    hull = lower_hull([Candidate("m", None, p, loss) for p, loss in points])
    assert [(c.params, c.loss) for c in hull] == [(100, 0.0), (80, 1.0), (40, 3.0), (10, 20.0)]


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=120, n_positions=64)).eval()


def one_layer(name: str, seed: int):
    """A tiny GPT-2's module ``name`` and its calibration statistics on random tokens."""
    model = tiny_gpt2()
    ids = torch.randint(0, 120, (24, 32), generator=torch.Generator().manual_seed(seed))
    return model.get_submodule(name), collect(model, [name], ids, progress=False).for_module(name)


def test_low_rank_estimates_are_exact_and_kronecker_estimates_are_upper_bounds():
    # Estimates are relative squared output errors, comparable between layers of any output scale.
    name = "transformer.h.0.mlp.c_fc"
    module, stats = one_layer(name, seed=0)
    weight = dense_weight(module)[0]
    found = candidates(name, module, stats)
    kronecker = [c.config.permute for c in found if c.method == "kronecker"]
    assert True in kronecker and False in kronecker  # every shape with and without permutations
    for candidate in found[1:]:
        method = tq.get_method(candidate.config.method)
        fitted, _ = method.fit(module, candidate.config, stats)
        assert tq.count_parameters(fitted) - fitted.bias.numel() == candidate.params
        actual = calibrated_error(weight, fitted.dense_weight(), stats.second_moment) ** 2
        if candidate.method == "lowrank":
            assert actual == pytest.approx(candidate.loss, rel=1e-4)
        else:
            assert actual <= candidate.loss * (1 + 1e-6)


@pytest.mark.parametrize("full_search_weights", [0, kronecker_method.ESTIMATE_FULL_SEARCH_WEIGHTS])
def test_kronecker_estimates_do_not_depend_on_the_clock_and_bound_fits_that_run_out_of_time(
    monkeypatch, full_search_weights
):
    # 0: every matrix is priced by the quick pass that real layers get.
    monkeypatch.setattr(kronecker_method, "ESTIMATE_FULL_SEARCH_WEIGHTS", full_search_weights)
    model = tiny_gpt2()
    ids = torch.randint(0, 120, (24, 32), generator=torch.Generator().manual_seed(0))
    names = ["transformer.wte", "transformer.h.0.mlp.c_fc", "transformer.h.1.attn.c_attn"]
    stats = collect(model, names, ids, progress=False)
    timed = {name: candidates(name, model.get_submodule(name), stats.for_module(name)) for name in names}
    monkeypatch.setattr(kronecker_search, "time", SlowClock())
    kronecker = tq.get_method("kronecker")
    for name in names:
        module, module_stats = model.get_submodule(name), stats.for_module(name)
        slow = candidates(name, module, module_stats)
        assert [(c.config, c.params, c.loss) for c in slow] == [(c.config, c.params, c.loss) for c in timed[name]]
        permuted = [c for c in slow if c.method == "kronecker" and c.config.permute]
        assert permuted
        for candidate in permuted:
            fitted, _ = kronecker.fit(module, candidate.config, module_stats)
            if isinstance(module, nn.Embedding):
                table = fitted.to_dense().weight
                actual = (
                    weighted_error(module.weight, table, module_stats.weights(), module_stats.head_second_moment) ** 2
                )
            else:
                weight = dense_weight(module)[0]
                actual = calibrated_error(weight, fitted.dense_weight(), module_stats.second_moment) ** 2
            assert actual <= candidate.loss * (1 + 1e-6)


def test_embedding_estimates_are_exact_for_the_calibrated_fit_of_a_tied_embedding():
    model = tiny_gpt2()
    ids = torch.randint(0, 40, (24, 32), generator=torch.Generator().manual_seed(0))  # a third of the vocabulary
    name = "transformer.wte"
    assert compressible_modules(model)[0] == name and name not in linear_layers(model)
    stats = collect(model, [name], ids, progress=False).for_module(name)
    assert stats.head_second_moment is not None  # GPT-2 ties its head: its logit error is priced too
    module, weights = model.get_submodule(name), stats.weights()
    found = candidates(name, module, stats)
    assert {c.method for c in found} == {"dense", "lowrank", "kronecker"}
    for candidate in found[1:]:
        fitted, _ = tq.get_method(candidate.config.method).fit(module, candidate.config, stats)
        actual = weighted_error(module.weight, fitted.to_dense().weight, weights, stats.head_second_moment) ** 2
        if candidate.method == "lowrank":
            assert actual == pytest.approx(candidate.loss, rel=1e-4)
        else:  # fitted with the configured (longer) search from the same start
            assert actual <= candidate.loss * (1 + 1e-6)
        assert tq.count_parameters(fitted) == candidate.params


def test_a_planted_permuted_kronecker_layer_is_priced_and_chosen():
    shape = propose_kronecker_shape(32, 64, 0.5)
    assert shape.n2 > 1
    w, _ = planted_matrix(shape, seed=3, rows=False, cols=True)  # (sum A_i ⊗ B_i) Q: outputs shuffled
    layer = nn.Linear(32, 64, bias=False)
    with torch.no_grad():
        layer.weight.copy_(w.T)
    # White inputs: the search then sees the planted matrix itself (how far the heuristic search gets on
    # whitened weights is the search's business, not the allocator's).
    stats = InputStats(256 * torch.eye(32, dtype=torch.float64), 256)
    found = candidates("layer", layer, stats)
    at_shape = {c.config.permute: c for c in found if c.method == "kronecker" and c.params == shape.num_params}
    assert at_shape[False].loss > 0.05 and at_shape[True].loss < 1e-10
    # Every other candidate of at most that size loses something: the budget takes the permuted one.
    chosen = allocate({"layer": found}, w.numel() - shape.num_params)["layer"]
    assert chosen is at_shape[True]
    fitted, _ = tq.get_method("kronecker").fit(layer, chosen.config, stats)
    torch.testing.assert_close(fitted.dense_weight().double(), w, rtol=0, atol=1e-4)


def silenced_mlp() -> GPT2LMHeadModel:
    """A tiny GPT-2 whose block-1 MLP adds (almost) nothing to the residual stream: compressing it is
    harmless, yet its relative output errors look like any other layer's."""
    model = tiny_gpt2()
    with torch.no_grad():
        model.transformer.h[1].mlp.c_proj.weight.mul_(1e-4)
        model.transformer.h[1].mlp.c_proj.bias.zero_()
    return model


def test_sensitivity_is_the_measured_kl_of_the_probe_per_unit_of_estimated_loss():
    model = silenced_mlp()
    ids = torch.randint(0, 120, (24, 32), generator=torch.Generator().manual_seed(0))
    names = compressible_modules(model)
    stats = collect(model, names, ids, progress=False)
    options = {name: candidates(name, model.get_submodule(name), stats.for_module(name)) for name in names}
    blocks = ids[:4]
    probes = {name: probe(found) for name, found in options.items()}
    sensitivity = {
        name: kl / probes[name].loss
        for name, kl in measure_divergence(model, probes, stats, blocks, progress=False).items()
    }
    assert set(sensitivity) == set(names)
    # Equivalence: the KL of the model with one module compressed for real, through the method's module.
    name = "transformer.h.0.attn.c_attn"
    candidate = probe(options[name])
    compressed = copy.deepcopy(model)
    plan = tq.CompressionPlan([tq.Rule(name.replace(".", r"\."), candidate.config)])
    tq.compress_(compressed, plan, calibration=stats, progress=False)
    with torch.no_grad():
        reference, logits = model(blocks).logits.log_softmax(-1), compressed(blocks).logits.log_softmax(-1)
    kl = float((reference.exp() * (reference - logits)).sum(-1).mean())
    # Not closer: a KL of ~1e-5 from float32 logits that take other kernels (dense vs factorised).
    assert sensitivity[name] * candidate.loss == pytest.approx(kl, rel=2e-2)
    # Measuring leaves the model as it was.
    torch.testing.assert_close(model(blocks).logits, silenced_mlp()(blocks).logits, rtol=0, atol=0)
    # The silenced MLP is measured as harmless; the rest is not.
    silent = [sensitivity[f"transformer.h.1.mlp.{n}"] for n in ("c_fc", "c_proj")]
    others = [value for key, value in sensitivity.items() if ".h.1.mlp." not in key]
    assert max(silent) < 0.01 * min(others)


def test_harm_is_linear_through_the_measured_points_and_proportional_beyond():
    probe_only = {0.1: 1.0}
    assert [harm(loss, probe_only) for loss in (0.0, 0.05, 0.3)] == pytest.approx([0.0, 0.5, 3.0])
    two = {0.4: 2.5, 0.1: 1.0}  # concave: the first tenth of loss costs most per unit
    assert [harm(loss, two) for loss in (0.05, 0.1, 0.25, 0.4, 0.8)] == pytest.approx([0.5, 1.0, 1.75, 2.5, 5.0])


def test_refinement_measures_the_kl_where_the_first_choice_fell_and_chooses_on_those_points():
    model = silenced_mlp()
    ids = torch.randint(0, 120, (24, 32), generator=torch.Generator().manual_seed(0))
    stats = collect(model, compressible_modules(model), ids, progress=False)
    target = round(0.6 * tq.count_parameters(model))
    # Low-rank only: Kronecker estimates search for a fixed time, so two runs may price them apart.
    first = allocation_plan(model, stats, target, ids[:4], methods=["lowrank"], refinements=0)
    refined = allocation_plan(model, stats, target, ids[:4], methods=["lowrank"], refinements=1)
    assert all(len(points) == 1 for points in first.measured.values())  # the probes alone
    moved = {n: c for n, c in first.chosen.items() if c.config is not None and c.loss not in first.measured[n]}
    assert moved  # the first choice left the probes
    kl = measure_divergence(model, moved, stats, ids[:4], progress=False)
    for name, candidate in moved.items():
        assert refined.measured[name][candidate.loss] == pytest.approx(kl[name], rel=1e-6)
        assert refined.measured[name].keys() == {*first.measured[name], candidate.loss}
    for name, candidate in refined.chosen.items():
        assert candidate.cost == pytest.approx(harm(candidate.loss, refined.measured[name]), abs=1e-12)
    assert refined.params <= target


def test_sensitivity_moves_the_budget_to_the_modules_that_matter():
    model = silenced_mlp()
    ids = torch.randint(0, 120, (24, 32), generator=torch.Generator().manual_seed(0))
    stats = collect(model, compressible_modules(model), ids, progress=False)
    mlp = [f"transformer.h.1.mlp.{n}" for n in ("c_fc", "c_proj")]
    saving = sum(model.get_submodule(n).weight.numel() for n in mlp) // 2
    target = tq.count_parameters(model) - saving
    plain = allocation_plan(model, stats, target)
    weighted = allocation_plan(model, stats, target, sensitivity_blocks=ids[:4])
    freed = {
        key: sum(model.get_submodule(n).weight.numel() - allocation.chosen[n].params for n in mlp)
        for key, allocation in (("plain", plain), ("weighted", weighted))
    }
    assert freed["weighted"] >= saving > freed["plain"]  # the harmless MLP pays for all of it
    assert weighted.params <= target and "est. KL" in weighted.table()


def test_a_floor_on_each_modules_share_binds_and_the_budget_is_still_met():
    model = silenced_mlp()
    ids = torch.randint(0, 120, (24, 32), generator=torch.Generator().manual_seed(0))
    stats = collect(model, compressible_modules(model), ids, progress=False)
    mlp = [f"transformer.h.1.mlp.{n}" for n in ("c_fc", "c_proj")]
    target = tq.count_parameters(model) - sum(model.get_submodule(n).weight.numel() for n in mlp) // 2

    def shares(allocation) -> dict[str, float]:
        return {n: c.params / model.get_submodule(n).weight.numel() for n, c in allocation.chosen.items()}

    free = allocation_plan(model, stats, target, sensitivity_blocks=ids[:4])
    assert min(shares(free).values()) < 0.6  # the floor binds
    floored = allocation_plan(model, stats, target, sensitivity_blocks=ids[:4], min_kept=0.6)
    assert min(shares(floored).values()) >= 0.6 and floored.params <= target
    with pytest.raises(ValueError, match=r"at least 0\.99 of its parameters"):
        allocation_plan(model, stats, target, sensitivity_blocks=ids[:4], min_kept=0.99)
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        allocation_plan(model, stats, target, min_kept=1.0)


def test_a_budget_is_met_and_its_plan_file_reruns(tmp_path, capsys):
    from tqcompressor.cli import main

    tiny_gpt2_dir(tmp_path)
    model = tq.loading.load_model(str(tmp_path / "tiny"))[0]
    total = tq.count_parameters(model)
    target = total - 12_000
    base = ["compress", "--model", str(tmp_path / "tiny"), "--calibration", str(tmp_path / "books"), "--quiet"]
    plain = [*base, "--target-params", str(target), "--no-sensitivity"]
    assert main([*plain, "--out", str(tmp_path / "auto")]) == 0
    auto = tq.load(tmp_path / "auto")
    # The token embedding is a candidate too; its rank steps are large, so the budget may be undershot.
    assert tq.count_parameters(auto) <= target
    assert f"parameters after: {tq.count_parameters(auto):,}" in (tmp_path / "auto" / "allocation.txt").read_text()
    assert {(tmp_path / "auto" / f).is_file() for f in ("allocation.yaml", "allocation.txt", "allocation.png")} == {
        True
    }
    rerun = ["compress", "--model", str(tmp_path / "tiny"), "--plan", str(tmp_path / "auto" / "allocation.yaml")]
    assert main([*rerun, "--out", str(tmp_path / "again"), "--quiet"]) == 0
    assert tq.count_parameters(tq.load(tmp_path / "again")) == tq.count_parameters(auto)
    measured = [*base, "--target-params", str(target), "--sensitivity-tokens", "64"]  # measured by default
    assert main([*measured, "--out", str(tmp_path / "weighted")]) == 0
    table = (tmp_path / "weighted" / "allocation.txt").read_text().splitlines()
    assert table[0].endswith("est. KL") and all(line.split()[-1] != "-" for line in table[1:-1])
    assert tq.count_parameters(tq.load(tmp_path / "weighted")) <= target
    assert main([*measured, "--sensitivity", "--out", str(tmp_path / "said")]) == 0  # the default, said
    plans = [(tmp_path / run / "allocation.yaml").read_text() for run in ("weighted", "said")]
    assert plans[0] == plans[1]
    deeper = [*base, "--target-ratio", "0.045", "--no-sensitivity"]  # low enough to cut linear layers too
    assert main([*deeper, "--no-sequential", "--out", str(tmp_path / "deep")]) == 0
    assert main([*deeper, "--out", str(tmp_path / "seq")]) == 0  # a budget is fitted sequentially by default
    assert (tmp_path / "seq" / "allocation.yaml").read_text() == (tmp_path / "deep" / "allocation.yaml").read_text()
    sequential, at_once = tq.load(tmp_path / "seq"), tq.load(tmp_path / "deep")
    assert tq.count_parameters(sequential) == tq.count_parameters(at_once)
    # The last compressed layer was fitted on inputs that the compressed blocks before it changed.
    compressed = [n for n, m in at_once.named_modules() if isinstance(m, tq.CompressedModule) and m.kind == "linear"]
    last = compressed[-1]
    assert not torch.allclose(sequential.get_submodule(last).dense_weight(), at_once.get_submodule(last).dense_weight())
    floor = [*base, "--target-ratio", "0.6", "--no-sensitivity", "--min-kept", "0.5"]
    assert main([*floor, "--out", str(tmp_path / "floored")]) == 0
    floored = tq.load(tmp_path / "floored")

    def weight_share(module: tq.CompressedModule) -> float:
        """Its weight's parameters over the dense weight's (the bias is kept as it was)."""
        dense = module.to_dense()
        bias = tq.count_parameters(dense) - dense.weight.numel()
        return (tq.count_parameters(module) - bias) / dense.weight.numel()

    shares = [weight_share(m) for m in floored.modules() if isinstance(m, tq.CompressedModule)]
    assert shares and min(shares) >= 0.5
    assert tq.count_parameters(floored) <= tq.count_parameters(model) * 0.6
    only = [*plain, "--methods", "kronecker", "--out", str(tmp_path / "kron")]
    assert main(only) == 0
    chosen = tq.CompressionPlan.load(tmp_path / "kron" / "allocation.yaml").rules
    assert chosen and {rule.config.method for rule in chosen} == {"kronecker"}
    assert tq.count_parameters(tq.load(tmp_path / "kron")) <= target
    capsys.readouterr()
    tiny = ["compress", "--model", str(tmp_path / "tiny")]
    plan = str(tmp_path / "auto" / "allocation.yaml")
    assert main([*plain, "--methods", "lowrank", "svd", "--out", str(tmp_path / "s4")]) == 2
    assert main([*base, "--plan", plan, "--methods", "lowrank", "--out", str(tmp_path / "s5")]) == 2
    err = capsys.readouterr().err
    assert "registered methods (kronecker, lowrank, neurons), got ['lowrank', 'svd']" in err
    assert "--min-kept concern" in err
    assert main([*base, "--plan", plan, "--min-kept", "0.5", "--out", str(tmp_path / "s6")]) == 2
    assert main([*plain, "--min-kept", "1", "--out", str(tmp_path / "s7")]) == 2
    assert "the share of its parameters each module keeps must be in [0, 1), got 1.0" in capsys.readouterr().err
    assert main([*base, "--plan", plan, "--no-sensitivity", "--out", str(tmp_path / "s1")]) == 2
    assert main([*base, "--plan", plan, "--sensitivity", "--out", str(tmp_path / "s8")]) == 2
    assert main([*plain, "--sensitivity-tokens", "64", "--out", str(tmp_path / "s2")]) == 2
    stats_only = [*tiny, "--calibration-stats", str(tmp_path / "nope"), "--target-params", str(target)]
    assert main([*stats_only, "--out", str(tmp_path / "s3")]) == 2
    err = capsys.readouterr().err
    assert (
        "concern a budget's choices" in err
        and "that --no-sensitivity turns off" in err
        and "give --calibration DATA (or --no-sensitivity" in err
    )
    assert main([*base, "--target-params", "1000", "--out", str(tmp_path / "x")]) == 2
    assert main([*base, "--target-ratio", "1.5", "--out", str(tmp_path / "y")]) == 2
    assert (
        main(["compress", "--model", str(tmp_path / "tiny"), "--target-ratio", "0.9", "--out", str(tmp_path / "z")])
        == 2
    )
    err = capsys.readouterr().err
    assert "out of reach: choose between" in err and "between 0 and 1" in err and "need --calibration" in err
    with pytest.raises(SystemExit):  # argparse: a budget and a plan exclude each other
        main([*rerun, "--target-params", "10", "--out", str(tmp_path / "w")])
    assert not any((tmp_path / name).exists() for name in ["x", "y", "z", "w", *(f"s{i}" for i in range(1, 8))])


def test_only_the_offered_methods_are_priced():
    name = "transformer.h.1.mlp.c_proj"
    module, stats = one_layer(name, seed=0)
    every = {c.method for c in candidates(name, module, stats)}
    assert every == {"dense", "lowrank", "kronecker"}
    assert {c.method for c in candidates(name, module, stats, ["lowrank"])} == {"dense", "lowrank"}
    model = tiny_gpt2()
    ids = torch.randint(0, 120, (8, 32), generator=torch.Generator().manual_seed(0))
    stats = collect(model, linear_layers(model), ids, progress=False)
    with pytest.raises(ValueError, match="registered methods"):
        allocation_plan(model, stats, tq.count_parameters(model) - 8_000, methods=["tucker"])


def test_compress_with_a_budget_in_python():
    model = tiny_gpt2()
    ids = torch.randint(0, 120, (24, 32), generator=torch.Generator().manual_seed(0))
    stats = collect(model, linear_layers(model), ids, progress=False)
    target = tq.count_parameters(model) - 8_000
    allocation = allocation_plan(model, stats, target)
    report = tq.compress_(model, target_params=target, calibration=stats, progress=False)
    assert report.params_after == allocation.params <= target
    assert target - report.params_before // 4 < report.params_after < report.params_before
    assert {layer.objective for layer in report.layers} == {"calibrated"}
    with pytest.raises(ValueError, match="not both"):
        tq.compress_(tiny_gpt2(), "tqcompressedgpt2", target_params=target, calibration=stats)


def test_losses_do_not_depend_on_a_layers_output_scale():
    # Raw squared errors made large-output layers look precious and small ones free to cut.
    name = "transformer.h.1.mlp.c_proj"
    module, stats = one_layer(name, seed=1)
    louder = copy.deepcopy(module)
    with torch.no_grad():
        louder.weight.mul_(1000.0)
    for quiet, loud in zip(candidates(name, module, stats), candidates(name, louder, stats), strict=True):
        assert quiet.params == loud.params
        assert loud.loss == pytest.approx(quiet.loss, rel=1e-6, abs=1e-12)


def test_a_layer_of_zeros_is_priced_at_no_loss_and_the_budget_is_still_met():
    """Nothing to lose and nothing to measure: its candidates cost 0, and no sensitivity probe is run."""
    model, name = tiny_gpt2(), "transformer.h.0.mlp.c_proj"
    with torch.no_grad():
        model.get_submodule(name).weight.zero_()
    ids = torch.randint(0, 120, (8, 32), generator=torch.Generator().manual_seed(0))
    stats = collect(model, compressible_modules(model), ids, progress=False)
    found = candidates(name, model.get_submodule(name), stats.for_module(name))
    assert {c.method for c in found} == {"dense", "lowrank", "kronecker"} and all(c.loss == 0 for c in found)
    target = tq.count_parameters(model) - 8_000
    allocation = allocation_plan(model, stats, target, sensitivity_blocks=ids[:2])
    assert name not in allocation.measured and allocation.params <= target
    assert allocation.chosen[name].params == min(c.params for c in found)


def test_a_budgets_sequential_fit_holds_no_more_of_the_originals_statistics_than_it_uses(tmp_path, monkeypatch):
    """The fit collects each part's inputs afresh: the original's input moments (width² each) are let go
    before it, and only the fitted layers' Fisher is handed on."""
    import gc
    import weakref

    from tqcompressor import cli

    tiny_gpt2_dir(tmp_path)
    collected, handed = [], {}
    collect_original, fit_original = cli.collect, cli.compress_sequentially

    def collect_watched(*args, **kwargs):
        stats = collect_original(*args, **kwargs)
        collected.append((weakref.ref(stats), set(stats.outputs)))
        return stats

    def fit_watched(model, plan, *args, output_moments, **kwargs):
        gc.collect()
        handed.update(alive=collected[0][0]() is not None, outputs=set(output_moments), plan=plan)
        return fit_original(model, plan, *args, output_moments=output_moments, **kwargs)

    monkeypatch.setattr(cli, "collect", collect_watched)
    monkeypatch.setattr(cli, "compress_sequentially", fit_watched)
    run = ["compress", "--model", str(tmp_path / "tiny"), "--calibration", str(tmp_path / "books"), "--quiet"]
    assert cli.main([*run, "--target-ratio", "0.045", "--sensitivity-tokens", "64", "--out", str(tmp_path / "o")]) == 0
    # A rule on an MLP cut whole fits its projections.
    patterns = [rule.pattern.replace("\\", "") for rule in handed["plan"].rules]
    fitted = {n for n in collected[0][1] if any(n == p or n.startswith(f"{p}.") for p in patterns)}
    assert not handed["alive"]
    assert handed["outputs"] == fitted & collected[0][1] and handed["outputs"] < collected[0][1]
