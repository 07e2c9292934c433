import json
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from tqcompressor import KroneckerConfig, LowRankConfig
from tqcompressor.cli import main
from tqcompressor.evaluation import lambada, perplexity, size_report
from tqcompressor.params import count_parameters
from tqcompressor.plan import CompressionPlan, Rule
from tqcompressor.presets import preset
from tqcompressor.serialization import load, materialize, save
from tqcompressor.surgery import compress_, planned_parameters

TINY = dict(n_embd=32, n_layer=2, n_head=2, vocab_size=300, n_positions=64, bos_token_id=0, eos_token_id=0)


def tiny_model(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(**TINY)).eval()


def quick(name: str, config, **kwargs):
    search = {"iterations": 1, "time_budget": 1.0} if name == "tqcompressedgpt2" else {}  # kngpt2 has no search
    return preset(name, config, **search, **kwargs)


def test_gpt2_small_preset_arithmetic_without_weights():
    with torch.device("meta"):
        model = GPT2LMHeadModel(GPT2Config())
    assert count_parameters(model) == 124_439_808
    tied = planned_parameters(model, preset("tqcompressedgpt2", model.config))
    dense_head = planned_parameters(model, preset("tqcompressedgpt2", model.config, tie_head=False))
    assert round(tied / 1e6, 1) == 81.3
    assert round(dense_head / 1e6, 1) == 119.9
    assert dense_head - tied == 50257 * 768
    assert planned_parameters(model, preset("kngpt2", model.config)) == tied


def test_planned_parameters_match_a_real_compression():
    model = tiny_model()
    plan = quick("tqcompressedgpt2", model.config)
    expected = planned_parameters(model, plan)
    report = compress_(model, plan, progress=False)
    assert report.params_after == expected == count_parameters(model)
    assert report.head.startswith("tied to the compressed")
    assert [r.name for r in report.layers].count("transformer.wte") == 2
    assert model.transformer.wte.base.shape == (300, 8)


