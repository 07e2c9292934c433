"""Budget allocation against uniform plans at the same size, calibrated, no distillation.

    python benchmarks/allocation.py [--models house-teacher smollm2-135m] [--ratios 0.7 0.5]
        [--calibration-tokens 32768] [--sensitivity-tokens 1024] [--max-tokens 8000] [--resume]

Plans per model and budget (every one fitted to the same calibration statistics):

- ``auto``: the allocator's choice among dense, whitened low-rank and Kronecker for every linear layer
  but the head, and low-rank for the token embedding (tied head counted once), by estimated relative
  output error;
- ``auto-sensitivity``: the same with every module's losses weighted by its measured sensitivity (KL
  of the output with that module alone at a probe, on ``--sensitivity-tokens`` calibration tokens);
- a uniform plan at the same size: SmolLM2: every linear layer low-rank at one rank ratio
  (``uniform-svd``); house teacher: the best uniform calibrated plan of benchmarks/calibration.py,
  truncated SVD at the ``tqcompressedgpt2`` module sizes, calibrated (``uniform-svd-tq``).

House teacher at the ``tqcompressedgpt2`` size (14.1M); SmolLM2-135M (``../shared/assets/smollm2/fetch.sh``)
at ``--ratios`` of its parameters. Calibration text: ``corpus/gutenberg/train``; held-out perplexity on
``corpus/gutenberg/heldout`` (SmolLM2 also WikiText-2 and LAMBADA). Records are appended to
benchmarks/results/allocation.json as they finish (``--resume`` keeps them); allocation.md is rewritten.
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
from tqcompressor.allocation import allocation_plan, compressible_modules, linear_layers
from tqcompressor.calibration import collect
from tqcompressor.data import load_blocks
from tqcompressor.evaluation import lambada, lambada_passages, perplexity, read_text
from tqcompressor.loading import load_model
from tqcompressor.presets import matching_svd_plan
from tqcompressor.surgery import planned_parameters


def uniform_svd(model, names: list[str], target: int) -> tq.CompressionPlan:
    """Every layer in ``names`` low-rank at the one ratio whose total is ``target`` (ranks rounded)."""
    linear = sum(model.get_submodule(n).weight.numel() for n in names)
    ratio = 1 - (tq.count_parameters(model) - target) / linear
    config = tq.LowRankConfig(ratio=ratio)
    return tq.CompressionPlan([tq.Rule(re.escape(n), config) for n in names], name=f"uniform-svd-{ratio:.3f}")


def budgets(name: str, model, ratios: list[float]) -> list[tuple[float, int, str, tq.CompressionPlan]]:
    """(target ratio, target params, uniform plan's name, uniform plan) per budget."""
    if name == "house-teacher":
        preset = tq.preset("tqcompressedgpt2", model.config)
        size = planned_parameters(model, preset)
        return [(size / tq.count_parameters(model), size, "uniform-svd-tq", matching_svd_plan(model, preset))]
    total = tq.count_parameters(model)
    return [
        (r, round(r * total), "uniform-svd", uniform_svd(model, linear_layers(model), round(r * total))) for r in ratios
    ]


def evaluate(model, texts: dict[str, list[int]], passages, tokenizer) -> dict:
    model.eval()
    record = {f"{k}_ppl": perplexity(model, ids, max_length=512, progress=False)["ppl"] for k, ids in texts.items()}
    if passages:
        record["lambada_acc"] = lambada(model, tokenizer, passages, progress=False)["acc"]
    return record


def run_model(name: str, args, data: dict, path) -> None:
    done = {(r["model"], r["plan"], r.get("target_ratio")) for r in data["records"]}
    model, tokenizer = load_smollm2() if name == "smollm2-135m" else load_model(str(ASSETS / "house-teacher"))
    model.eval()
    texts = {"heldout": heldout_ids(tokenizer, args.max_tokens)}
    passages = []
    if name == "smollm2-135m":
        texts["wikitext2"] = tokenizer(read_text("wikitext2"), verbose=False)["input_ids"][: args.max_tokens + 1]
        passages = lambada_passages()[: args.lambada_passages]

    def record(row: dict, compressed) -> None:
        row.update(
            model=name, params=tq.count_parameters(compressed), **evaluate(compressed, texts, passages, tokenizer)
        )
        data["records"].append(row)
        path.write_text(json.dumps(data, indent=1))
        print(json.dumps({k: v for k, v in row.items() if k != "layers"}), flush=True)

    if (name, "dense", None) not in done:
        record({"plan": "dense", "target_ratio": None}, model)
    text = load_blocks(ASSETS / "corpus/gutenberg/train", tokenizer, 512, args.calibration_tokens, seed=0)
    blocks = torch.cat([text.train, text.heldout])
    started = time.perf_counter()
    stats = collect(model, compressible_modules(model), blocks, progress=False)
    calibration_seconds = time.perf_counter() - started
    probe_blocks = blocks[: max(1, args.sensitivity_tokens // blocks.shape[1])]
    for ratio, target, uniform_name, uniform in budgets(name, model, args.ratios):
        plans = {}
        for plan_name, sensitivity in (("auto", None), ("auto-sensitivity", probe_blocks)):
            if (name, plan_name, ratio) not in done:
                plans[plan_name] = allocation_plan(model, stats, target, sensitivity)
        for plan_name, allocation in plans.items():
            compressed = copy.deepcopy(model)
            started = time.perf_counter()
            tq.compress_(compressed, allocation.plan, calibration=stats, progress=False)
            chosen = allocation.chosen
            row = {
                "plan": plan_name,
                "target_ratio": ratio,
                "target_params": target,
                "search_seconds": allocation.seconds,
                "calibration_seconds": calibration_seconds,
                "compress_seconds": time.perf_counter() - started,
                "chosen": dict(Counter(c.method for c in chosen.values())),
                "layers": {
                    n: {"method": c.method, "params": c.params, "dense": model.get_submodule(n).weight.numel()}
                    for n, c in chosen.items()
                },
            }
            record(row, compressed)
            del compressed
        if (name, uniform_name, ratio) not in done:
            compressed = copy.deepcopy(model)
            started = time.perf_counter()
            tq.compress_(compressed, uniform, calibration=stats, progress=False)
            row = {"plan": uniform_name, "target_ratio": ratio, "target_params": target}
            record({**row, "compress_seconds": time.perf_counter() - started}, compressed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["house-teacher", "smollm2-135m"])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.7, 0.5], help="SmolLM2 budgets")
    parser.add_argument("--calibration-tokens", type=int, default=32_768)
    parser.add_argument("--sensitivity-tokens", type=int, default=1024)
    parser.add_argument("--max-tokens", type=int, default=8_000)
    parser.add_argument("--lambada-passages", type=int, default=200, help="SmolLM2 only")
    parser.add_argument("--resume", action="store_true", help="keep finished records in allocation.json")
    parser.add_argument("--from-json", action="store_true", help="only rewrite the markdown")
    args = parser.parse_args()
    path = RESULTS / "allocation.json"
    data = json.loads(path.read_text()) if (args.resume or args.from_json) and path.exists() else None
    if data is None or "models" not in data["meta"]:
        data = {"meta": {"models": args.models}, "records": []}
    if not args.from_json:
        data["meta"] = {
            "command": "python benchmarks/allocation.py "
            + " ".join(
                f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                for k, v in vars(args).items()
                if k not in ("from_json", "resume")
            ),
            "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
            "models": args.models,
        }
        RESULTS.mkdir(parents=True, exist_ok=True)
        for name in args.models:
            run_model(name, args, data, path)
    write_report(data)


def write_report(data: dict) -> None:
    meta, records = data["meta"], data["records"]
    lines = [
        "# Budget allocation against uniform plans (calibrated, no distillation)",
        "",
        f"Command: `{meta['command']}` on {meta['machine']}.",
        "",
        "| model | plan | target | params | held-out ppl | WikiText-2 ppl | LAMBADA acc | chosen | search s |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in records:
        chosen = ", ".join(f"{k} {v}" for k, v in r.get("chosen", {}).items())
        wikitext = f"{r['wikitext2_ppl']:.1f}" if "wikitext2_ppl" in r else "—"
        acc = f"{r['lambada_acc']:.3f}" if "lambada_acc" in r else "—"
        target = f"{r['target_ratio']:.2f}" if r.get("target_ratio") else "1.00"
        lines.append(
            f"| {r['model']} | {r['plan']} | {target} | {r['params']:,} | {r['heldout_ppl']:.1f} | {wikitext} "
            f"| {acc} | {chosen} | {r.get('search_seconds', 0):.0f} |"
        )
    lines += ["", "Auto against the best uniform plan at the same budget (target: ≥ 20% lower held-out ppl):", ""]
    for model in dict.fromkeys(r["model"] for r in records):
        for ratio in dict.fromkeys(r["target_ratio"] for r in records if r["model"] == model and r["target_ratio"]):
            rows = {r["plan"]: r for r in records if r["model"] == model and r["target_ratio"] == ratio}
            uniform = min(
                (r for p, r in rows.items() if p.startswith("uniform")), key=lambda r: r["heldout_ppl"], default=None
            )
            if uniform is None:
                continue
            for plan in ("auto", "auto-sensitivity"):
                if plan in rows:
                    change = 1 - rows[plan]["heldout_ppl"] / uniform["heldout_ppl"]
                    verdict = "met" if change >= 0.2 else "missed"
                    lines.append(
                        f"- {model} at {ratio:.2f}: {plan} {rows[plan]['heldout_ppl']:.1f} vs {uniform['plan']} "
                        f"{uniform['heldout_ppl']:.1f}: {abs(change):.0%} {'lower' if change >= 0 else 'higher'} "
                        f"({verdict})"
                    )
    for model in meta.get("models", []):
        if not any(r["model"] == model and r["plan"] != "dense" for r in records):
            lines.append(f"- {model}: no compressed row yet (`--resume` continues the run)")
    lines += where_chosen(records)
    (RESULTS / "allocation.md").write_text("\n".join(lines) + "\n")


def where_chosen(records: list[dict]) -> list[str]:
    """Per module kind: the share of its dense parameters the allocation kept, and how many stay dense."""
    lines = ["", "Where the allocation put the parameters (share of each kind's dense weight kept):", ""]
    for r in (r for r in records if r["plan"].startswith("auto")):
        kept: dict[str, list[float]] = {}
        for name, choice in r["layers"].items():
            kept.setdefault(name.rsplit(".", 1)[-1], []).append(choice["params"] / choice["dense"])
        cells = ", ".join(f"{kind} {sum(v) / len(v):.2f} ({sum(x >= 1 for x in v)} dense)" for kind, v in kept.items())
        methods = Counter(
            (name.rsplit(".", 1)[-1], c["method"]) for name, c in r["layers"].items() if c["method"] != "dense"
        )
        lines.append(f"- {r['model']} {r['plan']} at {r['target_ratio']:.2f}: {cells}")
        lines.append(f"  methods: {', '.join(f'{kind} {m} x{n}' for (kind, m), n in sorted(methods.items()))}")
    return lines


if __name__ == "__main__":
    main()
