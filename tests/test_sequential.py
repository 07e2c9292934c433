"""Sequential calibration: every part fitted on what the model compressed so far feeds it, aimed at what
the original model computed there; checked against the definition computed on whole-model passes."""

import copy
import re
from dataclasses import replace

import pytest
import torch
from test_architectures import gemma3_config, llama_config
from test_calibration import blocks, tiny_gpt2
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

import tqcompressor as tq
from tqcompressor.calibration import collect
from tqcompressor.linalg import aimed_weight
from tqcompressor.methods.targets import dense_weight
from tqcompressor.sequential import DAMPING, compress_sequentially

CONFIG = tq.LowRankConfig(rank=3)


def test_the_aimed_weight_is_the_least_squares_match_of_the_original_outputs():
    g = torch.Generator().manual_seed(0)
    wanted = torch.randn(400, 12, generator=g, dtype=torch.float64)  # what the original layer received
    noisy = wanted + 0.3 * torch.randn(400, 12, generator=g, dtype=torch.float64)  # what it receives now
    w = torch.randn(12, 7, generator=g, dtype=torch.float64)
    best = torch.linalg.lstsq(noisy, wanted @ w).solution
    torch.testing.assert_close(aimed_weight(w, noisy.T @ noisy, noisy.T @ wanted, 0.0), best, rtol=1e-9, atol=1e-9)
    # Planted: inputs distorted by an invertible map are undone exactly; W itself misses by far.
    distorted = wanted @ (torch.eye(12, dtype=torch.float64) + 0.3 * torch.randn(12, 12, generator=g))
    aimed = aimed_weight(w, distorted.T @ distorted, distorted.T @ wanted, 0.0)
    assert (distorted @ aimed - wanted @ w).norm() < 1e-9 * (wanted @ w).norm()
    assert (distorted @ w - wanted @ w).norm() > 0.1 * (wanted @ w).norm()
    c = noisy.T @ noisy  # the same inputs: nothing to correct, at any damping
    torch.testing.assert_close(aimed_weight(w, c, c, DAMPING), w, rtol=0, atol=1e-12)


def _inputs(model: nn.Module, name: str, ids: torch.Tensor) -> torch.Tensor:
    seen = []
    handle = model.get_submodule(name).register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    try:
        with torch.no_grad():
            for batch in ids.split(4):
                model(batch)
    finally:
        handle.remove()
    return torch.cat([x.reshape(-1, x.shape[-1]) for x in seen]).double()


def by_hand(model: nn.Module, parts: list[tuple[list[str], str]], ids: torch.Tensor, anchor: float = 0.0) -> nn.Module:
    """The definition on whole-model passes: for each part in order, its input second moment on the model
    compressed so far and the cross moment with the untouched original's inputs (each plus ``anchor``
    times the original inputs' second moment); the weights aimed, then fitted to the statistics
    ``collect`` gives (with the anchor, to the mixed second moment). A part's mode: "aimed" (aimed, then
    fitted), "fitted" (fitted as it is) or "kept" (aimed, and left dense)."""
    original = copy.deepcopy(model).eval()
    model.eval()
    for names, mode in parts:
        mixed = None
        if mode in ("aimed", "kept"):
            given, wanted = _inputs(model, names[0], ids), _inputs(original, names[0], ids)
            mixed = given.T @ given + anchor * wanted.T @ wanted
            cross = given.T @ wanted + anchor * wanted.T @ wanted
            for name in names:
                weight = dense_weight(model.get_submodule(name))[0]
                with torch.no_grad():
                    weight.copy_(aimed_weight(weight, mixed, cross, DAMPING).to(weight.dtype))
        if mode != "kept":
            plan = tq.CompressionPlan([tq.Rule(re.escape(name), CONFIG) for name in names])
            stats = collect(model, names, ids, progress=False)
            if anchor and mixed is not None:
                stats.inputs = {key: replace(s, second_moment=mixed) for key, s in stats.inputs.items()}
            tq.compress_(model, plan, calibration=stats, progress=False)
    return model


