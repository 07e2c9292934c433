"""Calibration: statistics of real inputs, and fits that minimise the error on them."""

import itertools

import pytest
import torch
from conftest import gpt2_tokenizer, tiny_gpt2_dir
from test_architectures import llama_config
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

import tqcompressor as tq
from tqcompressor.calibration import CalibrationStats, collect
from tqcompressor.linalg import calibrated_error, weighted_error
from tqcompressor.methods.kronecker import KroneckerShape, nearest_kronecker
from tqcompressor.methods.kronecker.calibrated import _a_step, _b_step, _objective, calibrated_factors, objective
from tqcompressor.methods.lowrank import truncated_svd
from tqcompressor.methods.lowrank.factors import scaled_svd, whitened_svd


def anisotropic_inputs(tokens: int, width: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(width, width, generator=g, dtype=torch.float64)
    return (torch.randn(tokens, width, generator=g, dtype=torch.float64) * torch.logspace(0, -3, width)) @ mixing


def test_whitened_svd_is_exact_when_the_inputs_span_fewer_directions_than_the_rank():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(500, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 40, generator=g, dtype=torch.float64)
    w = torch.randn(40, 30, generator=g, dtype=torch.float64)
    c = x.T @ x  # rank 6: singular, so the whitening needs its ridge
    fitted = whitened_svd(w, 6, c)
    assert calibrated_error(w, fitted.reconstruct(), c) < 1e-5
    assert calibrated_error(w, truncated_svd(w, 6).reconstruct(), c) > 0.3


def test_whitened_svd_with_isotropic_inputs_is_the_plain_truncated_svd():
    w = torch.randn(24, 18, dtype=torch.float64)
    torch.testing.assert_close(
        whitened_svd(w, 5, torch.eye(24, dtype=torch.float64) * 7).reconstruct(), truncated_svd(w, 5).reconstruct()
    )


def test_calibrated_kronecker_recovers_a_planted_sum_and_beats_the_frobenius_fit():
    shape = KroneckerShape(8, 6, 4, 5, 2)
    g = torch.Generator().manual_seed(2)
    a = torch.randn(2, 8, 6, generator=g, dtype=torch.float64)
    b = torch.randn(2, 4, 5, generator=g, dtype=torch.float64)
    planted = torch.einsum("rac,rbd->abcd", a, b).reshape(32, 30)
    x = anisotropic_inputs(2000, 32)
    c = x.T @ x
    exact, _ = calibrated_factors(planted, shape, c)
    assert calibrated_error(planted, exact.reconstruct(), c) < 1e-6

    w = torch.randn(32, 30, generator=g, dtype=torch.float64)
    fitted, history = calibrated_factors(w, shape, c, iterations=30)
    assert all(later <= earlier + 1e-12 for earlier, later in itertools.pairwise(history))
    calibrated = calibrated_error(w, fitted.reconstruct(), c)
    assert calibrated == pytest.approx(history[-1])
    assert calibrated < 0.9 * calibrated_error(w, nearest_kronecker(w, shape).reconstruct(), c)


def direct_a_step(
    x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, n1: int, right: torch.Tensor | None = None
) -> torch.Tensor:
    """argmin over A of ‖X (W − Σ Aᵢ ⊗ Bᵢ) T‖ (T = ``right``, default I) written as one dense
    least-squares system over vec(A) and solved directly: what the alternating A-step must match."""
    r, m2, n2 = b.shape
    m1 = x.shape[1] // m2
    t = torch.eye(n1 * n2, dtype=torch.float64) if right is None else right
    design = torch.stack(
        [
            (x @ torch.einsum("rac,rbd->abcd", basis.reshape(r, m1, n1), b).reshape(m1 * m2, n1 * n2) @ t).reshape(-1)
            for basis in torch.eye(r * m1 * n1, dtype=torch.float64)
        ],
        dim=1,
    )
    return torch.linalg.lstsq(design, (x @ w @ t).reshape(-1)).solution.reshape(r, m1, n1)


def alternating_step_problem():
    """What the alternating-step tests start from: a 6 x 6 weight W split (3, 2) x (2, 3) at rank 2,
    anisotropic inputs X with C = XᵀX, random factors A, B, and C, CW reshaped as the steps take them."""
    m1, n1, m2, n2, r = 3, 2, 2, 3, 2
    g = torch.Generator().manual_seed(3)
    w = torch.randn(m1 * m2, n1 * n2, generator=g, dtype=torch.float64)
    x = anisotropic_inputs(400, m1 * m2, seed=4)
    c = x.T @ x
    a = torch.randn(r, m1, n1, generator=g, dtype=torch.float64)
    b = torch.randn(r, m2, n2, generator=g, dtype=torch.float64)
    return w, x, c, a, b, c.reshape(m1, m2, m1, m2), (c @ w).reshape(m1, m2, n1, n2)


def test_each_alternating_step_is_the_exact_least_squares_minimiser():
    w, x, c, a, b, c4, cw4 = alternating_step_problem()
    direct = direct_a_step(x, w, b, a.shape[2])
    # The objective the refinement compares steps by, from C and CW alone, is the residual's.
    assert _objective(float((w * (c @ w)).sum()), c4, cw4, a, b) == pytest.approx(objective(w, c, a, b))
    assert objective(w, c, _a_step(c4, cw4, b), b) == pytest.approx(objective(w, c, direct, b))
    new_b = _b_step(c4, cw4, a)
    for _ in range(3):  # no perturbation of the solved B lowers the objective
        assert objective(w, c, a, new_b) <= objective(w, c, a, new_b + 1e-3 * torch.randn_like(new_b))


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=120, n_positions=64)).eval()


def blocks(count: int = 12, length: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 120, (count, length), generator=torch.Generator().manual_seed(seed))


