"""Distillation recovery on the house teacher: multi-step vs one-shot, with and without permutations.

    python benchmarks/distill.py [--tokens 1000000] [--variants multi-step one-shot no-permutations]

Each variant compresses ../shared/assets/house-teacher with the tqcompressedgpt2 recipe (embedding ÷2,
odd-layer MLPs, embedding ÷2) and distils from the teacher on corpus/gutenberg/train with the same
total token budget (``--tokens``; multi-step variants share it equally between their three steps):

- ``multi-step``: three steps, permutations searched, distillation after each step (the paper);
- ``one-shot``: all three steps' compression at once, then one distillation, permutations searched;
- ``no-permutations``: three steps as the paper but without permutations (KnGPT-2 shapes).

It writes benchmarks/results/distill.json and distill.md: parameters, held-out Gutenberg and WikiText-2
perplexity of the compressed model before distillation and of the final model, tokens used and
tokens/s, plus a same-run timing of the fused distillation loss against the plain formula.
The default budget (1M tokens per variant) is sized to finish in under an hour on 2 CPU cores;
scale ``--tokens`` up on a GPU.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from common import ASSETS, heldout_ids
from transformers import AutoModelForCausalLM, AutoTokenizer

from tqcompressor import count_parameters
from tqcompressor.data import load_blocks
from tqcompressor.distillation import DistillationLoss
from tqcompressor.evaluation import perplexity, read_text
from tqcompressor.schedule import Schedule, run_schedule, step_dir
from tqcompressor.serialization import load
from tqcompressor.surgery import compress_
from tqcompressor.training import FINAL, TrainConfig

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("multi-step", "one-shot", "no-permutations")


def schedule_for(variant: str, config, time_budget: float) -> Schedule:
    if variant == "no-permutations":
        schedule = Schedule.from_preset("kngpt2", config)  # nothing to search
    else:
        schedule = Schedule.from_preset("tqcompressedgpt2", config, time_budget=time_budget)
    return schedule.one_shot() if variant == "one-shot" else schedule


def perplexities(model, texts: dict[str, list[int]], window: int) -> dict[str, float]:
    model.eval()
    return {f"{name}_ppl": perplexity(model, ids, max_length=window)["ppl"] for name, ids in texts.items()}


def loss_speed(vocab: int, rows: int = 2040, repeats: int = 3) -> dict[str, float]:
    """Seconds for forward + backward of KL + CE on (rows, vocab) bf16 logits: fused vs plain formula."""
    torch.manual_seed(0)
    student = torch.randn(1, rows + 1, vocab, dtype=torch.bfloat16)
    teacher = SimpleNamespace(logits=torch.randn(1, rows + 1, vocab, dtype=torch.bfloat16))
    ids = torch.randint(0, vocab, (1, rows + 1))
    fused_loss = DistillationLoss(alpha=1.0, beta=1.0)

    def fused():
        logits = student.clone().requires_grad_(True)
        fused_loss(SimpleNamespace(logits=logits), teacher, ids)["loss"].backward()

    def plain():
        logits = student.clone().requires_grad_(True)
        s, t = logits[0, :-1].float(), teacher.logits[0, :-1].float()
        ce = F.cross_entropy(s, ids[0, 1:])
        kl = F.kl_div(s.log_softmax(-1), t.log_softmax(-1), log_target=True, reduction="batchmean")
        (ce + kl).backward()

    timings = {}
    for name, run in (("fused", fused), ("plain", plain)):
        run()  # warm-up
        started = time.perf_counter()
        for _ in range(repeats):
            run()
        timings[f"{name}_seconds"] = (time.perf_counter() - started) / repeats
    timings["speedup"] = timings["plain_seconds"] / timings["fused_seconds"]
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher", default=str(ASSETS / "house-teacher"))
    parser.add_argument("--data", default=str(ASSETS / "corpus/gutenberg/train"))
    parser.add_argument("--tokens", type=int, default=1_000_000, help="training tokens per variant")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--eval-tokens", type=int, default=20_000, help="tokens per perplexity set")
    parser.add_argument("--time-budget", type=float, default=10.0, help="permutation search seconds per layer")
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks/work/distill", help="models and logs")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results")
    args = parser.parse_args()

    began = time.perf_counter()
    # Whole optimizer steps for every step of every variant, so that all variants train on equal tokens.
    unit = 3 * args.batch_size * args.block_size
    args.tokens = max(1, round(args.tokens / unit)) * unit
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(args.teacher)
    teacher = AutoModelForCausalLM.from_pretrained(args.teacher).eval()
    window = 512
    texts = {
        "heldout": heldout_ids(tokenizer, args.eval_tokens),
        "wikitext2": tokenizer(read_text("wikitext2"), verbose=False)["input_ids"][: args.eval_tokens + 1],
    }
    heldout_fraction = 0.02
    data = load_blocks(
        args.data,
        tokenizer,
        args.block_size,
        max_tokens=int(args.tokens / (1 - heldout_fraction)) + 2 * args.block_size,
        heldout_fraction=heldout_fraction,
    )
    config = TrainConfig(
        tokens=args.tokens,
        batch_size=args.batch_size,
        micro_batch_size=args.micro_batch_size,
        lr=args.lr,
        eval_every=25,
        checkpoint_every=100,
        loss=DistillationLoss(alpha=1.0, beta=1.0),
    )
    records = [{"variant": "teacher", "params": count_parameters(teacher), **perplexities(teacher, texts, window)}]
    print(json.dumps(records[-1]), flush=True)
    zero_shot: dict[str, dict] = {}
    for variant in args.variants:
        schedule = schedule_for(variant, teacher.config, args.time_budget)
        permuted = variant != "no-permutations"
        if permuted not in zero_shot:  # the full compression before any distillation, the "before" column
            model = copy.deepcopy(teacher)
            compress_(model, schedule.one_shot().steps[0].plan, progress=False)
            zero_shot[permuted] = perplexities(model, texts, window)
        work = args.work / variant
        if work.exists():
            shutil.rmtree(work)
        started = time.perf_counter()
        results = run_schedule(teacher, tokenizer, schedule, data, config, work, args.tokens, progress=True)
        seconds = time.perf_counter() - started
        final = load_final(work, schedule)
        record = {
            "variant": variant,
            "params": count_parameters(final),
            "before": zero_shot[permuted],
            "after": perplexities(final, texts, window),
            "tokens": sum(r["tokens"] for r in results),
            "train_tokens_per_s": sum(r["tokens"] for r in results)
            / sum(r["tokens"] / r["tokens_per_s"] for r in results),
            "seconds": seconds,
            "steps": [
                {
                    "step": r["step"],
                    "params": r["params"],
                    "tokens": r["tokens"],
                    "train_heldout_ppl_before": r["heldout_ppl_before"],
                    "train_heldout_ppl_after": r["heldout_ppl_after"],
                }
                for r in results
            ],
        }
        records.append(record)
        print(json.dumps(record), flush=True)

    speed = loss_speed(teacher.config.vocab_size)
    meta = {
        "command": f"python benchmarks/distill.py --tokens {args.tokens} --variants {' '.join(args.variants)}",
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "train_config": asdict(config) | {"tokens": args.tokens},
        "block_size": args.block_size,
        "eval": f"first {args.eval_tokens} tokens of each set, {window}-token windows",
        "loss_speed": speed,
        "total_seconds": time.perf_counter() - began,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "distill.json").write_text(json.dumps({"meta": meta, "records": records}, indent=2))
    (args.out / "distill.md").write_text(markdown(records, meta))
    print(markdown(records, meta))


def load_final(work: Path, schedule: Schedule):
    return load(step_dir(work, len(schedule.steps), schedule.steps[-1]) / FINAL)


def markdown(records: list[dict], meta: dict) -> str:
    teacher = records[0]
    lines = [
        "# Distillation recovery on the house teacher",
        "",
        f"Command: `{meta['command']}` on {meta['machine']}; {meta['total_seconds'] / 60:.0f} min in all.",
        f"Training: AdamW lr {meta['train_config']['lr']}, batch {meta['train_config']['batch_size']} x "
        f"{meta['block_size']} tokens, bf16 autocast, loss KL + CE (T = 1), data corpus/gutenberg/train. "
        f"Perplexity: {meta['eval']}.",
        "",
        f"Teacher: {teacher['params']:,} params, held-out Gutenberg ppl {teacher['heldout_ppl']:.1f}, "
        f"WikiText-2 ppl {teacher['wikitext2_ppl']:.0f}.",
        "",
        "| variant | params | held-out ppl before | held-out ppl after | WikiText-2 before | WikiText-2 after "
        "| tokens | tokens/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in records[1:]:
        lines.append(
            f"| {r['variant']} | {r['params']:,} | {r['before']['heldout_ppl']:.1f} | {r['after']['heldout_ppl']:.1f} "
            f"| {r['before']['wikitext2_ppl']:.0f} | {r['after']['wikitext2_ppl']:.0f} | {r['tokens']:,} "
            f"| {r['train_tokens_per_s']:.0f} |"
        )
    lines += [
        "",
        '"Before" is the full compression applied at once with no distillation. Per step (held-out slice of the',
        "training books, as logged by the trainer):",
        "",
        "| variant | step | params | tokens | ppl at step start | ppl at step end |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in records[1:]:
        for s in r["steps"]:
            lines.append(
                f"| {r['variant']} | {s['step']} | {s['params']:,} | {s['tokens']:,} "
                f"| {s['train_heldout_ppl_before']:.1f} | {s['train_heldout_ppl_after']:.1f} |"
            )
    speed = meta["loss_speed"]
    lines += [
        "",
        "Read with care: the house teacher saw only 7.7M training tokens (see its README), so distilling on more",
        "of its own training books also continues its training; a student can then beat the teacher. The rows",
        "compare the variants with each other at equal tokens. One run and one seed each: the spread between",
        "seeds was not measured.",
        "",
        f"Distillation loss, forward + backward on 2040 x vocab bf16 logits, same run: fused "
        f"{speed['fused_seconds']:.2f} s, plain formula {speed['plain_seconds']:.2f} s ({speed['speedup']:.1f}x).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