def assert_same_weights(a: nn.Module, b: nn.Module):
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5, msg=name)


GPT2_MODULES = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def gpt2_parts(modes: dict[int, str | tuple[str | None, ...]]) -> list[tuple[list[str], str]]:
    """Per block, one mode for its four layers or a mode each (None: left as it is)."""
    parts = []
    for i, mode in modes.items():
        for module, each in zip(GPT2_MODULES, (mode,) * 4 if isinstance(mode, str) else mode, strict=True):
            if each is not None:
                parts.append(([f"transformer.h.{i}.{module}"], each))
    return parts


def llama_parts(layers: list[int]) -> list[tuple[list[str], str]]:
    groups = (["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"])
    groups += (["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"])
    return [([f"model.layers.{i}.{m}" for m in group], "aimed") for i in layers for group in groups]


def gpt2_3_layers():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=3, n_head=2, vocab_size=120, n_positions=64))


def gemma3_3_layers():
    """Blocks whose other arguments differ: a sliding-window layer takes its own mask and rotary tables."""
    from transformers import Gemma3ForCausalLM

    torch.manual_seed(0)
    layers = ["sliding_attention", "full_attention", "sliding_attention"]
    return Gemma3ForCausalLM(gemma3_config(num_hidden_layers=3, sliding_window=8, layer_types=layers))


@pytest.mark.parametrize("architecture", ["gpt2", "llama", "gemma3"])
def test_each_part_is_fitted_on_the_compressed_inputs_and_aimed_at_the_original_outputs(architecture):
    """GPT-2's block 1 and block 2's attention stay dense (both streams must still pass through them, and
    they are aimed too); LLaMA's blocks take rotary tables and a mask as keywords, and q/k/v and gate/up
    share their inputs; Gemma 3's take other masks and tables in its sliding-window layers than in its
    global one."""
    ids = blocks(count=16)
    if architecture == "gpt2":
        build = gpt2_3_layers
        pattern = r"transformer\.h\.(0\.(mlp|attn)|2\.mlp)\.c_\w+"
        parts, groups = gpt2_parts({0: "aimed", 1: "kept", 2: ("kept", "kept", "aimed", "aimed")}), 2
    else:

        def llama():
            torch.manual_seed(0)
            return LlamaForCausalLM(llama_config(num_hidden_layers=3))

        build = llama if architecture == "llama" else gemma3_3_layers
        pattern, parts, groups = r"model\.layers\.\d+\.(mlp|self_attn)\.\w+_proj", llama_parts([0, 1, 2]), 3
    model = build()
    report = compress_sequentially(model, tq.CompressionPlan([tq.Rule(pattern, CONFIG)]), ids, progress=False)
    assert f"{groups} blocks: {groups} on kept inputs" in report.notes[0]
    fitted = [(names, mode) for names, mode in parts if mode != "kept"]
    assert [layer.name for layer in report.layers] == [name for names, _ in fitted for name in names]
    assert report.params_after == tq.count_parameters(model)
    assert_same_weights(model, by_hand(build(), parts, ids))
    with pytest.raises(AssertionError):  # aiming changes the fit
        assert_same_weights(model, by_hand(build(), [(names, "fitted") for names, _ in fitted], ids))


def test_an_anchor_mixes_the_original_inputs_into_each_part_and_in_the_limit_fits_at_once():
    ids = blocks(count=16)
    plan = tq.CompressionPlan([tq.Rule(r"transformer\.h\.(0\.(mlp|attn)|2\.mlp)\.c_\w+", CONFIG)])
    parts = gpt2_parts({0: "aimed", 1: "kept", 2: ("kept", "kept", "aimed", "aimed")})
    anchored = gpt2_3_layers()
    compress_sequentially(anchored, plan, ids, progress=False, anchor=1.0)
    assert_same_weights(anchored, by_hand(gpt2_3_layers(), parts, ids, anchor=1.0))
    with pytest.raises(AssertionError):
        assert_same_weights(anchored, by_hand(gpt2_3_layers(), parts, ids))
    # Held to the original inputs alone, each part is fitted as at once and nothing is aimed.
    held = gpt2_3_layers()
    compress_sequentially(held, plan, ids, progress=False, anchor=1e9)
    at_once = gpt2_3_layers()
    tq.compress_(at_once, plan, calibration=tq.calibrate(at_once, plan, ids, progress=False), progress=False)
    assert_same_weights(held, at_once)


