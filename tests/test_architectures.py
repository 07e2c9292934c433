"""Plans apply to any Hugging Face model built from nn.Linear / Conv1D / nn.Embedding, not only GPT-2."""

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


def llama_config(**overrides) -> LlamaConfig:
    settings = dict(vocab_size=120, hidden_size=32, intermediate_size=64, num_hidden_layers=2)
    return LlamaConfig(**{**settings, "num_attention_heads": 4, "num_key_value_heads": 2, **overrides})


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
