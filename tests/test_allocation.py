"""Budget-driven allocation: exact low-rank estimates, Kronecker bounds, a greedy provably close to the
best choice, and a budget met end to end."""

import copy
import itertools
import random

import pytest
import torch
from conftest import tiny_gpt2_dir
from transformers import GPT2Config, GPT2LMHeadModel

import tqcompressor as tq
from tqcompressor.allocation import Candidate, allocate, allocation_plan, candidates, linear_layers, lower_hull
from tqcompressor.calibration import collect
from tqcompressor.linalg import calibrated_error
from tqcompressor.methods.targets import dense_weight


def random_options(rng: random.Random, modules: int = 4, per_module: int = 5) -> dict[str, list[Candidate]]:
    options = {}
    for m in range(modules):
        size = rng.randint(50, 200)
        found = [Candidate(f"m{m}", None, size, 0.0)]
        for _ in range(per_module):
            found.append(Candidate(f"m{m}", tq.LowRankConfig(rank=1), rng.randint(1, size - 1), rng.uniform(0.1, 10)))
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
            sum(c.loss for c in combo)
            for combo in itertools.product(*options.values())
            if total - sum(c.params for c in combo) >= saving
        )
        greedy = sum(c.loss for c in chosen.values())
        # Greedy walks the convex relaxation: before its last step it was below the optimum, so the gap is
        # at most that step's added loss.
        largest_step = max(abs(a.loss - b.loss) for found in options.values() for a in found for b in found)
        assert best - 1e-12 <= greedy <= best + largest_step


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
    for candidate in candidates(name, module, stats)[1:]:
        method = tq.get_method(candidate.config.method)
        fitted, _ = method.fit(module, candidate.config, stats)
        assert tq.count_parameters(fitted) - fitted.bias.numel() == candidate.params
        actual = calibrated_error(weight, fitted.dense_weight(), stats.second_moment) ** 2
        if candidate.method == "lowrank":
            assert actual == pytest.approx(candidate.loss, rel=1e-4)
        else:
            assert actual <= candidate.loss * (1 + 1e-6)


def test_a_budget_is_met_and_its_plan_file_reruns(tmp_path, capsys):
    from tqcompressor.cli import main

    tiny_gpt2_dir(tmp_path)
    model = tq.loading.load_model(str(tmp_path / "tiny"))[0]
    total = tq.count_parameters(model)
    target = total - 12_000
    base = ["compress", "--model", str(tmp_path / "tiny"), "--calibration", str(tmp_path / "books"), "--quiet"]
    assert main([*base, "--target-params", str(target), "--out", str(tmp_path / "auto")]) == 0
    auto = tq.load(tmp_path / "auto")
    assert total - 14_000 < tq.count_parameters(auto) <= target
    assert {(tmp_path / "auto" / f).is_file() for f in ("allocation.yaml", "allocation.txt", "allocation.png")} == {
        True
    }
    rerun = ["compress", "--model", str(tmp_path / "tiny"), "--plan", str(tmp_path / "auto" / "allocation.yaml")]
    assert main([*rerun, "--out", str(tmp_path / "again"), "--quiet"]) == 0
    assert tq.count_parameters(tq.load(tmp_path / "again")) == tq.count_parameters(auto)
    capsys.readouterr()
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
    assert not any((tmp_path / name).exists() for name in "xyzw")


def test_compress_with_a_budget_in_python():
    model = tiny_gpt2()
    ids = torch.randint(0, 120, (24, 32), generator=torch.Generator().manual_seed(0))
    stats = collect(model, linear_layers(model), ids, progress=False)
    target = tq.count_parameters(model) - 8_000
    allocation = allocation_plan(model, stats, target)
    report = tq.compress_(model, target_params=target, calibration=stats, progress=False)
    assert report.params_after == allocation.params <= target
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
