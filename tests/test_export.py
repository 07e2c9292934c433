"""Export writes a dense Hugging Face model that stock transformers loads without this package, and
compressed models refuse save_pretrained instead of writing something broken."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import gpt2_tokenizer
from transformers import GPT2Config, GPT2LMHeadModel

import tqcompressor as tq
from tqcompressor.cli import main

LOAD_WITHOUT_TQCOMPRESSOR = """
import sys
sys.modules["tqcompressor"] = None  # importing it now fails: the export must stand alone
import json, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
ids = torch.tensor(json.loads(sys.argv[2]))
with torch.no_grad():
    torch.save(model(ids).logits, sys.argv[3])
print(type(model).__name__, model.config.tie_word_embeddings)
"""


@pytest.mark.parametrize(
    "embedding", ["compressed, tied", "compressed, untied", "dense, tied", "dense, tied, saved as untied"]
)
def test_export_loads_in_stock_transformers_with_the_same_logits(tmp_path, embedding):
    from tqcompressor.surgery import set_untied_config

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=120, n_positions=64)).eval()
    tie_head = "untied" not in embedding.split(", ")
    if embedding.startswith("compressed"):
        tq.compress_(model, "tqcompressedgpt2", tie_head=tie_head, iterations=1, time_budget=1.0, progress=False)
    else:  # the head stays the embedding's own weight, stored once
        mlp = tq.CompressionPlan([tq.Rule(r"transformer\.h\.\d+\.mlp\.c_fc", tq.LowRankConfig(rank=4))])
        tq.compress_(model, mlp, progress=False)
    if embedding.endswith("saved as untied"):  # as runs saved after an earlier version's load were
        set_untied_config(model)
    tq.save(model, tmp_path / "run")
    ids = [[5, 17, 99, 3, 42, 7]]
    with torch.no_grad():
        expected = model(torch.tensor(ids)).logits
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "hf")]) == 0
    assert "tqcompressor" not in json.loads((tmp_path / "hf" / "config.json").read_text())
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            LOAD_WITHOUT_TQCOMPRESSOR,
            str(tmp_path / "hf"),
            json.dumps(ids),
            str(tmp_path / "l.pt"),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.split() == ["GPT2LMHeadModel", str(tie_head)]
    # Dense weights are the product of the factors: equal up to float32 rounding, not bit for bit.
    torch.testing.assert_close(torch.load(tmp_path / "l.pt"), expected, rtol=1e-4, atol=1e-4)


def test_export_refuses_to_overwrite_and_names_non_models(tmp_path, capsys):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "mine.txt").write_text("keep")
    (tmp_path / "notamodel").mkdir()
    assert main(["export", str(tmp_path / "notamodel"), str(tmp_path / "out")]) == 2
    assert main(["export", str(tmp_path / "notamodel"), str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert "is not a model directory (no config.json)" in err[0] and "already exists" in err[1]
    assert (tmp_path / "hf" / "mine.txt").read_text() == "keep" and not (tmp_path / "out").exists()


def test_compressed_models_refuse_save_pretrained_until_materialized(tmp_path):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=120, n_positions=64))
    tq.compress_(
        model, tq.CompressionPlan([tq.Rule(r"transformer\.h\.0\.mlp\.c_fc", tq.LowRankConfig(rank=4))]), progress=False
    )
    for saver in (model.save_pretrained, model.push_to_hub):
        with pytest.raises(ValueError, match=r"tqcompressor\.save"):
            saver(tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    tq.save(model, tmp_path / "run")
    loaded = tq.load(tmp_path / "run")
    with pytest.raises(ValueError, match=r"tqcompressor\.save"):
        loaded.save_pretrained(tmp_path / "hf")
    tq.materialize(loaded).save_pretrained(tmp_path / "hf")
    assert (tmp_path / "hf" / "model.safetensors").is_file()


def test_materialize_by_pattern_densifies_only_the_matching_layers(tmp_path):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=120, n_positions=64)).eval()
    plan = tq.preset("kngpt2", model.config)
    tq.compress_(model, plan, progress=False)
    ids = torch.randint(0, 120, (2, 12))
    with torch.no_grad():
        before = model(ids).logits
    with pytest.raises(ValueError, match="matches none of the compressed modules"):
        tq.materialize(model, r"transformer\.h\.0\.attn\..*")
    tq.materialize(model, r".*\.c_fc|transformer\.wte")
    assert type(model.transformer.h[1].mlp.c_fc).__name__ == "Conv1D"
    assert isinstance(model.transformer.h[1].mlp.c_proj, tq.KroneckerLinear)
    assert model.lm_head.weight is model.transformer.wte.weight  # the tied head followed its embedding
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match=r"tqcompressor\.save"):  # still compressed: still guarded
        model.save_pretrained(tmp_path / "hf")
    tq.save(model, tmp_path / "run")
    torch.testing.assert_close(tq.load(tmp_path / "run")(ids).logits, before, rtol=1e-4, atol=1e-4)


def test_inspect_plot_and_distill_curve_are_valid_images(tmp_path, capsys):
    from PIL import Image
    from test_distillation import compressed_pair, config, pattern_blocks

    from tqcompressor.training import Trainer

    teacher, student = compressed_pair()
    tq.save(student, tmp_path / "run")
    assert main(["inspect", str(tmp_path / "run"), "--plot"]) == 0
    assert "plot:" in capsys.readouterr().out
    Trainer(student, teacher, pattern_blocks(), config(), tmp_path / "distil", progress=False).run()
    for picture in (tmp_path / "run" / "layers.png", tmp_path / "distil" / "curve.png"):
        with Image.open(picture) as image:
            image.verify()
            assert image.format == "PNG" and image.size[0] > 300


def test_a_bf16_checkpoint_is_fitted_in_float32_and_written_and_exported_in_bf16(tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from tqcompressor.loading import load_model

    torch.manual_seed(0)
    sizes = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    LlamaForCausalLM(LlamaConfig(vocab_size=120, num_key_value_heads=2, **sizes)).to(torch.bfloat16).save_pretrained(
        tmp_path / "bf16"
    )
    gpt2_tokenizer().save_pretrained(tmp_path / "bf16")
    model, _ = load_model(str(tmp_path / "bf16"))
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # fits, statistics and eval in float32
    (tmp_path / "plan.yaml").write_text(
        "rules:\n  - {pattern: 'model\\.layers\\.\\d+\\.mlp\\.(gate|up|down)_proj', method: lowrank, ratio: 0.5}\n"
    )
    tq.compress_(model, tq.CompressionPlan.load(tmp_path / "plan.yaml"), progress=False)
    ids = torch.tensor([[5, 17, 99, 3, 42, 7]])
    with torch.no_grad():
        expected = model(ids).logits

    def stored(folder) -> set[str]:
        with safe_open(str(folder / "model.safetensors"), "pt") as weights:
            return {weights.get_slice(name).get_dtype() for name in weights.keys()}  # noqa: SIM118 (not iterable)

    run = ["compress", "--model", str(tmp_path / "bf16"), "--plan", str(tmp_path / "plan.yaml")]
    assert main([*run, "--out", str(tmp_path / "run"), "--quiet"]) == 0
    assert stored(tmp_path / "run") == {"BF16"}  # as compact as the original's storage
    assert json.loads((tmp_path / "run" / "config.json").read_text())["dtype"] == "bfloat16"
    loaded = tq.load(tmp_path / "run")
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    with torch.no_grad():
        logits = loaded(ids).logits
    # The same fit, its factors rounded to bf16 on the way out.
    assert (logits - expected).norm() < 0.02 * expected.norm()
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "hf")]) == 0
    assert stored(tmp_path / "hf") == {"BF16"}
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        assert (dense(ids).logits - logits).norm() < 0.02 * logits.norm()  # the factors' product, rounded


def test_export_writes_the_dtype_asked_for_and_refuses_others(tmp_path, capsys):
    """A distilled run is stored in float32, as trained; shipping it in bf16 is export --dtype."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from tqcompressor.export import export

    torch.manual_seed(0)
    sizes = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=120, num_key_value_heads=2, **sizes)).eval()
    plan = tq.CompressionPlan([tq.Rule(r"model\.layers\.\d+\.mlp\.(gate|up|down)_proj", tq.LowRankConfig(ratio=0.5))])
    tq.compress_(model, plan, progress=False)
    tq.save(model, tmp_path / "run")
    ids = torch.tensor([[5, 17, 99, 3, 42, 7]])
    with torch.no_grad():
        expected = model(ids).logits
    for dtype, stored, tolerance in [("bfloat16", "BF16", 0.02), ("float16", "F16", 0.005), ("float32", "F32", 1e-5)]:
        out = tmp_path / dtype
        assert main(["export", str(tmp_path / "run"), str(out), "--dtype", dtype]) == 0
        with safe_open(str(out / "model.safetensors"), "pt") as weights:
            assert {weights.get_slice(name).get_dtype() for name in weights.keys()} == {stored}  # noqa: SIM118
        assert json.loads((out / "config.json").read_text())["dtype"] == dtype
        dense = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        with torch.no_grad():
            assert (dense(ids).logits - expected).norm() < tolerance * expected.norm()
    with pytest.raises(SystemExit):
        main(["export", str(tmp_path / "run"), str(tmp_path / "int8"), "--dtype", "int8"])
    assert "invalid choice: 'int8'" in capsys.readouterr().err and not (tmp_path / "int8").exists()
    with pytest.raises(ValueError, match=r"torch\.int8 is not a floating dtype"):
        export(tmp_path / "run", tmp_path / "int8", dtype=torch.int8)
    assert not (tmp_path / "int8").exists()