def test_statistics_are_the_second_moments_of_the_real_inputs_and_token_counts():
    model = tiny_gpt2()
    names = ["transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_proj", "transformer.wte"]
    seen = {}
    hooks = [
        model.get_submodule(n).register_forward_pre_hook(
            lambda m, args, n=n: seen.setdefault(n, []).append(args[0].detach().reshape(-1, args[0].shape[-1]))
        )
        for n in names[:2]
    ]
    ids = blocks()
    with torch.no_grad():
        model(ids)
    for hook in hooks:
        hook.remove()
    stats = collect(model, names, ids, batch_size=5, progress=False)
    for name in names[:2]:
        x = torch.cat(seen[name]).double()
        torch.testing.assert_close(stats.for_module(name).second_moment, x.T @ x)
        assert stats.for_module(name).tokens == ids.numel()
    torch.testing.assert_close(
        stats.for_module("transformer.wte").counts, torch.bincount(ids.reshape(-1), minlength=120).double()
    )
    # The head tied to wte reads the final hidden states.
    with torch.no_grad():
        final = model(ids, output_hidden_states=True).hidden_states[-1].reshape(-1, 32).double()
    torch.testing.assert_close(stats.for_module("transformer.wte").head_second_moment, final.T @ final)


def test_an_untied_head_is_no_part_of_its_embeddings_statistics():
    torch.manual_seed(0)
    config = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=120, n_positions=64, tie_word_embeddings=False)
    model = GPT2LMHeadModel(config).eval()
    assert model.lm_head.weight is not model.transformer.wte.weight
    assert (
        collect(model, ["transformer.wte"], blocks(), progress=False).tokens["transformer.wte"].head_second_moment
        is None
    )


def test_modules_fed_the_same_tensor_share_one_accumulator():
    torch.manual_seed(0)
    config = llama_config(vocab_size=64, hidden_size=16, intermediate_size=32)
    model = LlamaForCausalLM(config).eval()
    names = [
        f"model.layers.{i}.{p}"
        for i in (0, 1)
        for p in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        )
    ]
    stats = collect(model, names, torch.randint(0, 64, (4, 16)), progress=False)
    owners = stats.owner
    for i in (0, 1):
        assert owners[f"model.layers.{i}.self_attn.k_proj"] == owners[f"model.layers.{i}.self_attn.q_proj"]
        assert owners[f"model.layers.{i}.mlp.up_proj"] == owners[f"model.layers.{i}.mlp.gate_proj"]
        assert owners[f"model.layers.{i}.mlp.down_proj"] == f"model.layers.{i}.mlp.down_proj"
    assert owners["model.layers.0.mlp.gate_proj"] != owners["model.layers.1.mlp.gate_proj"]
    assert len(stats.inputs) == 6


def test_statistics_round_trip_and_refuse_another_model(tmp_path):
    model = tiny_gpt2()
    plan = tq.preset("tqcompressedgpt2", model.config, iterations=1, time_budget=1.0)
    stats = tq.calibrate(model, plan, blocks(), progress=False)
    path = stats.save(tmp_path / "stats.safetensors")
    loaded = CalibrationStats.load(path)
    assert loaded.owner == stats.owner
    for key, value in stats.inputs.items():
        assert torch.equal(loaded.inputs[key].second_moment, value.second_moment)
    head = stats.tokens["transformer.wte"].head_second_moment
    assert head is not None and torch.equal(loaded.tokens["transformer.wte"].head_second_moment, head)
    other = tiny_gpt2(seed=1)
    state = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match="other weights"):
        tq.compress_(other, plan, calibration=loaded, progress=False)
    assert all(torch.equal(state[k], v) for k, v in other.state_dict().items())
    wider = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=2, vocab_size=120, n_positions=64))
    with pytest.raises(ValueError, match="another model"):
        loaded.check(wider, ["transformer.h.1.mlp.c_fc"])
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(ValueError, match="cannot read"):
        CalibrationStats.load(tmp_path / "junk.safetensors")


def test_bad_calibration_input_fails_before_anything_changes():
    model = tiny_gpt2()
    with pytest.raises(ValueError, match="give at least 128"):
        collect(model, ["transformer.h.0.mlp.c_proj"], blocks(count=2, length=16), progress=False)
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or infinite"):
        collect(model, ["transformer.h.0.mlp.c_proj"], blocks(), progress=False)
    plan = tq.CompressionPlan(
        [tq.Rule(r"transformer\.h\.0\.mlp\.c_fc", tq.LowRankConfig(rank=4, whitening="diagonal"))]
    )
    with pytest.raises(ValueError, match="'whitening' needs calibration"):
        tq.compress_(tiny_gpt2(), plan, progress=False)


@pytest.mark.parametrize("build", [tiny_gpt2, lambda: LlamaForCausalLM(llama_config(tie_word_embeddings=True))])
def test_the_statistics_memory_is_known_before_collecting_and_too_much_is_refused(build, monkeypatch):
    from tqcompressor import calibration
    from tqcompressor.allocation import compressible_modules

    model = build().eval()
    names = compressible_modules(model)
    linear, embeddings = calibration.calibration_targets(model, names)
    ids = blocks(count=8, length=16)
    inputs, outputs = calibration.statistics_bytes(model, linear, embeddings, ids[:1, :8], fisher=True)
    stats = collect(model, names, ids, progress=False, fisher=True)
    held = [s.second_moment for s in stats.inputs.values()] + [t.counts for t in stats.tokens.values()]
    held += [t.head_second_moment for t in stats.tokens.values() if t.head_second_moment is not None]
    assert inputs == sum(t.nbytes for t in held)  # shared inputs counted once, as collected
    assert outputs == sum(g.nbytes for g in stats.outputs.values())
    monkeypatch.setattr(calibration, "free_memory", lambda device: 3 * (inputs + outputs) - 1)  # a third for them
    with pytest.raises(ValueError, match=r"would take 0\.0 GiB of input second moments and 0\.0 GiB of the Fisher"):
        collect(model, names, ids, progress=False, fisher=True, spill=False)
    assert collect(model, names, ids, progress=False, spill=False).inputs.keys() == stats.inputs.keys()  # fits so


