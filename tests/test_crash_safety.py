"""Runs killed at any moment resume to exactly where an uninterrupted run ends, and leave no half-written
file behind: a real `tqcompressor distill` killed with SIGKILL, and every state a kill inside an
atomic write can leave."""

import copy
import os
import signal
import subprocess
import sys
import time

import torch
from test_distillation import compressed_pair, config, pattern_blocks
from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

import tqcompressor as tq
from tqcompressor.assets import assets_dir
from tqcompressor.training import CHECKPOINT, FINAL, Trainer


def tiny_run_files(tmp_path):
    folder = assets_dir() / "gpt2-tokenizer"
    tokenizer = GPT2TokenizerFast(str(folder / "vocab.json"), str(folder / "merges.txt"))
    torch.manual_seed(0)
    teacher = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=2, n_head=2, n_positions=64))
    teacher.save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    student = copy.deepcopy(teacher)
    plan = tq.CompressionPlan([tq.Rule(r"transformer\.h\.\d+\.mlp\.c_(fc|proj)", tq.LowRankConfig(rank=4))])
    tq.compress_(student, plan, progress=False)
    tq.save(student, tmp_path / "student", tokenizer)
    (tmp_path / "books").mkdir()
    (tmp_path / "books" / "a.txt").write_text("It was the best of times, it was the worst of times. " * 3000)


def distill(tmp_path, out, *extra) -> list[str]:
    return [
        sys.executable, "-m", "tqcompressor.cli", "distill",
        "--teacher", str(tmp_path / "teacher"), "--student", str(tmp_path / "student"),
        "--data", str(tmp_path / "books"), "--tokens", str(240 * 4 * 32),
        "--block-size", "32", "--batch-size", "4", "--micro-batch-size", "2",
        "--checkpoint-every", "20", "--eval-every", "1000", "--quiet", "--out", str(out), *extra,
    ]  # fmt: skip


def final_weights(out) -> dict[str, torch.Tensor]:
    return tq.load(out / FINAL).state_dict()


def leftovers(folder) -> list[str]:
    return [p.name for p in folder.iterdir() if ".staging" in p.name or p.name.endswith(".old")]


def test_distill_killed_between_checkpoints_resumes_bit_exactly(tmp_path):
    tiny_run_files(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same kernels in all three runs
    subprocess.run(distill(tmp_path, tmp_path / "straight"), check=True, env=env, capture_output=True)

    out = tmp_path / "killed"
    process = subprocess.Popen(distill(tmp_path, out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = out / CHECKPOINT / "trainer_state.json"
    deadline = time.monotonic() + 300
    while not state.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)  # into the next checkpoint interval
    assert process.poll() is None, "the run finished before it could be killed: give it more steps"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / FINAL).exists() and (out / CHECKPOINT).is_dir()

    subprocess.run(distill(tmp_path, out, "--resume"), check=True, env=env, capture_output=True)
    expected, resumed = final_weights(tmp_path / "straight"), final_weights(out)
    assert expected.keys() == resumed.keys()
    assert all(torch.equal(expected[k], resumed[k]) for k in expected)
    assert leftovers(out) == [] and not (out / CHECKPOINT).exists()


def test_every_state_a_kill_inside_a_checkpoint_write_leaves_resumes_exactly(tmp_path):
    teacher, student = compressed_pair()
    data = pattern_blocks()
    straight = Trainer(copy.deepcopy(student), teacher, data, config(), tmp_path / "straight", progress=False)
    straight.run()
    expected = straight.student.state_dict()

    for state in ("staging", "between-renames", "after-swap"):
        out = tmp_path / state
        Trainer(copy.deepcopy(student), teacher, data, config(), out, progress=False).run(until_step=3)
        checkpoint = out / CHECKPOINT
        if state == "staging":  # killed while writing the new checkpoint's files
            (out / ".checkpoint.staging-x1").mkdir()
            (out / ".checkpoint.staging-x1" / "model.safetensors").write_bytes(b"half")
        elif state == "between-renames":  # the old checkpoint moved aside, the new one not yet in place
            os.replace(checkpoint, out / ".checkpoint.old")
        else:  # the new checkpoint in place, the old one not yet deleted
            (out / ".checkpoint.old").mkdir()
        resumed = Trainer(copy.deepcopy(student), teacher, data, config(), out, resume=True, progress=False)
        assert resumed.step == 3, state
        resumed.run()
        assert all(torch.equal(expected[k], v) for k, v in resumed.student.state_dict().items()), state
        assert leftovers(out) == [], state


def test_compress_killed_during_the_search_leaves_no_output(tmp_path):
    torch.manual_seed(0)
    folder = assets_dir() / "gpt2-tokenizer"
    GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=1, n_head=2, n_positions=64)).save_pretrained(tmp_path / "m")
    GPT2TokenizerFast(str(folder / "vocab.json"), str(folder / "merges.txt")).save_pretrained(tmp_path / "m")
    (tmp_path / "plan.yaml").write_text(
        "rules:\n  - {pattern: 'transformer\\.wte', embedding_factor: 2, iterations: 50, time_budget: 120}\n"
    )
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "tqcompressor.cli", "compress", "--model", str(tmp_path / "m"),
        "--plan", str(tmp_path / "plan.yaml"), "--out", str(out), "--quiet",
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(8)  # past start-up, inside the two-minute search
    assert process.poll() is None
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
