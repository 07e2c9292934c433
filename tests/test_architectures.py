"""Plans apply to any Hugging Face model built from nn.Linear / Conv1D / nn.Embedding, not only GPT-2."""

import copy
import json

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

import tqcompressor as tq
from tqcompressor import KroneckerConfig, KroneckerLinear, LowRankConfig, TiedEmbeddingHead
from tqcompressor.loading import load_model
from tqcompressor.params import count_parameters
from tqcompressor.plan import CompressionPlan, Rule
from tqcompressor.presets import preset
from tqcompressor.serialization import load, materialize, save
from tqcompressor.surgery import compress_, planned_parameters

QUICK = dict(iterations=1, time_budget=1.0)


def bert():
    config = BertConfig(
        vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    return BertForMaskedLM(config), [
        Rule(r"bert\.embeddings\.word_embeddings", KroneckerConfig(embedding_factor=2, **QUICK)),
        Rule(r"bert\.encoder\.layer\.\d+\.intermediate\.dense", KroneckerConfig(ratio=0.5, **QUICK)),
        Rule(r"bert\.encoder\.layer\.1\.attention\.self\.query", LowRankConfig(rank=4)),
    ]


TINY = dict(vocab_size=120, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)


def llama_config(**overrides) -> LlamaConfig:
    return LlamaConfig(**{**TINY, "num_key_value_heads": 2, **overrides})


def gemma3_config(**overrides):
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(**{**TINY, "head_dim": 8, "num_key_value_heads": 2, **overrides})


def llama():
    config = llama_config(tie_word_embeddings=False)
    return LlamaForCausalLM(config), [
        Rule(r"model\.layers\.\d+\.mlp\.(gate|up|down)_proj", KroneckerConfig(ratio=0.5, **QUICK)),
        Rule(r"model\.layers\.0\.self_attn\.q_proj", KroneckerConfig(shape=(16, 8, 2, 4), rank=2, **QUICK)),
    ]


def opt():
    config = OPTConfig(
        vocab_size=120,
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        word_embed_proj_dim=32,
        max_position_embeddings=64,
    )
    return OPTForCausalLM(config), [
        Rule(r"model\.decoder\.embed_tokens", KroneckerConfig(embedding_factor=4, **QUICK)),
        Rule(r"model\.decoder\.layers\.\d+\.fc[12]", KroneckerConfig(ratio=0.25, **QUICK)),
    ]


@pytest.mark.parametrize("build", [bert, llama, opt])
def test_plan_compresses_saves_loads_and_materializes_other_architectures(build, tmp_path):
    torch.manual_seed(0)
    model, rules = build()
    model.eval()
    plan = CompressionPlan(rules, name=build.__name__)
    expected = planned_parameters(model, plan)
    before = count_parameters(model)
    report = compress_(model, plan, progress=False)
    assert report.params_after == expected == count_parameters(model) < before
    assert any(isinstance(m, KroneckerLinear) for m in model.modules())
    embedding_compressed = any(getattr(r.config, "embedding_factor", None) for r in rules)
    assert isinstance(model.get_output_embeddings(), TiedEmbeddingHead) == embedding_compressed

    ids = torch.randint(0, 120, (2, 10))
    logits = model(ids).logits
    save(model, tmp_path / "m")
    loaded = load(tmp_path / "m")
    assert type(loaded) is type(model)
    assert count_parameters(loaded) == count_parameters(model)  # shared tensors are shared again
    torch.testing.assert_close(loaded(ids).logits, logits, rtol=0, atol=0)
    dense = materialize(loaded)
    assert not any(isinstance(m, KroneckerLinear) for m in dense.modules())
    torch.testing.assert_close(dense(ids).logits, logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("tied", [True, False])
def test_the_paper_preset_maps_onto_llama_module_names(tied, tmp_path):
    torch.manual_seed(0)
    config = llama_config(vocab_size=96, num_hidden_layers=4, tie_word_embeddings=tied)
    model = LlamaForCausalLM(config).eval()
    plan = preset("tqcompressedgpt2", config, **QUICK)
    expected = planned_parameters(model, plan)
    report = compress_(model, plan, progress=False)
    assert report.params_after == expected == count_parameters(model)
    names = [layer.name for layer in report.layers]
    assert names.count("model.embed_tokens") == 2
    assert {n for n in names if ".mlp." in n} == {
        f"model.layers.{i}.mlp.{p}_proj" for i in (1, 3) for p in ("gate", "up", "down")
    }
    assert model.model.embed_tokens.base.shape == (96, 8)
    # A tied head follows the compressed embedding; an untied one stays a dense nn.Linear.
    assert isinstance(model.get_output_embeddings(), TiedEmbeddingHead) == tied
    ids = torch.randint(0, 96, (2, 7))
    logits = model(ids).logits
    save(model, tmp_path / "m")
    torch.testing.assert_close(load(tmp_path / "m")(ids).logits, logits, rtol=0, atol=0)


def test_cli_handles_encoder_models_with_fidelity_instead_of_perplexity(tmp_path, capsys):
    from transformers import BertForSequenceClassification, GPT2TokenizerFast

    from tqcompressor.assets import assets_dir
    from tqcompressor.cli import main

    folder = assets_dir() / "gpt2-tokenizer"
    tokenizer = GPT2TokenizerFast(str(folder / "vocab.json"), str(folder / "merges.txt"))
    settings = dict(vocab_size=50257, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    torch.manual_seed(0)
    for name, model in (
        ("mlm", BertForMaskedLM(BertConfig(**settings))),
        ("cls", BertForSequenceClassification(BertConfig(**settings, num_labels=3))),
    ):
        model.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    (tmp_path / "plan.yaml").write_text(
        "rules:\n  - {pattern: 'bert\\.encoder\\.layer\\.\\d+\\.intermediate\\.dense', method: lowrank, ratio: 0.5}\n"
    )
    (tmp_path / "text.txt").write_text("It was the best of times, it was the worst of times. " * 40)
    for name, kind in (("mlm", "BertForMaskedLM"), ("cls", "BertForSequenceClassification")):
        out = tmp_path / f"{name}-tq"
        assert (
            main(
                [
                    "compress",
                    "--model",
                    str(tmp_path / name),
                    "--plan",
                    str(tmp_path / "plan.yaml"),
                    "--out",
                    str(out),
                    "--quiet",
                ]
            )
            == 0
        )
        assert type(tq.load(out)).__name__ == kind
        capsys.readouterr()
        assert main(["eval", str(out), "--dataset", str(tmp_path / "text.txt")]) == 2
        assert "perplexity and LAMBADA apply to causal LMs; this is a " + kind in capsys.readouterr().err
        assert (
            main(
                [
                    "eval",
                    str(out),
                    "--dataset",
                    str(tmp_path / "text.txt"),
                    "--reference",
                    str(tmp_path / name),
                    "--max-length",
                    "64",
                    "--json",
                    str(tmp_path / f"{name}.json"),
                ]
            )
            == 0
        )
        result = json.loads((tmp_path / f"{name}.json").read_text())
        assert 0.5 < result["hidden_cosine"] < 1 and 0 <= result["output_agreement"] <= 1 and result["kind"] == kind
        assert main(["export", str(out), str(tmp_path / f"{name}-hf")]) == 0
        assert type(load_model(str(tmp_path / f"{name}-hf"))[0]).__name__ == kind


def test_a_budget_names_the_parameters_it_cannot_reach_such_as_mixture_of_experts_tensors():
    from transformers import MixtralConfig, MixtralForCausalLM

    from tqcompressor.allocation import allocation_plan, compressible_modules
    from tqcompressor.calibration import collect
    from tqcompressor.params import parameters_outside

    torch.manual_seed(0)
    config = MixtralConfig(
        **TINY, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=True
    )
    model = MixtralForCausalLM(config).eval()
    names = compressible_modules(model)
    outside = parameters_outside(model, names)
    # The experts are 3-D tensors, not linear layers; the tied head is the embedding's weight, counted there.
    assert "model.layers.0.mlp.experts.gate_up_proj" in outside and "lm_head.weight" not in outside
    inside = sum(p.numel() for n in names for p in model.get_submodule(n).parameters())
    assert sum(outside.values()) + inside == count_parameters(model)
    stats = collect(model, names, torch.randint(0, 120, (8, 32)), progress=False)
    total = count_parameters(model)
    with pytest.raises(ValueError, match=r"out of reach.*parameters outside the modules chosen for .*experts"):
        allocation_plan(model, stats, round(0.3 * total))
    allocation = allocation_plan(model, stats, round(0.95 * total))
    assert f"{sum(outside.values()):,} parameters outside the modules chosen for stay" in allocation.table()


def test_a_router_that_subclasses_linear_is_refused_by_plans_and_left_out_of_budgets():
    """Phi-MoE's router is an nn.Linear whose forward returns its top-k choice; a compressed layer in its
    place would return logits alone. Falcon's nn.Linear subclass computes the product alone and stays in."""
    from transformers import FalconConfig, FalconForCausalLM, PhimoeConfig, PhimoeForCausalLM

    from tqcompressor.allocation import compressible_modules, linear_layers
    from tqcompressor.calibration import collect
    from tqcompressor.sequential import compress_sequentially

    torch.manual_seed(0)
    config = PhimoeConfig(**TINY, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
    model = PhimoeForCausalLM(config).eval()
    before = {name: p.clone() for name, p in model.state_dict().items()}
    plan = CompressionPlan([Rule(r"model\.layers\.0\.mlp\.router", LowRankConfig(rank=2))])
    with pytest.raises(ValueError, match=r"mlp\.router: cannot compress a PhimoeTopKRouter: its forward computes more"):
        compress_(model, plan, progress=False)
    assert all(torch.equal(p, before[name]) for name, p in model.state_dict().items())
    names = compressible_modules(model)
    assert "model.layers.0.self_attn.q_proj" in names and not any(name.endswith("router") for name in names)
    blocks = torch.randint(0, 120, (4, 16))
    stats = collect(model, linear_layers(model), blocks, progress=False, fisher=True)  # routers' outputs are tuples
    target = round(0.97 * count_parameters(model))
    sequential = copy.deepcopy(model)
    compress_(model, calibration=stats, target_params=target, progress=False)
    assert count_parameters(model) <= target and model(blocks[:1]).logits.isfinite().all()
    # A sequential fit aims the layers it keeps dense at the original's outputs; a router is not one of them.
    attention = CompressionPlan([Rule(r"model\.layers\.\d+\.self_attn\.q_proj", LowRankConfig(rank=4))])
    compress_sequentially(sequential, attention, blocks, progress=False)
    routers = [name for name in before if name.endswith("router.weight")]
    assert routers and all(torch.equal(sequential.state_dict()[name], before[name]) for name in routers)

    falcon = FalconForCausalLM(FalconConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4))
    assert type(falcon.transformer.h[0].self_attention.dense).__name__ == "FalconLinear"
    assert "transformer.h.0.self_attention.dense" in compressible_modules(falcon)


def test_a_budget_leaves_out_what_no_method_can_shrink():
    """Qwen2-MoE gates its shared expert with a linear layer of one output: no rank is below 1."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    from tqcompressor.allocation import allocation_plan, compressible_modules
    from tqcompressor.calibration import collect

    torch.manual_seed(0)
    config = Qwen2MoeConfig(
        **TINY,
        num_key_value_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=32,
    )
    model = Qwen2MoeForCausalLM(config).eval()
    names = compressible_modules(model)
    assert "model.layers.0.mlp.shared_expert_gate" in names
    blocks = torch.randint(0, 120, (4, 16))
    stats = collect(model, names, blocks, progress=False)
    allocation = allocation_plan(model, stats, round(0.8 * count_parameters(model)), sensitivity_blocks=blocks[:2])
    assert "model.layers.0.mlp.shared_expert_gate" not in allocation.chosen
    assert "model.layers.0.mlp.shared_expert_gate.weight" in allocation.outside
    assert allocation.params <= round(0.8 * count_parameters(model))


def test_encoder_decoder_models_compress_by_plan_and_refuse_what_runs_them_on_token_ids_clearly(tmp_path, capsys):
    from transformers import GPT2TokenizerFast, T5Config, T5ForConditionalGeneration

    from tqcompressor.assets import assets_dir
    from tqcompressor.calibration import collect
    from tqcompressor.cli import main
    from tqcompressor.data import TokenBlocks
    from tqcompressor.evaluation import fidelity
    from tqcompressor.training import TrainConfig, Trainer

    torch.manual_seed(0)
    sizes = dict(d_model=16, d_ff=32, num_layers=2, num_heads=2, d_kv=8)
    config = T5Config(vocab_size=50257, **sizes, decoder_start_token_id=0)
    model = T5ForConditionalGeneration(config).eval()
    folder = assets_dir() / "gpt2-tokenizer"
    tokenizer = GPT2TokenizerFast(str(folder / "vocab.json"), str(folder / "merges.txt"))
    model.save_pretrained(tmp_path / "t5")
    tokenizer.save_pretrained(tmp_path / "t5")
    # T5 casts its hidden states to wo.weight.dtype: a compressed wo computes that weight.
    plan = CompressionPlan([Rule(r".*DenseReluDense\.w[io]", LowRankConfig(rank=4))], name="t5")
    compress_(model, plan, progress=False)
    ids = torch.randint(0, 50257, (2, 9))
    logits = model(input_ids=ids, decoder_input_ids=ids).logits
    save(model, tmp_path / "t5-tq", tokenizer=tokenizer)
    loaded = load(tmp_path / "t5-tq")
    torch.testing.assert_close(loaded(input_ids=ids, decoder_input_ids=ids).logits, logits)
    dense = materialize(loaded)
    assert not any(isinstance(m, tq.LowRankLinear) for m in dense.modules())
    torch.testing.assert_close(dense(input_ids=ids, decoder_input_ids=ids).logits, logits, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="encoder-decoder model; calibration runs a model on token ids alone"):
        collect(model, ["encoder.block.0.layer.1.DenseReluDense.wo"], ids.repeat(4, 4), progress=False)
    with pytest.raises(ValueError, match="encoder-decoder model; fidelity runs a model on token ids alone"):
        fidelity(loaded, model, ids.flatten().tolist(), window=9)
    blocks = TokenBlocks(ids.repeat(4, 1), ids, "random")
    with pytest.raises(ValueError, match="encoder-decoder model; distillation runs a model on token ids alone"):
        Trainer(loaded, model, blocks, TrainConfig(tokens=72, batch_size=4), tmp_path / "api", progress=False)

    (tmp_path / "text.txt").write_text("It was the best of times, it was the worst of times. " * 40)
    capsys.readouterr()
    budget = ["--target-ratio", "0.6", "--calibration", str(tmp_path / "text.txt"), "--calibration-tokens", "512"]
    assert main(["compress", "--model", str(tmp_path / "t5"), *budget, "--out", str(tmp_path / "a"), "--quiet"]) == 2
    assert "encoder-decoder model; calibration" in capsys.readouterr().err
    distill = ["distill", "--teacher", str(tmp_path / "t5"), "--student", str(tmp_path / "t5-tq")]
    assert main([*distill, "--data", str(tmp_path / "text.txt"), "--tokens", "256", "--out", str(tmp_path / "d")]) == 2
    assert "encoder-decoder model; distillation" in capsys.readouterr().err
    fidelity = ["eval", str(tmp_path / "t5-tq"), "--dataset", str(tmp_path / "text.txt")]
    assert main([*fidelity, "--reference", str(tmp_path / "t5"), "--json", str(tmp_path / "e.json")]) == 2
    assert "encoder-decoder model; fidelity" in capsys.readouterr().err
    assert not any((tmp_path / name).exists() for name in ("a", "d", "e.json", "api"))


def test_a_scaled_token_embedding_stays_scaled_compressed_saved_loaded_materialized_and_exported(tmp_path):
    """Gemma (and BART, M2M100, ...) multiply the rows they look up by √d in the embedding's own forward;
    a compressed table standing in for it must too, and every way back to a dense model keeps it."""
    from transformers import Gemma3ForCausalLM

    from tqcompressor.allocation import compressible_modules
    from tqcompressor.export import export

    torch.manual_seed(0)
    model = Gemma3ForCausalLM(gemma3_config()).eval()
    assert float(model.model.embed_tokens.embed_scale) == pytest.approx(32**0.5)
    assert "model.embed_tokens" in compressible_modules(model)
    ids = torch.randint(0, 120, (2, 10))
    original = model(ids).logits
    exact = copy.deepcopy(model)
    compress_(exact, CompressionPlan([Rule(r"model\.embed_tokens", LowRankConfig(rank=32))]), progress=False)
    torch.testing.assert_close(exact(ids).logits, original, rtol=1e-4, atol=1e-4)
    halved = CompressionPlan([Rule(r"model\.embed_tokens", KroneckerConfig(embedding_factor=2, **QUICK))])
    compress_(model, halved, progress=False)
    compress_(model, halved, progress=False)  # a compressed embedding compressed again keeps the scale
    logits = model(ids).logits
    weight = model.model.embed_tokens.weight.detach()
    looked_up = model.model.embed_tokens(ids)
    torch.testing.assert_close(looked_up, weight[ids] * 32**0.5, rtol=1e-5, atol=1e-6)

    save(model, tmp_path / "run")
    torch.testing.assert_close(load(tmp_path / "run")(ids).logits, logits, rtol=0, atol=0)
    torch.testing.assert_close(materialize(load(tmp_path / "run"))(ids).logits, logits, rtol=1e-4, atol=1e-5)
    export(tmp_path / "run", tmp_path / "hf")
    stock = Gemma3ForCausalLM.from_pretrained(tmp_path / "hf").eval()
    torch.testing.assert_close(stock(ids).logits, logits, rtol=1e-4, atol=1e-5)


class NormedEmbedding(torch.nn.Embedding):
    """An embedding whose forward is more than a lookup times a constant (as some HF models' are)."""

    def __init__(self, vocab: int, width: int):
        super().__init__(vocab, width)
        self.norm = torch.nn.LayerNorm(width)

    def forward(self, input_ids):
        return self.norm(super().forward(input_ids))


def test_an_embedding_that_computes_more_than_a_lookup_is_refused_by_plans_and_left_out_of_budgets():
    from tqcompressor.allocation import compressible_modules

    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(tie_word_embeddings=False)).eval()
    model.model.embed_tokens = NormedEmbedding(120, 32)
    before = {name: p.clone() for name, p in model.state_dict().items()}
    plan = CompressionPlan([Rule(r"model\.embed_tokens", LowRankConfig(rank=8))])
    with pytest.raises(ValueError, match=r"model\.embed_tokens: NormedEmbedding computes more than a table lookup"):
        compress_(model, plan, progress=False)
    assert type(model.model.embed_tokens) is NormedEmbedding
    assert all(torch.equal(p, before[name]) for name, p in model.state_dict().items())
    names = compressible_modules(model)
    assert "model.embed_tokens" not in names and "model.layers.0.mlp.up_proj" in names


def test_a_multimodal_model_compresses_its_language_model_by_budget_and_leaves_its_vision_tower(tmp_path):
    """Gemma 3 with a vision tower, calibrated on text: the budget chooses among the modules the text runs
    through (the rest stay as they are, named), and the sequential fit keeps the language model's inputs
    (its cache switch lives in the text config)."""
    from conftest import gpt2_tokenizer
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    from tqcompressor.cli import main
    from tqcompressor.export import export
    from tqcompressor.sequential import compress_sequentially

    torch.manual_seed(0)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=28)
    config = Gemma3Config(
        text_config=gemma3_config(vocab_size=50260),
        vision_config={**vision, "patch_size": 14},
        mm_tokens_per_image=4,
        boi_token_index=50257,
        eoi_token_index=50258,
        image_token_index=50259,
    )
    model = Gemma3ForConditionalGeneration(config).eval()
    language = CompressionPlan([Rule(r"model\.language_model\.layers\.\d+\.mlp\.\w+_proj", LowRankConfig(rank=8))])
    report = compress_sequentially(copy.deepcopy(model), language, torch.randint(0, 50257, (8, 16)), progress=False)
    assert "2 blocks: 2 on kept inputs" in report.notes[0]

    model.save_pretrained(tmp_path / "mm")
    gpt2_tokenizer().save_pretrained(tmp_path / "mm")
    (tmp_path / "books").mkdir()
    (tmp_path / "books" / "a.txt").write_text("It was the best of times, it was the worst of times. " * 400)
    run = ["compress", "--model", str(tmp_path / "mm"), "--calibration", str(tmp_path / "books")]
    assert main([*run, "--target-ratio", "0.8", "--calibration-tokens", "2048", "--out", str(tmp_path / "run")]) == 0
    table = (tmp_path / "run" / "allocation.txt").read_text()
    assert "vision_tower" not in table.split("parameters after")[0]
    assert "stay as they are (the most in model.vision_tower" in table
    compressed = load(tmp_path / "run")
    assert count_parameters(compressed) <= round(0.8 * count_parameters(model))
    ids = torch.randint(0, 50257, (2, 12))
    export(tmp_path / "run", tmp_path / "hf")
    stock = Gemma3ForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    torch.testing.assert_close(stock(ids).logits, compressed(ids).logits, rtol=1e-4, atol=1e-5)


def test_models_that_read_a_compressed_layers_weight(tmp_path):
    """Mamba reads ``dt_proj.weight`` instead of calling the layer and casts to ``lm_head.weight.dtype``:
    a compressed layer, and a head tied to a compressed embedding, give the weight they compute."""
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(0)
    config = MambaConfig(vocab_size=120, hidden_size=64, num_hidden_layers=2, state_size=4)
    model = MambaForCausalLM(config).eval()
    assert model.backbone.layers[0].mixer.dt_proj.in_features == 4
    plan = CompressionPlan(
        [
            Rule(r"backbone\.embeddings", LowRankConfig(rank=8)),
            Rule(r"backbone\.layers\.\d+\.mixer\.(dt|out)_proj", LowRankConfig(rank=2)),
        ]
    )
    compress_(model, plan, progress=False)
    assert isinstance(model.lm_head, TiedEmbeddingHead)
    dt_proj = model.backbone.layers[0].mixer.dt_proj
    torch.testing.assert_close(dt_proj.weight, dt_proj.to_dense().weight)
    ids = torch.randint(0, 120, (2, 12))
    logits = model(ids).logits
    dense = materialize(copy.deepcopy(model))
    torch.testing.assert_close(dense(ids).logits, logits, rtol=1e-4, atol=1e-5)
    logits.logsumexp(-1).mean().backward()  # gradients reach the factors through the weight read
    assert dt_proj.u.grad is not None and dt_proj.u.grad.abs().sum() > 0
    save(model, tmp_path / "mamba")
    torch.testing.assert_close(load(tmp_path / "mamba")(ids).logits, logits)

    # A sequential fit aims the dense layers after a compressed one; dt_proj is never called, so not aimed.
    from tqcompressor.sequential import compress_sequentially

    model = MambaForCausalLM(config).eval()
    before = copy.deepcopy(model.state_dict())
    in_proj = CompressionPlan([Rule(r"backbone\.layers\.\d+\.mixer\.in_proj", LowRankConfig(rank=8))])
    compress_sequentially(model, in_proj, torch.randint(0, 120, (8, 16)), progress=False)
    state = model.state_dict()
    assert not torch.equal(
        state["backbone.layers.1.mixer.out_proj.weight"], before["backbone.layers.1.mixer.out_proj.weight"]
    )
    assert all(
        torch.equal(
            state[f"backbone.layers.{i}.mixer.dt_proj.weight"], before[f"backbone.layers.{i}.mixer.dt_proj.weight"]
        )
        for i in (0, 1)
    )


def _tiny_zamba2() -> torch.nn.Module:
    """Zamba2 calls one transformer block from several layers, which hold the same parameters."""
    from transformers import Zamba2Config, Zamba2ForCausalLM

    torch.manual_seed(0)
    config = Zamba2Config(
        **{**TINY, "num_hidden_layers": 4, "num_key_value_heads": 4},
        layers_block_type=["mamba", "hybrid", "mamba", "hybrid"],  # layers 1 and 3 call the shared block
        num_mem_blocks=1,
        mamba_headdim=8,
        n_mamba_heads=8,
        mamba_d_state=8,
        mamba_ngroups=1,
        attention_head_dim=8,
        pad_token_id=0,
    )
    return Zamba2ForCausalLM(config).eval()


def test_a_budget_and_a_sequential_fit_leave_weights_that_several_layers_share():
    """Compressing one use of a shared weight would leave the dense weight to the others and free nothing,
    and aiming it at one use would move it for the others."""
    from tqcompressor.allocation import compressible_modules
    from tqcompressor.calibration import collect, forward_order
    from tqcompressor.sequential import compress_sequentially

    model = _tiny_zamba2()
    config = model.config
    shared = "model.layers.{}.shared_transformer.self_attn.q_proj"
    assert model.get_submodule(shared.format(1)).weight is model.get_submodule(shared.format(3)).weight
    names = compressible_modules(model)
    assert "model.layers.0.mamba.in_proj" in names and not any("shared_transformer" in name for name in names)
    blocks = torch.randint(0, config.vocab_size, (8, 16))
    stats = collect(model, forward_order(model, names, blocks[:1]), blocks, progress=False)  # as the CLI does
    target = round(0.8 * count_parameters(model))
    budgeted = copy.deepcopy(model)
    compress_(budgeted, calibration=stats, target_params=target, progress=False)
    assert count_parameters(budgeted) <= target

    before = {name: p.detach().clone() for name, p in model.named_parameters() if "shared_transformer" in name}
    in_proj = CompressionPlan([Rule(r"model\.layers\.0\.mamba\.in_proj", LowRankConfig(rank=4))])
    compress_sequentially(model, in_proj, blocks, progress=False)
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters() if name in before)


def test_a_plan_that_replaces_one_use_of_a_shared_weight_counts_and_says_that_the_others_keep_it():
    from tqcompressor.sequential import compress_sequentially

    model = _tiny_zamba2()
    original = count_parameters(model)
    q_proj = r"model\.layers\.{}\.shared_transformer\.self_attn\.q_proj"
    blocks = torch.randint(0, model.config.vocab_size, (8, 16))
    for layers, grows in (("1", True), ("[13]", False)):  # one use: the other keeps the dense weight
        plan = CompressionPlan([Rule(q_proj.format(layers), LowRankConfig(rank=4))])
        expected = planned_parameters(model, plan)
        assert (expected > original) == grows
        for fit in (compress_, lambda m, p, progress: compress_sequentially(m, p, blocks, progress=progress)):
            compressed = copy.deepcopy(model)
            report = fit(compressed, plan, progress=False)
            assert count_parameters(compressed) == report.params_after == expected
            said = [note for note in report.notes if "shared with modules the plan leaves stay dense" in note]
            assert bool(said) == grows
            assert not said or "layers.3.shared_transformer.self_attn.q_proj.weight" in said[0]