def spilled_llama(monkeypatch, share: float = 0.5):
    """A tiny tied LLaMA, its statistics collected in memory, and again as if only ``share`` of them fitted."""
    from tqcompressor import calibration
    from tqcompressor.allocation import compressible_modules

    model = LlamaForCausalLM(llama_config(tie_word_embeddings=True)).eval()
    names = compressible_modules(model)
    ids = blocks(count=8, length=16)
    in_memory = collect(model, names, ids, progress=False, fisher=True)
    need = sum(calibration.statistics_bytes(model, *calibration.calibration_targets(model, names), ids[:1], True))
    with monkeypatch.context() as patch:
        patch.setattr(calibration, "free_memory", lambda device: int(need * share))
        patch.setattr(calibration, "fisher_pass_bytes", lambda *args: 0)  # the share alone decides here
        spilled = collect(model, names, ids, progress=False, fisher=True)
    return model, names, ids, in_memory, spilled


def test_statistics_larger_than_memory_are_collected_in_passes_and_kept_on_disk(monkeypatch):
    import gc
    from pathlib import Path

    from tqcompressor.calibration import OnDisk

    _, names, ids, in_memory, spilled = spilled_llama(monkeypatch)
    assert isinstance(spilled.inputs, OnDisk) and isinstance(spilled.outputs, OnDisk)
    folder = Path(spilled.inputs.folder.name)
    # A pass holds at most a third of what is free, a sixth of the whole: at least six passes.
    assert spilled.summary()["passes"] >= 6
    tensors = {*spilled.inputs.files.values(), *spilled.outputs.files.values()}
    assert set(folder.iterdir()) == tensors | {folder / "owner.lock"}  # one file per tensor, and the lock
    assert len(tensors) == len(spilled.inputs) + len(spilled.outputs)
    assert set(spilled.owner) == set(in_memory.owner) == set(names)
    for name in names:
        expected, found = in_memory.for_module(name), spilled.for_module(name)
        assert type(found) is type(expected)
        for field in ("second_moment", "output_second_moment", "counts", "head_second_moment"):
            if getattr(expected, field, None) is not None:
                torch.testing.assert_close(getattr(found, field), getattr(expected, field))
        assert getattr(found, "tokens", None) == getattr(expected, "tokens", None)
    assert spilled.summary()["tokens"] == in_memory.summary()["tokens"] == ids.numel()
    assert spilled.summary()["on_disk"] == str(folder)
    fitted = {names[1], names[-1]}
    assert set(spilled.fisher_of(fitted)) == fitted & set(in_memory.outputs)
    with pytest.raises(ValueError, match="kept on disk for this run only"):
        spilled.save(folder.parent / "stats.safetensors")
    assert not (folder.parent / "stats.safetensors").exists()
    moments = spilled.fisher_of(fitted)
    del spilled
    gc.collect()
    assert folder.exists()  # the Fisher moments taken out still read from it
    del moments
    gc.collect()
    assert not folder.exists()


def test_spilled_statistics_choose_and_fit_the_same_budget(monkeypatch):
    import copy

    from tqcompressor.allocation import allocation_plan
    from tqcompressor.sequential import compress_sequentially

    model, _, ids, in_memory, spilled = spilled_llama(monkeypatch)
    target = round(0.6 * tq.count_parameters(model))
    chosen = {}
    for kind, stats in (("memory", in_memory), ("disk", spilled)):
        chosen[kind] = allocation_plan(model, stats, target, sensitivity_blocks=ids[:2])
    assert chosen["disk"].plan.to_dict() == chosen["memory"].plan.to_dict()
    plan = chosen["memory"].plan
    fitted = {name for name, c in chosen["memory"].chosen.items() if c.config is not None}
    logits = {}
    for kind, stats in (("memory", in_memory), ("disk", spilled)):
        at_once, sequential = copy.deepcopy(model), copy.deepcopy(model)
        tq.compress_(at_once, plan, calibration=stats, progress=False)
        compress_sequentially(sequential, plan, ids, progress=False, output_moments=stats.fisher_of(fitted))
        with torch.no_grad():
            logits[kind] = [at_once(ids).logits, sequential(ids).logits]
    for found, expected in zip(logits["disk"], logits["memory"], strict=True):
        torch.testing.assert_close(found, expected, rtol=1e-4, atol=1e-5)


def test_statistics_no_pass_or_disk_can_hold_are_refused_before_any_pass(monkeypatch):
    from tqcompressor import calibration
    from tqcompressor.allocation import compressible_modules

    model = LlamaForCausalLM(llama_config(tie_word_embeddings=True)).eval()
    names = compressible_modules(model)
    ids = blocks(count=8, length=16)
    passes = []
    monkeypatch.setattr(model, "forward", lambda *a, **k: passes.append(1) or type(model).forward(model, *a, **k))
    widest = max(calibration._bytes_of(model.get_submodule(n), True, True) for n in names if "embed" not in n)
    working = 10 * widest  # what the Fisher's pass is taken to need beside the statistics
    monkeypatch.setattr(calibration, "fisher_pass_bytes", lambda *args: working)
    monkeypatch.setattr(calibration, "free_memory", lambda device: working + widest - 1)
    with pytest.raises(ValueError, match=r"alone take 0\.0 GiB \(float64\), more than the 0\.0 GiB one pass can hold"):
        collect(model, names, ids, progress=False, fisher=True)
    monkeypatch.setattr(calibration, "free_memory", lambda device: working)
    with pytest.raises(
        ValueError, match=r"the Fisher's pass, about 0\.0 GiB for a batch of 1\).*shorter sequences than 16"
    ):
        collect(model, names, ids, progress=False, fisher=True)
    monkeypatch.setattr(calibration, "free_memory", lambda device: working + widest)
    monkeypatch.setattr(calibration, "free_disk", lambda: 0)
    with pytest.raises(ValueError, match="point TMPDIR to a larger disk"):
        collect(model, names, ids, progress=False, fisher=True)
    assert len(passes) == 3  # one per call: the probe that tells which layers share an input