@pytest.mark.parametrize("tie_head", [True, False])
def test_compress_save_load_round_trip_gives_identical_logits(tmp_path, tie_head):
    model = tiny_model()
    compress_(model, quick("tqcompressedgpt2", model.config, tie_head=tie_head), progress=False)
    ids = torch.randint(0, 300, (2, 12))
    before = model(ids).logits
    save(model, tmp_path / "m")
    loaded = load(tmp_path / "m")
    assert same_layouts(loaded, model)
    torch.testing.assert_close(loaded(ids).logits, before, rtol=0, atol=0)
    assert count_parameters(loaded) == count_parameters(model)
    generated = loaded.generate(ids[:, :3], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert generated.shape == (2, 7)
    materialize(loaded)
    assert not any("Kronecker" in type(m).__name__ for m in loaded.modules())
    torch.testing.assert_close(loaded(ids).logits, before, rtol=1e-4, atol=1e-4)


def test_svd_plan_and_plan_files(tmp_path):
    plan = CompressionPlan(
        [
            Rule(r"transformer\.wte", LowRankConfig(rank=4)),
            Rule(r"transformer\.h\.\d+\.mlp\.c_fc", LowRankConfig(ratio=0.5)),
        ],
        name="svd",
    )
    for suffix in (".yaml", ".json"):
        plan.save(tmp_path / f"plan{suffix}")
        assert CompressionPlan.load(tmp_path / f"plan{suffix}").to_dict() == plan.to_dict()
    model = tiny_model()
    ids = torch.randint(0, 300, (1, 10))
    report = compress_(model, plan, progress=False)
    assert report.params_after == count_parameters(model) < report.params_before
    save(model, tmp_path / "svd")
    loaded = load(tmp_path / "svd")
    # Bit-exact logits are a fair test only when both models run the same kernels: same memory layouts.
    assert same_layouts(loaded, model)
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def same_layouts(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    strides = [{name: t.stride() for name, t in m.state_dict(keep_vars=True).items()} for m in (a, b)]
    return strides[0] == strides[1]


def test_compressed_parameters_are_row_major_as_a_reload_gives_them():
    # SVD factors come out of LAPACK column-major; kept that way, a reloaded (row-major) model takes
    # other GEMM kernels and its logits differ in the last bits on some CPUs.
    model = tiny_model()
    plan = CompressionPlan(
        [
            Rule(r"transformer\.wte", LowRankConfig(rank=4)),
            Rule(r"transformer\.h\.1\.mlp\.c_fc", KroneckerConfig(shape=(16, 32, 2, 4))),
        ]
    )
    compress_(model, plan, progress=False)
    assert all(t.is_contiguous() for t in model.state_dict().values())


def test_bad_plans_fail_before_touching_the_model():
    model = tiny_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def fails(match: str, *rules: Rule) -> None:
        with pytest.raises(ValueError, match=match):
            compress_(model, CompressionPlan(list(rules)), progress=False)

    kron = KroneckerConfig
    fails(
        r"match no module of this GPT2LMHeadModel: 'transformer\\.nothing', 'lm_heads'",
        Rule(r"transformer\.nothing", kron(ratio=0.5)),
        Rule(r"transformer\.wte", kron(embedding_factor=2)),
        Rule("lm_heads", kron(ratio=0.5)),
    )
    fails(r"c_fc: .*32x128", Rule(r"transformer\.h\.0\.mlp\.c_fc", kron(shape=(5, 5, 2, 2))))
    fails(r"ln_f: a LayerNorm cannot be compressed", Rule(r"transformer\.ln_f", kron(ratio=0.5)))
    fails("not divisible", Rule(r"transformer\.wte", kron(embedding_factor=3)))
    fails(
        r"rule 'transformer\\.wte' on transformer\.wte: an embedding needs field 'embedding_factor'",
        Rule(r"transformer\.wte", kron(ratio=0.5)),
    )
    fails("'embedding_factor' applies to embeddings", Rule(r"transformer\.h\.0\.mlp\.c_fc", kron(embedding_factor=2)))
    # The second rule fails on the width the first leaves (32 -> 16 -> 8 -> 8/3): nothing runs.
    fails(
        "width 8 is not divisible by embedding_factor 3",
        *[Rule(r"transformer\.wte", kron(embedding_factor=k)) for k in (2, 2, 3)],
    )
    fails(
        "cannot be compressed by method 'lowrank'",
        Rule(r"transformer\.wte", kron(embedding_factor=2)),
        Rule(r"transformer\.wte", LowRankConfig(rank=2)),
    )
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert not hasattr(model, "tqcompressor_history")
    with pytest.raises(ValueError, match="model types gpt2, llama"):
        preset("tqcompressedgpt2", type("C", (), {"model_type": "bert"})())


def test_save_refuses_to_clobber_and_load_reports_damage(tmp_path):
    model = tiny_model()
    compress_(model, quick("kngpt2", model.config), progress=False)
    out = save(model, tmp_path / "m")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        save(model, tmp_path / "busy")
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"
    config = json.loads((out / "config.json").read_text())
    config["tqcompressor"]["format_version"] = 1  # before the Kronecker factor layout changed
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="format 1, this version reads format 2"):
        load(out)
    config["tqcompressor"]["format_version"] = 2
    (out / "config.json").write_text(json.dumps(config))
    load(out)
    weights = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(ValueError, match="cannot read"):
        load(out)
    (out / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="incomplete"):
        load(out)
    (out / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupted"):
        load(out)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no staging directories left behind"


def test_perplexity_matches_a_direct_computation():
    model = tiny_model()
    ids = torch.randint(0, 300, (150,))
    # Direct: score token t with the previous min(t, window) tokens as context, one call per token.
    window, nll = 64, 0.0
    for t in range(1, 150):
        context = ids[max(0, t - window + 1) : t + 1]
        logits = model(context.unsqueeze(0)).logits[0, -2]
        nll += float(F.cross_entropy(logits.detach().unsqueeze(0), ids[t : t + 1]))
    direct = math.exp(nll / 149)
    stride_one = perplexity(model, ids, max_length=window, stride=1)
    assert stride_one["tokens"] == 149
    assert stride_one["ppl"] == pytest.approx(direct, rel=1e-5)
    # A coarser stride gives each token less context, never a different token count.
    coarse = perplexity(model, ids, max_length=window, stride=window)
    assert coarse["tokens"] == 149 and coarse["stride"] == window - 1
    full = model(ids[:64].unsqueeze(0)).logits[0].detach()
    first_window = float(F.cross_entropy(full[:-1], ids[1:64], reduction="sum"))
    assert perplexity(model, ids[:64], max_length=window)["nll"] == pytest.approx(first_window / 63, rel=1e-6)
    with pytest.raises(ValueError, match="stride"):
        perplexity(model, ids, max_length=8, stride=9)


def test_lambada_scores_the_last_word_on_a_hand_made_example():
    class NextLetter(torch.nn.Module):
        """Gives the code after the current one probability 1/2 and every other code 1/598."""

        config = GPT2Config(n_positions=64)

        def __init__(self):
            super().__init__()
            self.dummy = torch.nn.Parameter(torch.zeros(1))

        def forward(self, ids):
            logits = torch.zeros(*ids.shape, 300)
            logits.scatter_(2, ((ids + 1) % 300).unsqueeze(-1), math.log(299))
            return type("Out", (), {"logits": logits})

    def tokenizer(text):  # one token per character; the word's leading space is dropped
        return {"input_ids": [ord(c) % 300 for c in text.strip()]}

    # "ab c": after "b" the model's top choice is "c" (right); "ab d": "d" is not its top choice.
    result = lambada(NextLetter(), tokenizer, ["ab c", "ab d"])
    assert result["examples"] == 2
    assert result["acc"] == 0.5
    assert result["ppl"] == pytest.approx(math.sqrt(2 * 598), rel=1e-4)


def test_size_report_splits_components_and_counts_the_tied_head_once():
    model = tiny_model()
    before = size_report(model)
    assert before["total"] == count_parameters(model)
    assert sum(before["by_component"].values()) == before["total"]
    assert before["by_component"]["head"] == 0 and "tied" in before["head"]
    compress_(model, quick("tqcompressedgpt2", model.config), progress=False)
    after = size_report(model)
    assert sum(after["by_component"].values()) == after["total"] == count_parameters(model)
    assert after["by_component"]["attention"] == before["by_component"]["attention"]
    assert after["by_component"]["mlp"] < before["by_component"]["mlp"]


def test_cli_compress_eval_inspect_and_errors(tmp_path, capsys):
    from transformers import GPT2TokenizerFast

    from tqcompressor.assets import assets_dir

    tokenizer_dir = assets_dir() / "gpt2-tokenizer"
    tokenizer = GPT2TokenizerFast(str(tokenizer_dir / "vocab.json"), str(tokenizer_dir / "merges.txt"))
    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(**{**TINY, "vocab_size": 50257, "bos_token_id": 50256, "eos_token_id": 50256}))
    base.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    out = tmp_path / "out"
    args = ["compress", "--model", str(tmp_path / "tiny"), "--preset", "tqcompressedgpt2", "--out", str(out)]
    assert main([*args, "--time-budget", "1", "--quiet"]) == 0
    assert "LM head: tied to the compressed transformer.wte" in capsys.readouterr().out
    assert (
        main(
            [
                "eval",
                str(out),
                "--dataset",
                str(text),
                "--max-tokens",
                "100",
                "--json",
                str(tmp_path / "r.json"),
                "--quiet",
            ]
        )
        == 0
    )
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["tokens"] == 100 and result["ppl"] > 1 and result["size"]["bytes_on_disk"] > 0
    assert main(["inspect", str(out)]) == 0
    assert "transformer.h.1.mlp.c_fc" in capsys.readouterr().out
    # User mistakes: one line on stderr, exit code 2, nothing written.
    assert main([*args, "--quiet"]) == 2  # out exists
    assert main(["eval", str(out), "--dataset", str(tmp_path / "missing.txt")]) == 2
    assert main(["inspect", str(tmp_path / "tiny")]) == 2
    assert (
        main(["compress", "--model", str(tmp_path / "nope"), "--preset", "kngpt2", "--out", str(tmp_path / "x")]) == 2
    )
    err = capsys.readouterr().err
    assert err.count("tqcompressor: error:") == 4 and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_model_loading_errors_are_one_clear_line(tmp_path, monkeypatch, capsys):
    import importlib.util

    (tmp_path / "empty").mkdir()
    (tmp_path / "weights.gguf").write_bytes(b"GGUF")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real_find_spec(name, *a)
    )
    out = str(tmp_path / "out")
    assert main(["compress", "--model", str(tmp_path / "empty"), "--preset", "kngpt2", "--out", out]) == 2
    assert main(["compress", "--model", str(tmp_path / "weights.gguf"), "--preset", "kngpt2", "--out", out]) == 2
    run = tmp_path / "distilled"  # where distill writes its models: one or two levels down
    for folder in (run / "01-step1" / "model", run / "model"):
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
    assert main(["eval", str(run), "--dataset", "wikitext2"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"tqcompressor: error: {tmp_path / 'empty'} is not a model directory (no config.json)",
        "tqcompressor: error: reading GGUF files needs the gguf package: pip install gguf",
        f"tqcompressor: error: {run} is not a model directory (no config.json); it holds {run / 'model'} and 1 more",
    ]
    assert not (tmp_path / "out").exists()
