"""Mixture-of-Experts experts unfused into per-expert linear layers: the same model, and one that plans,
budgets, the sequential fit, save/load and export all reach."""

import copy
import json

import pytest
import torch
from conftest import gpt2_tokenizer

import tqcompressor as tq
from tqcompressor import CompressionPlan, LowRankConfig, LowRankLinear, Rule
from tqcompressor.allocation import allocation_plan, compressible_modules
from tqcompressor.calibration import collect
from tqcompressor.experts import UnfusedExperts
from tqcompressor.params import count_parameters
from tqcompressor.sequential import compress_sequentially

TINY = dict(vocab_size=120, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)


def mixtral(**overrides):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(**{**TINY, "num_key_value_heads": 2, "num_local_experts": 4, "num_experts_per_tok": 2})
    for key, value in overrides.items():
        setattr(config, key, value)
    return MixtralForCausalLM(config).eval()


def moe_pair():
    """A Mixtral teacher and its student with compressed experts, one of which no token is ever routed to (a
    step of data-parallel training then gives its layers no gradient: ``test_ddp``)."""
    teacher = mixtral(vocab_size=300)  # the size of test_distillation's pattern blocks
    student = copy.deepcopy(teacher)
    tq.unfuse_experts(student)
    plan = CompressionPlan([Rule(r".*experts\.down_proj\.\d+", LowRankConfig(rank=4))])
    tq.compress_(student, plan, progress=False)

    def never_3(module, args, output):
        logits, weights, index = output
        return logits, weights, torch.where(index == 3, torch.zeros_like(index), index)

    for layer in student.model.layers:
        layer.mlp.gate.register_forward_hook(never_3)
    return teacher, student


def gpt_oss():
    """Experts stored transposed (in x out), with biases, gate and up interleaved, a clamped gate."""
    from transformers import GptOssConfig, GptOssForCausalLM

    torch.manual_seed(0)
    config = GptOssConfig(**TINY, num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2)
    model = GptOssForCausalLM(config).eval()
    with torch.no_grad():  # initialised at zero: give the biases values a mix-up would show
        for name, p in model.named_parameters():
            if "experts" in name and name.endswith("_bias"):
                p.normal_()
    return model


def nemotron_h():
    """Experts without a gate: ``up_proj`` and an activation."""
    from transformers import NemotronHConfig, NemotronHForCausalLM

    torch.manual_seed(0)
    config = NemotronHConfig(
        **{**TINY, "num_hidden_layers": 2},
        num_key_value_heads=2,
        head_dim=8,
        layers_block_type=["full_attention", "moe"],
        n_routed_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        moe_shared_expert_intermediate_size=32,
    )
    return NemotronHForCausalLM(config).eval()


def ergo():
    """A class wrapping the experts' dispatch: each route normalised by its expert's own norm after it."""
    from transformers import ErgoConfig, ErgoForCausalLM

    torch.manual_seed(0)
    config = ErgoConfig(
        **TINY,
        num_key_value_heads=2,
        head_dim=8,
        first_dense_intermediate_size=64,
        moe_intermediate_size=32,
        shared_intermediate_size=32,
        num_experts=4,
        num_experts_per_tok=2,
        layer_types=["full_attention", "full_attention"],
        mlp_layer_types=["sparse", "sparse"],
    )
    return ErgoForCausalLM(config).eval()


@pytest.mark.parametrize("build", [mixtral, gpt_oss, nemotron_h, ergo])
def test_unfused_experts_compute_what_the_fused_ones_do_and_fuse_back_exactly(build):
    model = build()
    ids = torch.randint(0, 120, (2, 12))
    with torch.no_grad():
        logits = model(ids).logits
    before = {name: p.clone() for name, p in model.state_dict().items()}
    total = count_parameters(model)
    fused = {name for name in before if name.rpartition(".")[2].endswith("proj") and "experts" in name}
    assert fused, "the model's experts are 3-D tensors"
    names = tq.unfuse_experts(model)
    assert names and all(isinstance(model.get_submodule(name), UnfusedExperts) for name in names)
    state = model.state_dict()
    assert not fused & set(state)
    assert f"{names[0]}.down_proj.3.weight" in state and count_parameters(model) == total
    assert all(p.is_contiguous() for p in model.parameters())  # as a saved model loads: the same kernels
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, logits, rtol=1e-5, atol=1e-5)  # another summation order
    assert tq.unfuse_experts(model) == []
    assert tq.fuse_experts(model) == names
    assert not any(isinstance(module, UnfusedExperts) for module in model.modules())
    assert set(model.state_dict()) == set(before)
    assert all(torch.equal(p, before[name]) for name, p in model.state_dict().items())
    assert all(model.get_submodule(name).config is model.config for name in names)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, logits, rtol=0, atol=0)  # the same computation again