def test_the_fisher_pass_is_sized_by_the_activations_it_keeps_and_the_statistics_get_what_it_leaves(monkeypatch):
    from tqcompressor import calibration
    from tqcompressor.allocation import compressible_modules

    model = LlamaForCausalLM(llama_config(tie_word_embeddings=True)).eval()
    weights = sum(p.nbytes for p in model.parameters())
    ids = blocks(count=8, length=16)
    one = calibration.fisher_pass_bytes(model, ids[:1], 1)
    assert calibration.fisher_pass_bytes(model, ids[:1], 4) == 4 * one
    assert 0 < calibration.fisher_pass_bytes(model, ids[:1, :1], 1) < weights / 10  # activations, not weights
    assert calibration.fisher_pass_bytes(model, blocks(count=1, length=64), 1) > 3 * one  # grows with the tokens
    assert all(p.requires_grad for p in model.parameters())
    names = compressible_modules(model)
    need = sum(calibration.statistics_bytes(model, *calibration.calibration_targets(model, names), ids[:1], True))
    working = calibration.fisher_pass_bytes(model, ids[:1], 4)
    # A third of the memory free holds the statistics, but the Fisher's pass leaves less: several passes.
    monkeypatch.setattr(calibration, "free_memory", lambda device: 3 * need + working // 2 + 3 * need)
    monkeypatch.setattr(calibration, "fisher_pass_bytes", lambda *args: working // 2 + 5 * need + need // 2)
    stats = collect(model, names, ids, progress=False, fisher=True)
    assert stats.summary()["passes"] >= 2
    monkeypatch.setattr(calibration, "fisher_pass_bytes", lambda *args: working // 2)
    assert "passes" not in collect(model, names, ids, progress=False, fisher=True).summary()


def test_a_fisher_pass_too_large_for_the_memory_takes_fewer_sequences_at_a_time(monkeypatch, capsys):
    from tqcompressor import calibration
    from tqcompressor.allocation import compressible_modules

    model = LlamaForCausalLM(llama_config(tie_word_embeddings=True)).eval()
    names = compressible_modules(model)
    ids = blocks(count=8, length=16)
    at_four = collect(model, names, ids, batch_size=4, progress=False, fisher=True)
    at_two = collect(model, names, ids, batch_size=2, progress=False, fisher=True)
    sequence = calibration.fisher_pass_bytes(model, ids[:1], 1)
    batches = []
    fisher_moments = calibration.fisher_moments
    monkeypatch.setattr(calibration, "fisher_moments", lambda *args: batches.append(args[3]) or fisher_moments(*args))
    # Two sequences' pass leaves the statistics their third of the memory; four would not.
    monkeypatch.setattr(calibration, "free_memory", lambda device: 3 * sequence + 2)
    reduced = collect(model, names, ids, batch_size=4, progress=True, fisher=True)
    assert batches == [2] * reduced.summary().get("passes", 1)
    assert "4 sequences a batch would take about 0.0 GiB in the Fisher's pass" in capsys.readouterr().err
    linear = calibration.calibration_targets(model, names)[0]
    for expected in (at_two, at_four):  # the same draws of next tokens, summed in other batches
        for name in linear:
            found, wanted = reduced.for_module(name), expected.for_module(name)
            torch.testing.assert_close(found.second_moment, wanted.second_moment)
            torch.testing.assert_close(found.output_second_moment, wanted.output_second_moment)
    for free, batch in ((4 * sequence, 2), (6 * sequence + 3, 4), (3 * sequence - 3, 1)):
        batches.clear()
        monkeypatch.setattr(calibration, "free_memory", lambda device, free=free: free)
        collect(model, names, ids, batch_size=4, progress=False, fisher=True)
        assert set(batches) == {batch}


def test_statistics_folders_left_by_killed_runs_are_removed_and_living_ones_kept(tmp_path, monkeypatch, capsys):
    import os
    import signal
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    from tqcompressor import calibration
    from tqcompressor.allocation import compressible_modules

    def holder() -> tuple[subprocess.Popen, Path]:
        code = "from tqcompressor.calibration import SpillFolder; f = SpillFolder(); print(f.name, flush=True); input()"
        env = {**os.environ, "TMPDIR": str(tmp_path)}
        process = subprocess.Popen([sys.executable, "-c", code], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        return process, Path(process.stdout.readline().decode().strip())

    def kill(process: subprocess.Popen) -> None:
        process.send_signal(signal.SIGKILL)
        process.wait()

    killed, abandoned = holder()
    living, held = holder()
    kill(killed)
    (abandoned / "inputs.x.safetensors").write_bytes(bytes(2**20))
    older = tmp_path / f"{calibration.SPILL_PREFIX}older"  # no lock file: being made, or by an older version
    older.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    ours = calibration.SpillFolder()
    try:
        model = LlamaForCausalLM(llama_config(tie_word_embeddings=True)).eval()
        stats = collect(model, compressible_modules(model), blocks(count=8, length=16), progress=True)
        assert "passes" not in stats.summary()  # removed by a calibration that does not spill, too
        assert (
            f"removed 1 folder of statistics that runs killed before they finished left behind (0.0 GiB): {abandoned}"
            in (capsys.readouterr().err)
        )
        assert set(tmp_path.iterdir()) == {held, older, Path(ours.name)}
        assert calibration.remove_abandoned_statistics() == []
        kill(living)
        assert calibration.remove_abandoned_statistics() == [(held, 0)]
    finally:
        kill(living)
        ours.cleanup()
    assert set(tmp_path.iterdir()) == {older}


def test_a_runs_own_statistics_folder_is_kept_where_locks_do_not_exclude_its_own_process(tmp_path, monkeypatch):
    import tempfile
    from pathlib import Path

    from tqcompressor import calibration

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    ours = calibration.SpillFolder()
    # On NFS flock() takes POSIX locks, which a process's second lock on the same file does not conflict with.
    monkeypatch.setattr(calibration.fcntl, "flock", lambda *args: None)
    assert calibration.remove_abandoned_statistics() == []
    assert Path(ours.name).is_dir()
    ours.cleanup()


@pytest.mark.parametrize(
    "config", [tq.LowRankConfig(ratio=0.3), tq.KroneckerConfig(ratio=0.5, iterations=2, time_budget=2.0)]
)
def test_calibrated_compression_computes_closer_to_the_original_on_its_inputs(config):
    teacher = tiny_gpt2()
    ids = blocks(count=24)
    plan = tq.CompressionPlan([tq.Rule(r"transformer\.h\.\d+\.mlp\.c_(fc|proj)", config)])
    stats = tq.calibrate(teacher, plan, ids, progress=False)
    errors = {}
    for calibrated in (False, True):
        model = tiny_gpt2()
        report = tq.compress_(model, plan, calibration=stats if calibrated else None, progress=False)
        assert {layer.objective for layer in report.layers} == {"calibrated" if calibrated else "frobenius"}
        with torch.no_grad():
            errors[calibrated] = float((model(ids).logits - teacher(ids).logits).norm())
    assert errors[True] < errors[False]


def test_calibrated_kronecker_keeps_the_best_of_its_candidate_orders():
    torch.manual_seed(5)
    layer = nn.Linear(16, 12)
    x = anisotropic_inputs(800, 16, seed=6)
    stats = tq.calibration.InputStats(x.T @ x, 800)
    method = tq.get_method("kronecker")
    candidates = {True: {"identity", "frobenius-search", "whitened-columns", "estimate-columns", "scaled-search"}}
    candidates["cols"] = candidates[True] - {"scaled-search"}  # the scaled search permutes inputs (rows)
    for permute, expected in candidates.items():
        config = tq.KroneckerConfig(shape=(4, 3, 4, 4), rank=1, permute=permute, iterations=2)
        fitted, report = method.fit(layer, config, stats)
        orders = {
            key.removeprefix("order_"): value for key, value in report.details.items() if key.startswith("order_")
        }
        assert set(orders) == expected
        assert report.best_start == min(orders, key=orders.get) and report.error == min(orders.values())
        weight = layer.weight.detach().T.double()
        assert calibrated_error(weight, fitted.dense_weight().detach().double(), stats.second_moment) == pytest.approx(
            report.error, rel=1e-5
        )


def test_a_tied_heads_moment_makes_the_fit_exact_in_the_directions_the_head_reads():
    # Planted: W is rank 4 plus noise only in directions the head's inputs never take (C's null space).
    g = torch.Generator().manual_seed(3)
    vocab, dim, rank = 60, 12, 4
    seen = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))[0]
    hidden = torch.randn(500, rank, generator=g, dtype=torch.float64) @ seen[:, :rank].T
    moment = hidden.T @ hidden
    planted = torch.randn(vocab, rank, generator=g, dtype=torch.float64) @ seen[:, :rank].T
    weight = planted + 3 * torch.randn(vocab, dim - rank, generator=g, dtype=torch.float64) @ seen[:, rank:].T
    weights = torch.rand(vocab, generator=g, dtype=torch.float64) + 0.1
    tied = scaled_svd(weight, rank, weights.sqrt(), moment).reconstruct()
    rows_only = scaled_svd(weight, rank, weights.sqrt()).reconstruct()
    assert weighted_error(weight, tied, weights, moment) < 1e-6  # the logits h·E_v are all kept
    assert weighted_error(weight, rows_only, weights, moment) > 0.5  # the unseen noise took the rank
    torch.testing.assert_close(
        (tied - weight) @ hidden.T, torch.zeros(vocab, 500, dtype=torch.float64), atol=1e-6, rtol=0
    )


def planted_kronecker_table(vocab: int, width: int, k: int, moment: torch.Tensor, g: torch.Generator):
    """kron(E', b) plus large noise in the null space of ``moment`` (directions a tied head never reads)."""
    table = torch.kron(torch.randn(vocab, width // k, generator=g, dtype=torch.float64), torch.tensor([[1.5, -0.7]]))
    eigenvalues, eigenvectors = torch.linalg.eigh(moment)
    unseen = eigenvectors[:, eigenvalues < 1e-9 * eigenvalues.max()]
    return table + 3 * torch.randn(vocab, unseen.shape[1], generator=g, dtype=torch.float64) @ unseen.T


@pytest.mark.parametrize("stages", [1, 2])
def test_a_tied_heads_moment_makes_the_kronecker_embedding_fit_exact_where_the_head_reads(stages):
    # Planted: the table is kron(E', b) in the directions the head's inputs take, and noise elsewhere. A
    # second ÷2 factors the base of a KroneckerEmbedding, where the head reads through the outer stage.
    g = torch.Generator().manual_seed(5)
    vocab, dim = 60, 12
    hidden = torch.randn(500, 4, generator=g, dtype=torch.float64) @ torch.randn(4, dim, generator=g).double()
    moment = hidden.T @ hidden
    if stages == 1:
        module = nn.Embedding(vocab, dim).double()
        module.weight.data = planted_kronecker_table(vocab, dim, 2, moment, g)
    else:
        outer_scale, outer_index = torch.randn(2, generator=g).double(), torch.randperm(dim, generator=g)
        outer = tq.KroneckerEmbedding(torch.zeros(vocab, dim // 2), [outer_scale], [outer_index]).double()
        module = tq.KroneckerEmbedding(
            planted_kronecker_table(vocab, dim // 2, 2, outer.reduce(outer.reduce(moment).T), g),
            [outer_scale],
            [outer_index],
        ).double()
    counts = torch.randint(1, 50, (vocab,), generator=g).double()
    method, config = tq.get_method("kronecker"), tq.KroneckerConfig(embedding_factor=2, permute=False)
    errors = {}
    for label, head in (("tied", moment), ("rows", None)):
        stats = tq.calibration.TokenStats(counts, head_second_moment=head)
        with torch.no_grad():  # as compress_ may call it
            fitted, report = method.fit(module, config, stats)
        errors[label] = weighted_error(module.weight, fitted.weight, stats.weights(), moment)
        assert report.error == pytest.approx(
            weighted_error(module.weight, fitted.weight, stats.weights(), head), rel=1e-6
        )
        assert len(fitted.scales) == stages
    assert errors["tied"] < 1e-3  # the logits h·E_v are all kept
    assert errors["rows"] > 0.3  # the unseen noise decided the fit


def test_a_tied_embeddings_fit_keeps_the_logits_closer_and_reports_the_heads_objective():
    model = tiny_gpt2()
    ids = blocks()
    stats = collect(model, ["transformer.wte"], ids, progress=False)
    tied = stats.for_module("transformer.wte")
    rows_only = tq.calibration.TokenStats(tied.counts)
    embedding = model.transformer.wte
    with torch.no_grad():
        reference = model(ids).logits
    errors = {}
    for config in (tq.LowRankConfig(rank=8), tq.KroneckerConfig(embedding_factor=2, iterations=1)):
        method = tq.get_method(config.method)
        for label, token_stats in (("tied", tied), ("rows", rows_only)):
            fitted, report = method.fit(embedding, config, token_stats)
            measured = weighted_error(
                embedding.weight, fitted.to_dense().weight, tied.weights(), tied.head_second_moment
            )
            assert report.error == pytest.approx(
                measured
                if label == "tied"
                else weighted_error(embedding.weight, fitted.to_dense().weight, tied.weights()),
                rel=1e-5,
            )
            compressed = tiny_gpt2()
            with torch.no_grad():  # tied: the head sees the new table too
                compressed.transformer.wte.weight.copy_(fitted.to_dense().weight)
                errors[config.method, label] = float((compressed(ids).logits - reference).square().mean())
    for method_name in ("lowrank", "kronecker"):
        assert errors[method_name, "tied"] < errors[method_name, "rows"]


def test_frequency_weighted_embeddings_fit_frequent_tokens_better():
    torch.manual_seed(0)
    embedding = nn.Embedding(120, 32)
    ids = torch.randint(0, 10, (40, 16))  # only tokens 0-9 occur
    counts = tq.calibration.TokenStats(torch.bincount(ids.reshape(-1), minlength=120).double())
    for config in (tq.KroneckerConfig(embedding_factor=2, iterations=1), tq.LowRankConfig(rank=6)):
        method = tq.get_method(config.method)
        plain, _ = method.fit(embedding, config)
        weighted, report = method.fit(embedding, config, counts)
        assert report.objective == "calibrated" and report.error < report.error_plain

        def frequent_error(module):
            return float((module(torch.arange(10)) - embedding.weight[:10]).detach().norm())

        assert frequent_error(weighted) < frequent_error(plain)


def test_cli_compresses_with_calibration_and_reuses_saved_statistics(tmp_path, capsys):
    from tqcompressor.cli import main

    tiny_gpt2_dir(tmp_path, books_repeats=80)
    (tmp_path / "plan.yaml").write_text(
        "rules:\n  - {pattern: 'transformer\\.h\\.\\d+\\.mlp\\.c_fc', method: lowrank, ratio: 0.5}\n"
        # No permutation search: it stops on a clock, and this test compares two fits bit for bit.
        "  - {pattern: 'transformer\\.h\\.1\\.mlp\\.c_proj', ratio: 0.5, permute: false}\n"
    )
    common = ["compress", "--model", str(tmp_path / "tiny"), "--plan", str(tmp_path / "plan.yaml"), "--quiet"]
    stats = tmp_path / "stats.safetensors"
    collected = [*common, "--calibration", str(tmp_path / "books"), "--calibration-tokens", "512"]
    assert main([*collected, "--save-calibration", str(stats), "--out", str(tmp_path / "a")]) == 0
    assert "calibrated" in capsys.readouterr().out
    assert main([*common, "--calibration-stats", str(stats), "--out", str(tmp_path / "b")]) == 0
    first, second = tq.load(tmp_path / "a"), tq.load(tmp_path / "b")
    for (name, x), (_, y) in zip(first.state_dict().items(), second.state_dict().items(), strict=True):
        assert torch.equal(x, y), name  # the same statistics give the same fit
    history = first.tqcompressor_history[-1]["report"]["layers"]
    assert {layer["objective"] for layer in history} == {"calibrated"}
    capsys.readouterr()
    both = [*collected, "--calibration-stats", str(stats), "--out", str(tmp_path / "c")]
    assert main(both) == 2
    assert main([*common, "--calibration-tokens", "64", "--out", str(tmp_path / "d")]) == 2
    assert (
        main(
            [
                *common,
                "--calibration",
                str(tmp_path / "books"),
                "--calibration-tokens",
                "100",
                "--out",
                str(tmp_path / "e"),
            ]
        )
        == 2
    )
    assert main([*common, "--sequential", "--out", str(tmp_path / "f")]) == 2
    assert main([*common, "--calibration-length", "32", "--out", str(tmp_path / "m")]) == 2
    assert main([*collected, "--calibration-length", "65", "--out", str(tmp_path / "n")]) == 2  # context: 64
    assert main([*collected, "--calibration-length", "1", "--out", str(tmp_path / "o")]) == 2
    assert main([*collected, "--sequential", "--out", str(tmp_path / "g")]) == 0
    assert {layer["objective"] for layer in tq.load(tmp_path / "g").tqcompressor_history[-1]["report"]["layers"]} == {
        "calibrated"
    }
    assert main([*collected, "--no-aim-dense", "--out", str(tmp_path / "h")]) == 2
    assert "the plan keeps dense" in tq.load(tmp_path / "g").tqcompressor_history[-1]["report"]["notes"][0]
    assert main([*collected, "--sequential", "--no-aim-dense", "--out", str(tmp_path / "i")]) == 0
    assert "keeps dense" not in tq.load(tmp_path / "i").tqcompressor_history[-1]["report"]["notes"][0]
    assert main([*collected, "--anchor", "1", "--out", str(tmp_path / "j")]) == 2
    assert main([*collected, "--sequential", "--anchor", "-1", "--out", str(tmp_path / "k")]) == 2
    # Held to the original inputs, the sequential fit comes out as the fit at once (model a), not as g.
    assert main([*collected, "--sequential", "--anchor", "1e9", "--out", str(tmp_path / "l")]) == 0
    anchored, aimed = tq.load(tmp_path / "l").state_dict(), tq.load(tmp_path / "g").state_dict()
    for name, x in first.state_dict().items():
        torch.testing.assert_close(anchored[name], x, rtol=1e-4, atol=1e-5, msg=name)
    assert any(not torch.allclose(anchored[name], x, rtol=1e-3, atol=1e-4) for name, x in aimed.items())
    err = capsys.readouterr().err
    assert "not both" in err and "apply to --calibration DATA only" in err and "fewer than two blocks" in err
    assert "--no-aim-dense applies to a sequential fit only" in err
    assert "--anchor applies to a sequential fit only" in err and "must be 0 or more" in err
    assert "longer than the 64 tokens the model reads at a time" in err and "at least 2 tokens, got 1" in err
    assert not any((tmp_path / name).exists() for name in "cdefhjkmno")


def test_cli_reconstructs_the_blocks_of_a_sequential_fit(tmp_path, capsys):
    from tqcompressor.cli import main

    tiny_gpt2_dir(tmp_path, books_repeats=80)
    (tmp_path / "plan.yaml").write_text(
        "rules:\n  - {pattern: 'transformer\\.h\\.\\d+\\.mlp\\.c_fc', method: lowrank, ratio: 0.5}\n"
    )
    given = ["compress", "--model", str(tmp_path / "tiny"), "--plan", str(tmp_path / "plan.yaml"), "--quiet"]
    given += ["--calibration", str(tmp_path / "books"), "--calibration-tokens", "1024", "--sequential"]
    assert main([*given, "--out", str(tmp_path / "fitted")]) == 0
    assert main([*given, "--reconstruction-epochs", "3", "--out", str(tmp_path / "tuned")]) == 0
    notes = tq.load(tmp_path / "tuned").tqcompressor_history[-1]["report"]["notes"]
    assert "reconstructed 2 blocks (3 epochs" in notes[-1]
    fitted, tuned = tq.load(tmp_path / "fitted").state_dict(), tq.load(tmp_path / "tuned").state_dict()
    assert fitted.keys() == tuned.keys()
    assert any(not torch.allclose(tuned[name], x, rtol=1e-3, atol=1e-4) for name, x in fitted.items())
    capsys.readouterr()
    at_once = [name for name in given if name != "--sequential"]
    assert main([*at_once, "--reconstruction-epochs", "3", "--out", str(tmp_path / "a")]) == 2
    assert main([*given, "--reconstruction-lr", "0.01", "--out", str(tmp_path / "b")]) == 2
    assert main([*given, "--reconstruction-epochs", "-1", "--out", str(tmp_path / "c")]) == 2
    assert main([*given, "--reconstruction-epochs", "1", "--reconstruction-lr", "0", "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert "--reconstruction-epochs applies to a sequential fit only" in err
    assert "give --reconstruction-epochs" in err and "0 or more" in err and "must be positive" in err
    assert not any((tmp_path / name).exists() for name in "abcd")


def _two_books(folder):
    """Two books of different words (about 800 tokens each): a short count reads one, a longer one both."""
    folder.mkdir()
    (folder / "a.txt").write_text("It was the best of times, it was the worst of times. " * 60)
    (folder / "b.txt").write_text("Call me Ishmael. Some years ago, never mind how long precisely. " * 60)
    return folder


def test_token_counts_count_the_text_in_the_order_blocks_read_it(tmp_path):
    from tqcompressor.data import load_blocks, token_counts, token_ids

    books, tokenizer = _two_books(tmp_path / "books"), gpt2_tokenizer()
    everything = token_ids(books, tokenizer)
    counts = token_counts(books, tokenizer, 50257, 1024)
    assert counts.sum() == 1024 and counts.sum() < len(everything)
    torch.testing.assert_close(counts, torch.bincount(torch.tensor(everything[:1024]), minlength=50257).double())
    blocks = load_blocks(books, tokenizer, 16, 512)
    in_blocks = torch.bincount(torch.cat([blocks.train, blocks.heldout]).reshape(-1), minlength=50257).double()
    assert (in_blocks <= counts).all() and (in_blocks < counts).any()  # the blocks, and more text
    assert token_counts(books, tokenizer, 50257).sum() == len(everything)
    with pytest.raises(ValueError, match="outside the model's 100-token vocabulary"):
        token_counts(books, tokenizer, 100, 64)


def test_blocks_drawn_from_a_pool_sample_every_book_and_stay_within_the_counted_text(tmp_path):
    from tqcompressor.data import load_blocks, token_counts

    books, tokenizer = _two_books(tmp_path / "books"), gpt2_tokenizer()
    ishmael, times = tokenizer(" Ishmael")["input_ids"][0], tokenizer(" times")["input_ids"][0]

    def words(text) -> set[int]:
        return set(torch.cat([text.train, text.heldout]).unique().tolist())

    first = load_blocks(books, tokenizer, 16, 512, seed=0)
    assert len({ishmael, times} & words(first)) == 1  # the cap holds one book
    drawn = load_blocks(books, tokenizer, 16, 512, seed=0, pool_tokens=1600)
    assert drawn.train.numel() + drawn.heldout.numel() == 512
    assert {ishmael, times} <= words(drawn)
    assert torch.equal(drawn.train, load_blocks(books, tokenizer, 16, 512, seed=0, pool_tokens=1600).train)
    in_blocks = torch.bincount(torch.cat([drawn.train, drawn.heldout]).reshape(-1), minlength=50257).double()
    assert (in_blocks <= token_counts(books, tokenizer, 50257, 1600)).all()
    for cap in (None, 1024):
        with pytest.raises(ValueError, match="pool_tokens"):
            load_blocks(books, tokenizer, 16, cap, pool_tokens=512 if cap else 1600)


@pytest.mark.parametrize("length", [None, 24])
def test_cli_calibrates_on_blocks_drawn_across_the_counted_text(tmp_path, length):
    from tqcompressor.cli import main
    from tqcompressor.data import load_blocks
    from tqcompressor.loading import load_model

    tiny = tiny_gpt2_dir(tmp_path, books_repeats=1)
    books, tokenizer = _two_books(tmp_path / "two"), gpt2_tokenizer()
    fc = "transformer.h.0.mlp.c_fc"
    (tmp_path / "plan.yaml").write_text(f"rules:\n  - {{pattern: '{fc}', method: lowrank, rank: 4}}\n")
    stats = tmp_path / "stats.safetensors"
    args = ["compress", "--model", str(tiny), "--plan", str(tmp_path / "plan.yaml"), "--quiet"]
    args += ["--calibration", str(books), "--calibration-tokens", "512", "--count-tokens", "1600"]
    args += ["--calibration-length", str(length)] if length else []
    assert main([*args, "--save-calibration", str(stats), "--out", str(tmp_path / "out")]) == 0

    def moment(**pool) -> torch.Tensor:
        # Without --calibration-length, blocks as long as the tiny model's context (64 tokens).
        text = load_blocks(books, tokenizer, length or 64, 512, seed=0, **pool)
        model = load_model(str(tiny))[0]
        return collect(model, [fc], torch.cat([text.train, text.heldout]), progress=False).for_module(fc).second_moment

    saved = CalibrationStats.load(stats).for_module(fc).second_moment
    torch.testing.assert_close(saved, moment(pool_tokens=1600))
    assert not torch.allclose(saved, moment())  # not the first 512 tokens: those are one book


def test_collect_takes_token_counts_from_more_text_for_embeddings_only():
    model = tiny_gpt2()
    ids = blocks()
    counts = torch.arange(120, dtype=torch.float64)
    names = ["transformer.wte", "transformer.h.0.mlp.c_fc"]
    stats = collect(model, names, ids, progress=False, token_counts=counts)
    plain = collect(model, names, ids, progress=False)
    torch.testing.assert_close(stats.for_module("transformer.wte").counts, counts)
    fc = "transformer.h.0.mlp.c_fc"
    assert torch.equal(stats.for_module(fc).second_moment, plain.for_module(fc).second_moment)
    with pytest.raises(ValueError, match="token_counts cover"):
        collect(model, names, ids, progress=False, token_counts=counts[:100])


def test_cli_counts_embedding_tokens_on_more_text_than_it_calibrates_on(tmp_path, capsys):
    from tqcompressor.cli import main

    tiny_gpt2_dir(tmp_path, books_repeats=1)
    books = _two_books(tmp_path / "two")
    (tmp_path / "plan.yaml").write_text("rules:\n  - {pattern: 'transformer\\.wte', method: lowrank, rank: 4}\n")
    common = ["compress", "--model", str(tmp_path / "tiny"), "--plan", str(tmp_path / "plan.yaml"), "--quiet"]
    calibrated = [*common, "--calibration", str(books), "--calibration-tokens", "512"]
    stats = tmp_path / "stats.safetensors"
    assert (
        main([*calibrated, "--count-tokens", "1024", "--save-calibration", str(stats), "--out", str(tmp_path / "a")])
        == 0
    )
    counts = CalibrationStats.load(stats).for_module("transformer.wte").counts
    assert counts.sum() == 1024
    # A sequential fit weighs the embedding by the same counts; counting only the calibrated blocks differs.
    assert main([*calibrated, "--count-tokens", "1024", "--sequential", "--out", str(tmp_path / "b")]) == 0
    assert main([*calibrated, "--count-tokens", "512", "--sequential", "--out", str(tmp_path / "c")]) == 0
    wte = {n: tq.load(tmp_path / n).transformer.wte.weight for n in "abc"}
    torch.testing.assert_close(wte["b"], wte["a"])
    assert not torch.allclose(wte["c"], wte["a"])
    capsys.readouterr()
    assert main([*calibrated, "--count-tokens", "256", "--out", str(tmp_path / "d")]) == 2
    assert main([*common, "--count-tokens", "1024", "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert "fewer than the calibration tokens" in err and "apply to --calibration DATA only" in err
    assert not (tmp_path / "d").exists() and not (tmp_path / "e").exists()


def test_a_budget_whose_statistics_exceed_memory_runs_from_disk_unless_they_are_to_be_saved(
    tmp_path, monkeypatch, capsys
):
    from tqcompressor import calibration
    from tqcompressor.allocation import compressible_modules
    from tqcompressor.cli import main

    tiny_gpt2_dir(tmp_path, n_embd=64)
    base = ["compress", "--model", str(tmp_path / "tiny"), "--calibration", str(tmp_path / "books")]
    base += ["--target-ratio", "0.8", "--calibration-tokens", "2048", "--sensitivity-tokens", "128"]
    assert main([*base, "--quiet", "--out", str(tmp_path / "memory")]) == 0
    model = tq.loading.load_model(str(tmp_path / "tiny"))[0]
    names = compressible_modules(model)
    sample = torch.zeros(1, 8, dtype=torch.long)
    need = sum(calibration.statistics_bytes(model, *calibration.calibration_targets(model, names), sample, True))
    monkeypatch.setattr(calibration, "free_memory", lambda device: need // 2)
    monkeypatch.setattr(calibration, "fisher_pass_bytes", lambda *args: 0)
    capsys.readouterr()
    assert main([*base, "--out", str(tmp_path / "disk")]) == 0
    assert "passes over the text, each keeping its statistics on disk" in capsys.readouterr().err
    plans = [(tmp_path / run / "allocation.yaml").read_text() for run in ("memory", "disk")]
    assert plans[0] == plans[1]
    ids = blocks(count=2, length=16)
    with torch.no_grad():
        logits = [tq.load(tmp_path / run)(ids).logits for run in ("memory", "disk")]
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-4, atol=1e-5)
    saving = [*base, "--save-calibration", str(tmp_path / "stats.safetensors"), "--out", str(tmp_path / "saved")]
    assert main([*saving, "--quiet"]) == 2
    assert "let them spill to disk (spill=True; in the CLI, without --save-calibration)" in capsys.readouterr().err
    assert not (tmp_path / "saved").exists() and not (tmp_path / "stats.safetensors").exists()
