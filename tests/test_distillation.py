import copy
import json
import math
import signal
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from test_models import TINY, quick, tiny_model

from tqcompressor.data import TokenBlocks, batch_indices, load_blocks
from tqcompressor.distillation import DistillationLoss
from tqcompressor.serialization import load
from tqcompressor.surgery import compress_
from tqcompressor.training import CHECKPOINT, FINAL, LOG, TrainConfig, Trainer


def pattern_blocks(count: int = 120, length: int = 24, seed: int = 0) -> TokenBlocks:
    """Arithmetic token sequences (next = previous + 7 mod vocab): learnable, so held-out loss can fall."""
    start = torch.randint(0, TINY["vocab_size"], (count, 1), generator=torch.Generator().manual_seed(seed))
    blocks = (start + 7 * torch.arange(length)) % TINY["vocab_size"]
    return TokenBlocks(train=blocks[16:], heldout=blocks[:16], source="pattern")


def compressed_pair(seed: int = 0):
    teacher = tiny_model(seed)
    student = copy.deepcopy(teacher)
    compress_(student, quick("tqcompressedgpt2", student.config), progress=False)
    return teacher, student


def config(**overrides) -> TrainConfig:
    settings = dict(
        tokens=24 * 8 * 8,
        batch_size=8,
        micro_batch_size=2,
        lr=3e-3,
        eval_every=4,
        checkpoint_every=100,
        loss=DistillationLoss(alpha=0.5, beta=1.0, gamma=0.1, temperature=2.0, hidden_layers=[1, 2]),
    )
    return TrainConfig(**{**settings, **overrides})


