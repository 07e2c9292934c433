"""How much calibration text a budget needs: SmolLM2-135M at one budget, chosen with the Fisher among
low-rank candidates and fitted sequentially with the layers kept dense aimed (the ``auto-fisher-sequential``
row of allocation.py, and what the CLI does for a budget), at several calibration sizes; no distillation.

    python benchmarks/calibration_tokens.py [--tokens 32768 65536] [--ratio 0.7] [--sensitivity-tokens 1024]
        [--count-tokens 4194304] [--max-tokens 8000] [--lambada-passages 200] [--resume]

The CLI's default is 262,144 calibration tokens; allocation.py uses 32,768 to stay within hours on two
cores. Each size is calibrated from scratch on the first blocks of ``corpus/gutenberg/train`` (seed 0, as
allocation.py), so a larger size holds different blocks, not only more. Records are appended to
benchmarks/results/calibration_tokens.json as they finish (``--resume`` keeps them); the markdown and
the plot (held-out and WikiText-2 ppl against calibration tokens) are rewritten.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

from allocation import calibrate, evaluate, evaluation_texts, with_fisher
from common import RESULTS, command_history, command_line, load_smollm2, machine

import tqcompressor as tq
from tqcompressor.allocation import allocation_plan
from tqcompressor.cli import DEFAULT_COUNT_TOKENS
from tqcompressor.linalg import OUTPUT_RIDGE
from tqcompressor.sequential import compress_sequentially

PATH = RESULTS / "calibration_tokens.json"


def run(args, data: dict) -> None:
    done = {r["calibration_tokens"] for r in data["records"]}
    model, tokenizer = load_smollm2()
    model.eval()
    texts, passages = evaluation_texts(tokenizer, args.max_tokens, args.lambada_passages)
    if not any(r["plan"] == "dense" for r in data["records"]):
        row = {"plan": "dense", "calibration_tokens": 0, "params": tq.count_parameters(model)}
        record(data, row, model, texts, tokenizer, passages)
    target = round(args.ratio * tq.count_parameters(model))
    for tokens in args.tokens:
        if tokens in done:
            continue
        sizes = argparse.Namespace(
            calibration_tokens=tokens, count_tokens=args.count_tokens, sensitivity_tokens=args.sensitivity_tokens
        )
        stats, calibration_seconds, blocks, probe_blocks, counts = calibrate(model, tokenizer, sizes)
        fisher, fisher_seconds = with_fisher(model, stats, blocks)
        allocation = allocation_plan(model, fisher, target, probe_blocks, methods=["lowrank"])
        compressed = copy.deepcopy(model)
        started = time.perf_counter()
        compress_sequentially(
            compressed, allocation.plan, blocks, progress=False, token_counts=counts, output_moments=fisher.outputs
        )
        row = {
            "plan": "auto-fisher-sequential",
            "calibration_tokens": tokens,
            "calibrated_on": int(blocks.numel()),  # whole blocks of 512
            "target_ratio": args.ratio,
            "target_params": target,
            "params": tq.count_parameters(compressed),
            "output_ridge": OUTPUT_RIDGE,
            "calibration_seconds": calibration_seconds,
            "fisher_seconds": fisher_seconds,
            "search_seconds": allocation.seconds,
            "compress_seconds": time.perf_counter() - started,
        }
        record(data, row, compressed, texts, tokenizer, passages)
        del compressed


def record(data: dict, row: dict, model, texts: dict, tokenizer, passages: list[str]) -> None:
    row.update(model="smollm2-135m", **evaluate(model, texts, passages, tokenizer))
    data["records"].append(row)
    PATH.write_text(json.dumps(data, indent=1))
    print(json.dumps(row), flush=True)


def write_report(data: dict) -> None:
    meta, records = data["meta"], sorted(data["records"], key=lambda r: r["calibration_tokens"])
    dense = next((r for r in records if r["plan"] == "dense"), None)
    fitted = [r for r in records if r["plan"] != "dense"]
    lines = [
        "# Calibration tokens for a budget: SmolLM2-135M, auto (Fisher, low-rank), sequential, no training",
        "",
        "Commands, in order: " + "; ".join(f"`{c}`" for c in meta["commands"]) + f". Machine: {meta['machine']}.",
        "",
        "| calibration tokens | params | held-out ppl | WikiText-2 ppl | LAMBADA acc | calibration s | Fisher s "
        "| search s | fitting s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    if dense is not None:
        lines.append(
            f"| dense | {dense['params']:,} | {dense['heldout_ppl']:.1f} | {dense['wikitext2_ppl']:.1f} "
            f"| {dense['lambada_acc']:.3f} | — | — | — | — |"
        )
    for r in fitted:
        lines.append(
            f"| {r['calibration_tokens']:,} | {r['params']:,} | {r['heldout_ppl']:.1f} | {r['wikitext2_ppl']:.1f} "
            f"| {r['lambada_acc']:.3f} | {r['calibration_seconds']:.0f} | {r['fisher_seconds']:.0f} "
            f"| {r['search_seconds']:.0f} | {r['compress_seconds']:.0f} |"
        )
    (RESULTS / "calibration_tokens.md").write_text("\n".join(lines) + "\n")
    if not fitted:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    tokens = [r["calibration_tokens"] for r in fitted]
    for key, label in (("heldout_ppl", "held-out"), ("wikitext2_ppl", "WikiText-2")):
        at = f"{label}, at {fitted[0]['target_ratio']:.0%}"
        line = ax.plot(tokens, [r[key] for r in fitted], marker="o", label=at)
        if dense is not None:
            ax.axhline(dense[key], color=line[0].get_color(), linestyle=":", label=f"{label}, dense")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("calibration tokens")
    ax.set_ylabel("perplexity")
    ax.set_title("SmolLM2-135M: auto budget, Fisher, sequential")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "calibration_tokens.png", dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[32_768, 65_536])
    parser.add_argument("--ratio", type=float, default=0.7)
    parser.add_argument("--sensitivity-tokens", type=int, default=1024)
    parser.add_argument("--count-tokens", type=int, default=DEFAULT_COUNT_TOKENS)
    parser.add_argument("--max-tokens", type=int, default=8_000)
    parser.add_argument("--lambada-passages", type=int, default=200)
    parser.add_argument("--resume", action="store_true", help="keep finished records")
    args = parser.parse_args()
    data = json.loads(PATH.read_text()) if args.resume and PATH.exists() else {"meta": {}, "records": []}
    if data["records"] and any(r.get("target_ratio", args.ratio) != args.ratio for r in data["records"]):
        parser.error("the records hold another --ratio: start without --resume")
    command = command_line("calibration_tokens.py", args, left_out=("resume",))
    data["meta"] = {"commands": command_history(data["meta"], command + (" --resume" if args.resume else ""))}
    data["meta"]["machine"] = machine()
    RESULTS.mkdir(parents=True, exist_ok=True)
    run(args, data)
    write_report(data)


if __name__ == "__main__":
    main()
