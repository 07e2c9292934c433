"""Zero-shot compression of the house teacher: quality right after compression, before any distillation.

    python benchmarks/zero_shot.py [--max-tokens 20000] [--lambada-passages 1000] [--time-budget 10]

Compresses ../shared/assets/house-teacher with ``tqcompressedgpt2`` (permutations searched), ``kngpt2``
(the same shapes, no permutations) and a truncated-SVD plan of the same parameter count, and evaluates
each next to the uncompressed teacher with the same token caps: perplexity on WikiText-2 (test) and on
the held-out Gutenberg books (512-token windows), and LAMBADA last-word accuracy and perplexity.
Writes benchmarks/results/zero_shot.json (one record per model) and zero_shot.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from common import ASSETS, heldout_ids, machine
from transformers import AutoModelForCausalLM, AutoTokenizer

from tqcompressor import count_parameters
from tqcompressor.evaluation import lambada, lambada_passages, perplexity, read_text
from tqcompressor.presets import matching_svd_plan, preset
from tqcompressor.surgery import compress_

ROOT = Path(__file__).resolve().parents[1]


def evaluate_all(model, tokenizer, texts: dict[str, list[int]], passages: list[str], max_length: int) -> dict:
    record = {}
    for name, ids in texts.items():
        result = perplexity(model, ids, max_length=max_length)
        record[f"{name}_ppl"] = result["ppl"]
        record[f"{name}_tokens"] = result["tokens"]
    scored = lambada(model, tokenizer, passages)
    record.update(lambada_acc=scored["acc"], lambada_ppl=scored["ppl"], lambada_examples=scored["examples"])
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher", default=str(ASSETS / "house-teacher"))
    parser.add_argument("--max-tokens", type=int, default=20_000, help="tokens scored per perplexity set")
    parser.add_argument("--max-length", type=int, default=512, help="perplexity window")
    parser.add_argument("--lambada-passages", type=int, default=1000)
    parser.add_argument("--time-budget", type=float, default=10.0, help="permutation search seconds per layer")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results")
    args = parser.parse_args()

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(args.teacher)
    teacher = AutoModelForCausalLM.from_pretrained(args.teacher).eval()
    texts = {
        "wikitext2": tokenizer(read_text("wikitext2"), verbose=False)["input_ids"][: args.max_tokens + 1],
        "heldout": heldout_ids(tokenizer, args.max_tokens),
    }
    passages = lambada_passages()[: args.lambada_passages]

    tq = preset("tqcompressedgpt2", teacher.config, time_budget=args.time_budget)
    plans = {
        "tqcompressedgpt2": tq,
        "kngpt2": preset("kngpt2", teacher.config),
        "svd (same params)": matching_svd_plan(teacher, tq),
    }
    records = []
    for name, plan in {"teacher": None, **plans}.items():
        model = copy.deepcopy(teacher)
        started = time.perf_counter()
        layers = []
        if plan is not None:
            report = compress_(model, plan, progress=False)
            layers = [
                {"name": layer.name, "error_plain": layer.error_plain, "error": layer.error, "seconds": layer.seconds}
                for layer in report.layers
            ]
        compress_seconds = time.perf_counter() - started
        model.eval()
        started = time.perf_counter()
        record = {
            "model": name,
            "params": count_parameters(model),
            **evaluate_all(model, tokenizer, texts, passages, args.max_length),
            "compress_seconds": compress_seconds,
            "eval_seconds": time.perf_counter() - started,
            "layers": layers,
        }
        records.append(record)
        print(json.dumps({k: v for k, v in record.items() if k != "layers"}), flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    meta = {
        "command": "python benchmarks/zero_shot.py "
        f"--max-tokens {args.max_tokens} --lambada-passages {args.lambada_passages} --time-budget {args.time_budget}",
        "machine": machine(),
    }
    (args.out / "zero_shot.json").write_text(json.dumps({"meta": meta, "records": records}, indent=2))
    (args.out / "zero_shot.md").write_text(markdown(records, meta, args))
    print(markdown(records, meta, args))


def markdown(records: list[dict], meta: dict, args: argparse.Namespace) -> str:
    teacher = records[0]
    lines = [
        "# Zero-shot compression of the house teacher (no distillation)",
        "",
        f"Command: `{meta['command']}` on {meta['machine']}.",
        f"Perplexity: first {args.max_tokens} tokens of each set, {args.max_length}-token windows; "
        f"LAMBADA: first {teacher['lambada_examples']} passages. Same caps for every row.",
        "",
        "| model | params | held-out Gutenberg ppl | WikiText-2 ppl | LAMBADA acc | LAMBADA ppl | compress s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        lines.append(
            f"| {r['model']} | {r['params']:,} | {r['heldout_ppl']:.1f} | {r['wikitext2_ppl']:.0f} | "
            f"{r['lambada_acc']:.3f} | {r['lambada_ppl']:.0f} | {r['compress_seconds']:.0f} |"
        )
    lines += [
        "",
        "Per-layer relative error (Frobenius) before and after the permutation search, tqcompressedgpt2:",
        "",
        "| layer | plain Kronecker | with permutations |",
        "|---|---:|---:|",
    ]
    tq = next(r for r in records if r["model"] == "tqcompressedgpt2")
    for layer in tq["layers"]:
        lines.append(f"| {layer['name']} | {layer['error_plain']:.3f} | {layer['error']:.3f} |")
    lines += [
        "",
        "The house teacher is trained on Gutenberg only; WikiText-2 and LAMBADA are far out of its domain",
        "and serve as smoke tests. Held-out Gutenberg perplexity is the quality measure.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