def test_loss_terms_match_a_hand_computation():
    torch.manual_seed(0)
    ids = torch.randint(0, 5, (2, 4))
    s_logits, t_logits = torch.randn(2, 4, 5), torch.randn(2, 4, 5)
    s_hidden = [torch.randn(2, 4, 3) for _ in range(3)]
    t_hidden = [torch.randn(2, 4, 3) for _ in range(3)]
    student = SimpleNamespace(logits=s_logits, hidden_states=s_hidden)
    teacher = SimpleNamespace(logits=t_logits, hidden_states=t_hidden)
    loss = DistillationLoss(alpha=0.3, beta=0.5, gamma=2.0, temperature=2.0, hidden_layers=[0, 2])
    terms = loss(student, teacher, ids)

    kl, ce, count = 0.0, 0.0, 0
    for b in range(2):
        for t in range(3):  # position t predicts token t + 1
            p = torch.softmax(t_logits[b, t] / 2, -1)
            q = torch.softmax(s_logits[b, t] / 2, -1)
            kl += float((p * (p / q).log()).sum())
            ce -= math.log(float(torch.softmax(s_logits[b, t], -1)[ids[b, t + 1]]))
            count += 1
    kl = kl / count * 4  # T^2
    ce /= count
    hidden = sum(float(((s_hidden[i] - t_hidden[i]) ** 2).mean()) for i in (0, 2))
    assert float(terms["kl"]) == pytest.approx(kl, rel=1e-5)
    assert float(terms["ce"]) == pytest.approx(ce, rel=1e-5)
    assert float(terms["hidden"]) == pytest.approx(hidden, rel=1e-5)
    assert float(terms["loss"]) == pytest.approx(0.3 * kl + 0.5 * ce + 2.0 * hidden, rel=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_fused_loss_gradient_matches_autograd_of_the_plain_formula(temperature, monkeypatch):
    from tqcompressor import distillation

    monkeypatch.setattr(distillation._LogitLoss, "CPU_CHUNK_ELEMENTS", 3 * 7)  # several chunks, a ragged last one
    torch.manual_seed(1)
    ids = torch.randint(0, 7, (2, 6))
    s_logits = torch.randn(2, 6, 7, dtype=torch.float64, requires_grad=True)
    t_logits = torch.randn(2, 6, 7, dtype=torch.float64)
    original = s_logits.detach().clone()
    loss = DistillationLoss(alpha=0.7, beta=0.4, temperature=temperature)
    fused = loss(SimpleNamespace(logits=s_logits), SimpleNamespace(logits=t_logits), ids)["loss"]
    (fused * 3).backward()
    assert torch.equal(s_logits.detach(), original)  # inputs are not modified in place

    reference_logits = original.clone().requires_grad_(True)
    s, t = reference_logits[:, :-1].reshape(-1, 7), t_logits[:, :-1].reshape(-1, 7)
    ce = F.cross_entropy(s, ids[:, 1:].reshape(-1))
    kl = (
        F.kl_div(
            (s / temperature).log_softmax(-1), (t / temperature).log_softmax(-1), log_target=True, reduction="batchmean"
        )
        * temperature**2
    )
    reference = 0.7 * kl + 0.4 * ce
    (reference * 3).backward()
    torch.testing.assert_close(fused.double(), reference, rtol=1e-6, atol=0)
    torch.testing.assert_close(s_logits.grad, reference_logits.grad, rtol=1e-10, atol=1e-12)


def test_the_fused_loss_takes_cache_sized_chunks_on_a_cpu_and_few_large_ones_on_an_accelerator():
    from tqcompressor.distillation import _LogitLoss

    rows, vocab = 32 * 256, 50257  # one step of the H100 distillation benchmark
    assert rows / _LogitLoss.chunk_rows(torch.device("cpu"), vocab) > 500
    assert rows / _LogitLoss.chunk_rows(torch.device("cuda", 0), vocab) <= 8
    assert _LogitLoss.chunk_rows(torch.device("cpu"), 10**9) == 1  # a vocabulary wider than a chunk


def test_loss_rejects_bad_settings_and_vocab_mismatch():
    with pytest.raises(ValueError, match="temperature"):
        DistillationLoss(temperature=0)
    with pytest.raises(ValueError, match="hidden_layers"):
        DistillationLoss(gamma=1.0)
    with pytest.raises(ValueError, match="not all zero"):
        DistillationLoss(alpha=0, beta=0, gamma=0)
    student = SimpleNamespace(logits=torch.randn(1, 3, 5))
    teacher = SimpleNamespace(logits=torch.randn(1, 3, 6))
    with pytest.raises(ValueError, match="vocabulary"):
        DistillationLoss()(student, teacher, torch.zeros(1, 3, dtype=torch.long))


def test_distillation_lowers_held_out_loss_and_writes_a_loadable_model(tmp_path):
    teacher, student = compressed_pair()
    data = pattern_blocks()
    metrics = Trainer(student, teacher, data, config(tokens=24 * 8 * 24, lr=1e-2), tmp_path, progress=False).run()
    assert metrics["finished"] and metrics["steps"] == 24
    assert metrics["heldout_ppl_after"] < 0.7 * metrics["heldout_ppl_before"]
    records = [json.loads(line) for line in (tmp_path / LOG).read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert {"ce", "kl", "hidden", "loss", "lr", "tokens_per_s"} <= set(train[0])
    assert train[-1]["tokens"] == 24 * 8 * 24
    assert not (tmp_path / CHECKPOINT).exists()
    loaded = load(tmp_path / FINAL)
    ids = data.heldout[:2]
    torch.testing.assert_close(loaded(ids).logits, student.eval()(ids).logits, rtol=0, atol=0)


def test_training_only_the_compressed_layers_leaves_the_rest_untouched(tmp_path):
    teacher, student = compressed_pair()
    frozen = {name: p.detach().clone() for name, p in student.named_parameters() if "attn" in name}
    trainer = Trainer(student, teacher, pattern_blocks(), config(trainable="compressed"), tmp_path, progress=False)
    trainer.run()
    trained = dict(trainer.student.named_parameters())
    assert all(torch.equal(trained[name], value) for name, value in frozen.items())
    assert not torch.equal(trained["transformer.wte.base"], teacher.transformer.wte.weight[:, :8])


def final_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.student.state_dict().items()}


def test_resume_ends_with_the_same_weights_as_an_uninterrupted_run(tmp_path):
    teacher, student = compressed_pair()
    data = pattern_blocks()
    straight = Trainer(copy.deepcopy(student), teacher, data, config(), tmp_path / "a", progress=False)
    straight.run()

    first = Trainer(copy.deepcopy(student), teacher, data, config(), tmp_path / "b", progress=False)
    assert first.run(until_step=3) == {"finished": False, "step": 3, "interrupted": False}
    assert (tmp_path / "b" / CHECKPOINT / "optimizer.safetensors").is_file()
    # A fresh process would start from the untouched student; the checkpoint must replace it.
    second = Trainer(copy.deepcopy(student), teacher, data, config(), tmp_path / "b", resume=True, progress=False)
    assert second.step == 3
    second.run()
    expected, resumed = final_state(straight), final_state(second)
    assert expected.keys() == resumed.keys()
    assert all(torch.equal(expected[k], resumed[k]) for k in expected)
    # Without resume the existing run is protected; with changed settings resume refuses.
    with pytest.raises(FileExistsError, match="resume"):
        Trainer(copy.deepcopy(student), teacher, data, config(), tmp_path / "b", progress=False)
    third = Trainer(copy.deepcopy(student), teacher, data, config(), tmp_path / "c", progress=False)
    third.run(until_step=2)
    with pytest.raises(ValueError, match="lr"):
        Trainer(copy.deepcopy(student), teacher, data, config(lr=1e-3), tmp_path / "c", resume=True, progress=False)


def test_ctrl_c_finishes_the_step_and_leaves_a_checkpoint(tmp_path):
    teacher, student = compressed_pair()
    trainer = Trainer(student, teacher, pattern_blocks(), config(), tmp_path, progress=False)
    step = trainer.train_step

    def interrupted_step():
        metrics = step()
        if trainer.step == 2:
            signal.raise_signal(signal.SIGINT)
        return metrics

    trainer.train_step = interrupted_step
    # What the process had before: the default, or SIG_IGN where it was started in the background.
    before = signal.getsignal(signal.SIGINT)
    result = trainer.run()
    assert result == {"finished": False, "step": 2, "interrupted": True}
    assert json.loads((tmp_path / CHECKPOINT / "trainer_state.json").read_text())["step"] == 2
    assert signal.getsignal(signal.SIGINT) is before
    resumed = Trainer(tiny_model(), teacher, pattern_blocks(), config(), tmp_path, resume=True, progress=False)
    assert resumed.run()["finished"]


def test_trainer_rejects_mismatched_vocabularies_and_bad_batches(tmp_path):
    teacher, student = compressed_pair()
    other = tiny_model()
    other.resize_token_embeddings(TINY["vocab_size"] + 10)
    with pytest.raises(ValueError, match="vocabulary"):
        Trainer(student, other, pattern_blocks(), config(), tmp_path, progress=False)
    with pytest.raises(ValueError, match="multiple of micro_batch_size"):
        config(batch_size=6, micro_batch_size=4)
    with pytest.raises(ValueError, match="no compressed layers"):
        Trainer(tiny_model(), teacher, pattern_blocks(), config(trainable="compressed"), tmp_path, progress=False)
    assert not any(tmp_path.iterdir())


def test_batches_cover_every_block_once_per_epoch_and_depend_only_on_the_step():
    seen = torch.cat([batch_indices(10, 4, step, seed=3) for step in range(5)])
    assert sorted(seen[:10].tolist()) == list(range(10)) and sorted(seen[10:20].tolist()) == list(range(10))
    assert torch.equal(batch_indices(10, 4, 3, seed=3), seen[12:16])
    assert not torch.equal(batch_indices(10, 4, 0, seed=4), seen[:4])


def test_load_blocks_packs_folders_and_jsonl_with_a_disjoint_held_out_slice(tmp_path):
    from transformers import GPT2TokenizerFast

    from tqcompressor.assets import assets_dir

    folder = assets_dir() / "gpt2-tokenizer"
    tokenizer = GPT2TokenizerFast(str(folder / "vocab.json"), str(folder / "merges.txt"))
    (tmp_path / "books").mkdir()
    for i in range(3):
        (tmp_path / "books" / f"{i}.txt").write_text(f"Book {i} says hello to the world. " * 40)
    blocks = load_blocks(tmp_path / "books", tokenizer, block_size=16, heldout_fraction=0.1, seed=1)
    total = blocks.train.shape[0] + blocks.heldout.shape[0]
    assert blocks.block_size == 16 and blocks.heldout.shape[0] == round(total * 0.1)
    again = load_blocks(tmp_path / "books", tokenizer, block_size=16, heldout_fraction=0.1, seed=1)
    assert torch.equal(blocks.train, again.train)
    capped = load_blocks(tmp_path / "books", tokenizer, block_size=16, max_tokens=100, seed=1)
    assert capped.train.numel() + capped.heldout.numel() == 96

    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps({"text": f"row {i} of the data set."}) for i in range(50)))
    from_jsonl = load_blocks(rows, tokenizer, block_size=8)
    assert from_jsonl.train.shape[1] == 8
    assert int((from_jsonl.train == tokenizer.eos_token_id).sum()) > 0  # documents are separated

    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
        load_blocks(tmp_path / "bad.jsonl", tokenizer, block_size=4)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_blocks(tmp_path / "missing.txt", tokenizer, block_size=4)
    with pytest.raises(ValueError, match="fewer than two blocks"):
        load_blocks(rows, tokenizer, block_size=4096)


@pytest.mark.parametrize("native", [True, False])
def test_bf16_autocast_is_used_where_the_device_computes_bf16_natively_and_keeps_training_finite(
    tmp_path, monkeypatch, native
):
    # An AVX2-only CPU emulates bf16 matmuls, 80x slower than float32: autocast there would be a trap.
    monkeypatch.setattr("tqcompressor.training.trainer.computes_bf16_natively", lambda device: native)
    teacher, student = compressed_pair()
    trainer = Trainer(student, teacher, pattern_blocks(), config(tokens=24 * 8 * 2), tmp_path, progress=False)
    assert trainer.bf16 == native
    assert all(math.isfinite(v) for v in trainer.train_step().values())
    refused = Trainer(student, teacher, pattern_blocks(), config(bf16=False), tmp_path / "f", progress=False)
    assert not refused.bf16
