"""Folding an MLP output projection's input permutation into the projections feeding it: the same
function, one gather fewer, and it survives save and load."""

import pytest
import torch
from test_architectures import llama_config
from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

import tqcompressor as tq

QUICK = {"iterations": 1, "time_budget": 1.0}


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_folding_a_permuted_gpt2_mlp_keeps_the_logits_and_drops_a_gather(tmp_path):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=120, n_positions=64)).eval()
    tq.compress_(model, tq.preset("tqcompressedgpt2", model.config, **QUICK), progress=False)
    ids = torch.randint(0, 120, (2, 16))
    before = logits(model, ids)
    consumer = model.transformer.h[1].mlp.c_proj
    assert consumer.permutes_input
    assert tq.fold_permutations(model) == ["transformer.h.1.mlp.c_proj"]
    assert not consumer.permutes_input and model.transformer.h[1].mlp.c_fc.permutes_output
    torch.testing.assert_close(logits(model, ids), before, rtol=1e-5, atol=1e-5)
    assert tq.fold_permutations(model) == []  # nothing left to fold
    tq.save(model, tmp_path / "folded")
    loaded = tq.load(tmp_path / "folded")
    assert not loaded.transformer.h[1].mlp.c_proj.permutes_input
    torch.testing.assert_close(logits(loaded, ids), before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("producers", ["dense", "lowrank", "kronecker"])
def test_folding_into_gate_and_up_projections_of_any_kind(producers):
    torch.manual_seed(1)
    model = LlamaForCausalLM(llama_config()).eval()
    rules = [tq.Rule(r"model\.layers\.\d+\.mlp\.down_proj", tq.KroneckerConfig(ratio=0.5, **QUICK))]
    if producers == "lowrank":
        rules.append(tq.Rule(r"model\.layers\.\d+\.mlp\.(gate|up)_proj", tq.LowRankConfig(rank=8)))
    elif producers == "kronecker":
        rules.append(tq.Rule(r"model\.layers\.\d+\.mlp\.(gate|up)_proj", tq.KroneckerConfig(ratio=0.5, **QUICK)))
    tq.compress_(model, tq.CompressionPlan(rules), progress=False)
    ids = torch.randint(0, 120, (2, 12))
    before = logits(model, ids)
    folded = tq.fold_permutations(model)
    assert folded == [f"model.layers.{i}.mlp.down_proj" for i in range(2)]
    torch.testing.assert_close(logits(model, ids), before, rtol=1e-5, atol=1e-5)
    materialized = tq.materialize(model)  # the dense export of a folded model is the same function
    torch.testing.assert_close(logits(materialized, ids), before, rtol=1e-4, atol=1e-4)


def test_folding_needs_a_model_family_it_knows():
    from transformers import BertConfig, BertModel

    model = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(ValueError, match="model types"):
        tq.fold_permutations(model)
