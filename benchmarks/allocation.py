"""Budget allocation against uniform plans at the same size, calibrated, no distillation.

    python benchmarks/allocation.py [--ratios 0.7 0.5] [--calibration-tokens 32768] [--max-tokens 8000]

SmolLM2-135M (from ``../shared/assets/smollm2/fetch.sh``): ``--target-ratio`` of its parameters chosen
by the allocator (every linear layer but the head: dense, whitened low-rank or Kronecker) against
every linear layer low-rank at the one rank ratio that gives the same total. Calibration text:
``corpus/gutenberg/train``. Writes benchmarks/results/allocation.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import re
import time
from collections import Counter

import torch
from common import ASSETS, RESULTS, heldout_ids, load_smollm2

import tqcompressor as tq
from tqcompressor.allocation import allocation_plan, linear_layers
from tqcompressor.calibration import collect
from tqcompressor.data import load_blocks
from tqcompressor.evaluation import perplexity


def uniform_svd(model, names: list[str], target: int) -> tq.CompressionPlan:
    """Every layer in ``names`` low-rank at the one ratio whose total is ``target`` (ranks rounded)."""
    linear = sum(model.get_submodule(n).weight.numel() for n in names)
    ratio = 1 - (tq.count_parameters(model) - target) / linear
    config = tq.LowRankConfig(ratio=ratio)
    return tq.CompressionPlan([tq.Rule(re.escape(n), config) for n in names], name=f"uniform-svd-{ratio:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.7, 0.5])
    parser.add_argument("--calibration-tokens", type=int, default=32_768)
    parser.add_argument("--max-tokens", type=int, default=8_000)
    parser.add_argument("--from-json", action="store_true", help="only rewrite the markdown")
    args = parser.parse_args()
    model, tokenizer = load_smollm2()
    if args.from_json:
        write_report(json.loads((RESULTS / "allocation.json").read_text()), model)
        return
    heldout = heldout_ids(tokenizer, args.max_tokens)
    text = load_blocks(ASSETS / "corpus/gutenberg/train", tokenizer, 512, args.calibration_tokens, seed=0)
    names = linear_layers(model)
    started = time.perf_counter()
    stats = collect(model, names, torch.cat([text.train, text.heldout]), progress=False)
    calibration_seconds = time.perf_counter() - started
    total = tq.count_parameters(model)
    records = [
        {
            "model": "smollm2-135m",
            "plan": "dense",
            "params": total,
            "heldout_ppl": perplexity(model, heldout, max_length=512)["ppl"],
        }
    ]
    print(json.dumps(records[-1]), flush=True)
    for ratio in args.ratios:
        target = round(ratio * total)
        allocation = allocation_plan(model, stats, target)
        for name, plan in (("auto", allocation.plan), ("uniform-svd", uniform_svd(model, names, target))):
            compressed = copy.deepcopy(model)
            started = time.perf_counter()
            report = tq.compress_(compressed, plan, calibration=stats, progress=False)
            record = {
                "model": "smollm2-135m",
                "plan": name,
                "target_ratio": ratio,
                "params": tq.count_parameters(compressed),
                "heldout_ppl": perplexity(compressed.eval(), heldout, max_length=512)["ppl"],
                "compress_seconds": time.perf_counter() - started,
            }
            if name == "auto":
                record["search_seconds"] = allocation.seconds
                record["chosen"] = dict(Counter(c.method for c in allocation.chosen.values()))
                record["layers"] = {n: {"method": c.method, "params": c.params} for n, c in allocation.chosen.items()}
            records.append(record)
            print(json.dumps({k: v for k, v in record.items() if k != "layers"}), flush=True)
            del compressed, report
    meta = {
        "command": "python benchmarks/allocation.py "
        + " ".join(
            f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in vars(args).items()
            if k != "from_json"
        ),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "calibration_seconds": calibration_seconds,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    data = {"meta": meta, "records": records}
    (RESULTS / "allocation.json").write_text(json.dumps(data, indent=1))
    write_report(data, model)


def write_report(data: dict, model) -> None:
    meta, records = data["meta"], data["records"]
    lines = [
        "# Budget allocation against a uniform plan (calibrated, no distillation)",
        "",
        f"Command: `{meta['command']}` on {meta['machine']}.",
        "",
    ]
    lines += [
        "| model | plan | target | params | held-out ppl | chosen | search s |",
        "|---|---|---:|---:|---:|---|---:|",
    ]
    for r in records:
        chosen = ", ".join(f"{k} {v}" for k, v in r.get("chosen", {}).items())
        lines.append(
            f"| {r['model']} | {r['plan']} | {r.get('target_ratio', 1.0):.2f} | {r['params']:,} | "
            f"{r['heldout_ppl']:.1f} | {chosen} | {r.get('search_seconds', 0):.0f} |"
        )
    lines += where_chosen(records, model)
    (RESULTS / "allocation.md").write_text("\n".join(lines) + "\n")


def where_chosen(records: list[dict], model) -> list[str]:
    """Per projection type: the share of its dense parameters the allocation kept, and how many stay dense."""
    lines = ["", "Where the allocation put the parameters (share of each projection's dense weight kept):", ""]
    for r in (r for r in records if r["plan"] == "auto"):
        kept: dict[str, list[float]] = {}
        for name, choice in r["layers"].items():
            kind = name.rsplit(".", 1)[-1]
            kept.setdefault(kind, []).append(choice["params"] / model.get_submodule(name).weight.numel())
        cells = ", ".join(f"{kind} {sum(v) / len(v):.2f} ({sum(x >= 1 for x in v)} dense)" for kind, v in kept.items())
        lines.append(f"- target {r['target_ratio']:.2f}: {cells}")
    return lines


if __name__ == "__main__":
    main()
