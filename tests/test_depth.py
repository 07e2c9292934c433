"""Depth reduction (the DistilGPT-2 baseline): the kept blocks compute what they computed in the teacher,
the KV cache still works after renumbering, and the result saves and loads."""

import copy

import pytest
import torch
from test_architectures import TINY, llama_config
from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

import tqcompressor as tq
from tqcompressor.cli import main


def gpt2(layers: int = 4) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=layers, n_head=2, vocab_size=120, n_positions=64)).eval()


def greedy(model, ids, use_cache: bool) -> torch.Tensor:
    return model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=use_cache, pad_token_id=0)


def test_even_blocks_of_gpt2_equal_a_shallower_model_with_the_teachers_weights(tmp_path):
    teacher = gpt2()
    student = gpt2()
    assert tq.keep_layers_(student) == [0, 2]
    assert student.config.n_layer == 2 and len(student.transformer.h) == 2
    reference = gpt2(layers=2)
    renamed = {}
    for key, value in teacher.state_dict().items():
        parts = key.split(".")
        if parts[:2] == ["transformer", "h"]:
            if int(parts[2]) % 2:
                continue
            parts[2] = str(int(parts[2]) // 2)
        renamed[".".join(parts)] = value
    reference.load_state_dict(renamed)
    ids = torch.randint(0, 120, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(student(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(greedy(student, ids, True), greedy(student, ids, False))
    tq.save(student, tmp_path / "half")
    with torch.no_grad():
        torch.testing.assert_close(tq.load(tmp_path / "half")(ids).logits, student(ids).logits)


def test_llama_blocks_are_renumbered_for_the_kv_cache():
    torch.manual_seed(1)
    model = LlamaForCausalLM(llama_config(num_hidden_layers=4)).eval()
    assert tq.keep_layers_(model, [1, 3]) == [1, 3]
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]
    assert model.config.num_hidden_layers == 2
    ids = torch.randint(0, 120, (1, 8))
    assert torch.equal(greedy(model, ids, True), greedy(model, ids, False))


def test_bad_block_choices_fail_before_anything_changes():
    model = gpt2()
    for keep in ([4], [], "middle"):
        with pytest.raises(ValueError, match=r"block indices|keep must be"):
            tq.keep_layers_(model, keep)
    tq.compress_(model, tq.CompressionPlan([tq.Rule(r"transformer\.h\.1\.mlp\.c_fc", tq.LowRankConfig(rank=4))]))
    with pytest.raises(ValueError, match="keep the blocks of the dense model, then compress it"):
        tq.keep_layers_(model, "odd")
    assert len(model.transformer.h) == 4


def test_cli_keeps_layers_alone_or_before_a_preset(tmp_path, capsys):
    gpt2().save_pretrained(tmp_path / "teacher")
    common = ["compress", "--model", str(tmp_path / "teacher")]
    assert main([*common, "--keep-layers", "even", "--out", str(tmp_path / "half")]) == 0
    assert tq.load(tmp_path / "half").config.n_layer == 2
    assert main([*common, "--keep-layers", "odd", "--preset", "kngpt2", "--out", str(tmp_path / "both")]) == 0
    both = tq.load(tmp_path / "both")
    assert both.config.n_layer == 2 and isinstance(both.transformer.h[1].mlp.c_fc, tq.KroneckerLinear)
    capsys.readouterr()
    assert main([*common, "--keep-layers", "0,x", "--out", str(tmp_path / "bad")]) == 2
    assert main([*common, "--out", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert "comma-separated block indices" in err and "say what to do" in err
    assert not (tmp_path / "bad").exists() and not (tmp_path / "nothing").exists()


FOUR = {**TINY, "num_hidden_layers": 4, "num_key_value_heads": 2, "pad_token_id": 0}
ALTERNATING = ["sliding_attention", "full_attention"] * 2
FAMILIES = {
    "mamba": dict(state_size=8),  # no attention: the mixers hold the layer index
    "gemma3_text": dict(head_dim=8, sliding_window=4, layer_types=ALTERNATING),
    "gpt_neox": {},
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, head_dim=8),
    "deepseek_v3": dict(
        n_routed_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        n_shared_experts=1,
        first_k_dense_replace=1,  # block 0 is dense, the others Mixtures of Experts
        q_lora_rank=16,
        kv_lora_rank=16,
        qk_rope_head_dim=4,  # with qk_nope_head_dim: the width of a head
        qk_nope_head_dim=4,
        v_head_dim=8,
        n_group=1,
        topk_group=1,
    ),
    "qwen3_next": dict(
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=16,
        head_dim=8,
        layer_types=["linear_attention", "full_attention"] * 2,
        linear_num_value_heads=4,
        linear_num_key_heads=2,
        linear_key_head_dim=8,
        linear_value_head_dim=8,
    ),
}
REFUSED = {
    ("deepseek_v3", "odd"): "builds other modules",  # blocks 1 and 3 renumbered 0 and 1: 0 would be dense
    ("qwen3_next", "even"): "does not run",  # linear attention alone: its forward needs a full-attention block
}


@pytest.mark.parametrize("family", FAMILIES)
def test_any_family_keeps_blocks_that_compute_what_a_shallower_model_built_from_its_config_computes(family, tmp_path):
    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **FOUR, **FAMILIES[family])).eval()
    ids = torch.randint(1, 120, (1, 8))
    for keep in ("even", "odd"):
        model = copy.deepcopy(teacher)
        if (family, keep) in REFUSED:
            settings = dict(vars(model.config))
            with pytest.raises(ValueError, match=REFUSED[family, keep]):
                tq.keep_layers_(model, keep)
            assert vars(model.config) == settings
            with torch.no_grad():
                torch.testing.assert_close(model(ids).logits, teacher(ids).logits, rtol=0, atol=0)
            continue
        tq.keep_layers_(model, keep)
        # Built anew from the kept config (as loading does), with the kept weights: the same model.
        rebuilt = type(model)(copy.deepcopy(model.config)).eval()
        rebuilt.load_state_dict(model.state_dict())
        with torch.no_grad():
            torch.testing.assert_close(rebuilt(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
        assert torch.equal(greedy(model, ids, True), greedy(model, ids, False))
        tq.save(model, tmp_path / keep)
        with torch.no_grad():
            torch.testing.assert_close(tq.load(tmp_path / keep)(ids).logits, model(ids).logits)


def test_a_model_whose_blocks_cannot_be_told_apart_is_refused():
    from transformers import T5Config, T5ForConditionalGeneration

    model = T5ForConditionalGeneration(T5Config(vocab_size=120, d_model=32, d_ff=64, num_layers=2, num_heads=2))
    with pytest.raises(ValueError, match=r"cannot tell .* 2 lists of 2 modules \(encoder.block, decoder.block\)"):
        tq.keep_layers_(model)
    assert len(model.encoder.block) == 2