def test_a_budget_reaches_the_experts_once_unfused_and_the_run_round_trips(tmp_path):
    from transformers import MixtralForCausalLM

    from tqcompressor.export import export

    model = mixtral()
    blocks = torch.randint(0, 120, (16, 32))
    target = round(0.5 * count_parameters(model))
    stats = collect(model, compressible_modules(model), blocks, progress=False)
    with pytest.raises(ValueError, match=r"out of reach.*experts\.gate_up_proj.*unfuse_experts\(model\) first"):
        allocation_plan(model, stats, target)

    plan = CompressionPlan([Rule(r"model\.layers\.0\.mlp\.experts\.down_proj\.\d+", LowRankConfig(rank=4))])
    with pytest.raises(ValueError, match=r"experts become linear layers \(model\.layers\.0\.mlp\.experts\.down_proj"):
        tq.planned_parameters(model, plan)

    tq.unfuse_experts(model)
    assert tq.planned_parameters(model, plan) == count_parameters(model) - 4 * (64 * 32 - 4 * (64 + 32))
    stats = collect(model, compressible_modules(model), blocks, progress=False)
    report = tq.compress_(model, calibration=stats, target_params=target, progress=False)
    assert count_parameters(model) <= target
    experts = [layer.name for layer in report.layers if ".experts." in layer.name]
    assert len(experts) > 8  # of 16: the experts hold most of the parameters
    ids = torch.randint(0, 120, (2, 12))
    with torch.no_grad():
        logits = model(ids).logits
    tq.save(model, tmp_path / "run")
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["tqcompressor"]["unfused_experts"] == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    loaded = tq.load(tmp_path / "run")
    assert count_parameters(loaded) == count_parameters(model)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, logits, rtol=0, atol=0)
    export(tmp_path / "run", tmp_path / "hf")
    stock = MixtralForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert "model.layers.1.mlp.experts.down_proj" in stock.state_dict()
    with torch.no_grad():
        torch.testing.assert_close(stock(ids).logits, logits, rtol=1e-4, atol=1e-5)

    config["tqcompressor"]["unfused_experts"] = ["model.layers.0.self_attn"]
    (tmp_path / "run" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"unfuses experts at model\.layers\.0\.self_attn; the architecture has none"):
        tq.load(tmp_path / "run")


def test_the_sequential_fit_fits_experts_on_their_own_tokens_and_one_no_token_reaches_to_its_weight():
    """An expert's layer sees other tokens once earlier layers change the routing, so it is fitted to its
    own inputs, from whichever batches reach it; one the compressed model routes no token to is fitted as a
    data-free fit would."""
    model = mixtral()
    tq.unfuse_experts(model)
    layer_0 = model.model.layers[0].mlp.experts

    def route(module, args, output):
        logits, weights, index = output
        rows = index.shape[0]
        starved = {32: [1], 128: [2]}.get(rows, [])  # 1: not in the first block; 2: in the last batch alone
        if isinstance(layer_0.down_proj[0], LowRankLinear):  # once layer 0 is compressed, nobody picks 3
            starved.append(3)
        for expert in starved:
            index = torch.where(index == expert, torch.zeros_like(index), index)
        return logits, weights, index

    model.model.layers[1].mlp.gate.register_forward_hook(route)
    plan = CompressionPlan(
        [
            # Layer 1's gate_up layers stay dense: not aimed, their tokens differ between the streams.
            Rule(r"model\.layers\.0\.mlp\.experts\.(gate_up|down)_proj\.\d+", LowRankConfig(rank=6)),
            Rule(r"model\.layers\.1\.mlp\.experts\.down_proj\.\d+", LowRankConfig(rank=6)),
            Rule(r"model\.layers\.\d+\.self_attn\.q_proj", LowRankConfig(rank=4)),
        ]
    )
    originals = copy.deepcopy(model.model.layers[1].mlp.experts.down_proj)
    blocks = torch.randint(0, 120, (13, 32))  # batches of 4, 4, 4 and 1 blocks
    report = compress_sequentially(model, plan, blocks, progress=False, anchor=1.0, reconstruction_epochs=1)
    assert len(report.layers) == 14
    unreached = "got no token once the layers before them were compressed, fitted to their weights alone: 1"
    assert any(note.endswith(unreached) for note in report.notes)
    fitted = model.model.layers[1].mlp.experts.down_proj
    # Fitted to its weight, as without calibration; no token reaches it in the reconstruction either.
    torch.testing.assert_close(fitted[3].dense_weight(), data_free(originals[3]), rtol=1e-4, atol=1e-5)
    assert (fitted[0].dense_weight() - data_free(originals[0])).norm() > 0.05 * originals[0].weight.norm()