def test_layers_the_plan_keeps_dense_are_aimed_too_even_after_the_last_compressed_one_unless_asked_not_to():
    ids = blocks(count=16)
    plan = tq.CompressionPlan([tq.Rule(r"transformer\.h\.0\.mlp\.c_fc", CONFIG)])
    model = gpt2_3_layers()
    note = compress_sequentially(model, plan, ids, progress=False).notes[0]
    assert "as were 9 layers the plan keeps dense" in note
    parts = gpt2_parts({0: (None, None, "aimed", "kept"), 1: "kept", 2: "kept"})  # none before c_fc
    assert_same_weights(model, by_hand(gpt2_3_layers(), parts, ids))

    model = gpt2_3_layers()
    note = compress_sequentially(model, plan, ids, progress=False, aim_dense=False).notes[0]
    assert "keeps dense" not in note
    assert_same_weights(model, by_hand(gpt2_3_layers(), parts[:1], ids))
    untouched = gpt2_3_layers().state_dict()
    for name, value in model.state_dict().items():
        if "h.0.mlp.c_fc" not in name:
            assert torch.equal(value, untouched[name]), name  # not computed, only kept: exactly equal


@pytest.mark.parametrize("aim_dense", [False, True])
def test_parts_before_the_stack_are_fitted_as_they_are_and_the_blocks_aim_at_the_untouched_model(aim_dense):
    """The embedding is compressed first, so the stack's inputs are taken again, but what the blocks aim
    at is still the original model's (the attention layers too, when asked: their inputs changed)."""
    ids = blocks(count=16)
    plan = tq.CompressionPlan(
        [tq.Rule(r"transformer\.wte", CONFIG), tq.Rule(r"transformer\.h\.\d+\.mlp\.c_\w+", CONFIG)]
    )
    model = tiny_gpt2()
    note = compress_sequentially(model, plan, ids, progress=False, aim_dense=aim_dense).notes[0]
    assert "3 blocks: 2 on kept inputs, aimed at the original model's outputs" in note
    assert ("as were 4 layers the plan keeps dense; 1 on whole-model passes" in note) == aim_dense
    attention = "kept" if aim_dense else None
    parts = [(["transformer.wte"], "fitted")]
    parts += gpt2_parts({i: (attention, attention, "aimed", "aimed") for i in (0, 1)})
    assert_same_weights(model, by_hand(tiny_gpt2(), parts, ids))


def test_a_lossless_plan_keeps_the_model():
    ids = blocks(count=16)
    exact = tq.CompressionPlan([tq.Rule(r"transformer\.h\.\d+\.mlp\.c_fc", tq.LowRankConfig(rank=32))])
    model = tiny_gpt2()
    compress_sequentially(model, exact, ids, progress=False)
    torch.testing.assert_close(model(ids).logits, tiny_gpt2()(ids).logits, rtol=1e-4, atol=1e-5)