def data_free(layer: torch.nn.Linear) -> torch.Tensor:
    return tq.get_method("lowrank").fit(layer, LowRankConfig(rank=6))[0].dense_weight()


def test_the_cli_unfuses_experts_and_saves_dense_ones_fused(tmp_path, capsys):
    from transformers import MixtralForCausalLM

    from tqcompressor.cli import main

    model = mixtral(vocab_size=50257, intermediate_size=128, tie_word_embeddings=True)
    model.save_pretrained(tmp_path / "mx")
    gpt2_tokenizer().save_pretrained(tmp_path / "mx")
    (tmp_path / "books").mkdir()
    (tmp_path / "books" / "a.txt").write_text("It was the best of times, it was the worst of times. " * 200)
    (tmp_path / "plan.yaml").write_text(
        "rules:\n- pattern: model\\.layers\\.0\\.mlp\\.experts\\.(gate_up|down)_proj\\.\\d+\n"
        "  method: lowrank\n  ratio: 0.5\n"
    )
    run = ["compress", "--model", str(tmp_path / "mx"), "--plan", str(tmp_path / "plan.yaml"), "--quiet"]
    assert main([*run, "--calibration", str(tmp_path / "books"), "--out", str(tmp_path / "run")]) == 0
    assert "experts of 2 MoE layers as linear layers" in capsys.readouterr().err
    section = json.loads((tmp_path / "run" / "config.json").read_text())["tqcompressor"]
    assert section["unfused_experts"] == ["model.layers.0.mlp.experts"]  # layer 1's experts stayed dense
    assert len(section["modules"]) == 8
    compressed = tq.load(tmp_path / "run")
    assert count_parameters(compressed) < count_parameters(model)
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "hf")]) == 0
    ids = torch.randint(0, 50257, (2, 12))
    with torch.no_grad():
        stock = MixtralForCausalLM.from_pretrained(tmp_path / "hf").eval()(ids).logits
        torch.testing.assert_close(stock, compressed(ids).logits, rtol=1e-4, atol=1e-5)

    # A distillation schedule compresses a copy of the teacher: its steps name experts too.
    (tmp_path / "schedule.yaml").write_text(
        "steps:\n- name: experts\n  tokens: 256\n  rules:\n"
        "  - pattern: model\\.layers\\.\\d+\\.mlp\\.experts\\.down_proj\\.\\d+\n    method: lowrank\n    ratio: 0.5\n"
    )
    distill = ["distill", "--teacher", str(tmp_path / "mx"), "--schedule", str(tmp_path / "schedule.yaml")]
    assert main([*distill, "--data", str(tmp_path / "books" / "a.txt"), "--out", str(tmp_path / "d")]) == 0
    student = tq.load(tmp_path / "d" / "01-experts" / "model")
    assert isinstance(student.model.layers[1].mlp.experts.down_proj[2], LowRankLinear)


def test_keep_layers_keeps_unfused_experts_as_they_are():
    model = mixtral(num_hidden_layers=4)
    fused = copy.deepcopy(model)
    tq.unfuse_experts(model)
    assert tq.keep_layers_(model, "odd") == tq.keep_layers_(fused, "odd") == [1, 3]
    assert tq.unfuse_experts(fused) == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    assert model.state_dict().keys() == fused.state_dict().keys()
    ids = torch.randint(0, 120, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, fused(ids).logits, rtol=1e-5, atol=1e-5)


def test_a_schedule_unfuses_the_students_experts_and_leaves_the_teachers_fused(tmp_path):
    from test_distillation import config, pattern_blocks

    from tqcompressor.schedule import Schedule, ScheduleStep, run_schedule

    teacher = mixtral(vocab_size=300)  # the size of test_distillation's pattern blocks
    ids = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        logits = teacher(ids).logits
    experts = CompressionPlan([Rule(r"model\.layers\.\d+\.mlp\.experts\.down_proj\.\d+", LowRankConfig(rank=4))])
    schedule = Schedule([ScheduleStep("experts", experts, tokens=24 * 8 * 2)])
    schedule.check(teacher)  # against the student it will become
    run_schedule(teacher, None, schedule, pattern_blocks(), config(bf16=False), tmp_path / "run", progress=False)
    assert not any(isinstance(module, UnfusedExperts) for module in teacher.modules())
    with torch.no_grad():
        torch.testing.assert_close(teacher(ids).logits, logits, rtol=0, atol=0)
    student = tq.load(tmp_path / "run" / "01-experts" / "model")
    assert isinstance(student.model.layers[1].mlp.experts.down_proj[3], LowRankLinear)