class _ParallelBlocks(nn.Module):
    """Blocks that all read the embedding, not each other: running them as a chain would be wrong."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(120, 24)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(24, 48), nn.GELU(), nn.Linear(48, 24)) for _ in range(2))
        self.head = nn.Linear(24, 120)

    def forward(self, ids):
        hidden = self.embed(ids)
        return self.head(sum(block(hidden) for block in self.blocks))


def test_blocks_that_do_not_form_a_chain_are_calibrated_on_whole_model_passes():
    ids = blocks(count=16)
    plan = tq.CompressionPlan([tq.Rule(r"blocks\.\d+\.[02]", CONFIG)])
    model = _ParallelBlocks()
    assert "2 blocks: 0 on kept inputs" in compress_sequentially(model, plan, ids, progress=False).notes[0]
    # Each block's modules together, on the model with the blocks before it compressed; not aimed.
    parts = [([f"blocks.{i}.0", f"blocks.{i}.2"], "fitted") for i in (0, 1)]
    assert_same_weights(model, by_hand(_ParallelBlocks(), parts, ids))


class _HandOnBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.mix, self.bias_source = nn.Linear(24, 24), nn.Linear(24, 24)

    def forward(self, hidden, bias=None):
        bias = self.bias_source(hidden) if bias is None else bias
        return hidden + torch.tanh(self.mix(hidden)) + bias, bias


class _HandOnBlocks(nn.Module):
    """Blocks that hand a bias on, computed by the first block (T5 hands on its position bias so: a replay
    of the original model's arguments would give the later blocks the uncompressed one) or, with
    ``bias_first``, before the stack (each block then hands back what it was given)."""

    def __init__(self, bias_first: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(120, 24)
        self.blocks = nn.ModuleList(_HandOnBlock() for _ in range(2))
        self.head = nn.Linear(24, 120)
        self.bias_first = bias_first

    def forward(self, ids):
        hidden = self.embed(ids)
        bias = torch.tanh(hidden.flip(-1)) if self.bias_first else None
        for block in self.blocks:
            hidden, bias = block(hidden, bias=bias)
        return self.head(hidden)


@pytest.mark.parametrize("bias_first", [False, True])
def test_blocks_keep_their_inputs_unless_handed_what_an_earlier_block_computed(bias_first):
    ids = blocks(count=16)
    if bias_first:  # each block hands back the bias made before the stack: the chain holds
        plan, kept = tq.CompressionPlan([tq.Rule(r"blocks\.\d+\.mix", CONFIG)]), 2
        parts = [(["blocks.0.mix"], "aimed"), (["blocks.1.mix"], "aimed")]
    else:  # the first block makes it: the whole-model way, each block's modules together, not aimed
        plan, kept = tq.CompressionPlan([tq.Rule(r"blocks\.(\d+\.mix|0\.bias_source)", CONFIG)]), 0
        parts = [(["blocks.0.bias_source", "blocks.0.mix"], "fitted"), (["blocks.1.mix"], "fitted")]
    model = _HandOnBlocks(bias_first)
    note = compress_sequentially(model, plan, ids, progress=False, aim_dense=False).notes[0]
    assert f"2 blocks: {kept} on kept inputs" in note
    assert_same_weights(model, by_hand(_HandOnBlocks(bias_first), parts, ids))


def test_the_passes_for_a_part_stop_at_it_and_the_original_block_runs_once_per_batch():
    """With q/k/v compressed and the rest aimed, a batch reaches o_proj in every pass of a block (the
    original one, one per part from the second on, the move to the next block) but down_proj, the
    block's last layer, only in the original pass, its own part's and the move on."""
    ids = blocks(count=16)
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(num_hidden_layers=2))
    calls = {"o_proj": 0, "down_proj": 0}

    def count(module, args, name):
        calls[name] += 1

    block = model.model.layers[1]
    block.self_attn.o_proj.register_forward_pre_hook(lambda m, a: count(m, a, "o_proj"))
    block.mlp.down_proj.register_forward_pre_hook(lambda m, a: count(m, a, "down_proj"))
    plan = tq.CompressionPlan([tq.Rule(r"model\.layers\.\d+\.self_attn\.[qkv]_proj", CONFIG)])
    compress_sequentially(model, plan, ids, batch_size=4, progress=False)
    batches = 4
    before = 1 + batches  # finding the forward order on one sequence, capturing the stack's inputs
    finding_parts = 1  # on one batch
    assert calls["o_proj"] == before + finding_parts + 5 * batches
    assert calls["down_proj"] == before + finding_parts + 3 * batches
