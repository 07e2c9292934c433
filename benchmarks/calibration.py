"""Data-free against calibrated compression, no distillation: the house teacher and SmolLM2-135M.

    python benchmarks/calibration.py [--models house-teacher smollm2-135m] [--calibration-tokens 32768]
        [--max-tokens 8000] [--time-budget 5] [--lambada-passages 200]

Rows per model: plain Kronecker ("kronecker"), Kronecker + permutations ("kronecker+perm") and
truncated SVD at the same per-module parameter count ("svd"), each data-free and calibrated, plus the
dense model. House teacher: the ``tqcompressedgpt2`` preset (14.1M). SmolLM2-135M (fetched with
``../shared/assets/smollm2/fetch.sh``; needs ``gguf``): every MLP ``gate/up/down_proj`` halved (r=4,
B 2x4 / 4x2). Calibration text: ``corpus/gutenberg/train`` only. Every row of a model is evaluated on
the same token caps. Writes benchmarks/results/calibration.{json,md,png}; records are appended to the
JSON as they finish, so a run can be resumed with --resume.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from common import ASSETS, RESULTS, command_history, heldout_ids, load_smollm2, machine, machine_labels

import tqcompressor as tq
from tqcompressor.calibration import collect
from tqcompressor.data import load_blocks
from tqcompressor.evaluation import lambada, lambada_passages, perplexity, read_text
from tqcompressor.loading import load_model
from tqcompressor.presets import halved_mlp_rules, matching_svd_plan
from tqcompressor.surgery import resolve


def load_house_teacher() -> tuple[torch.nn.Module, object]:
    return load_model(str(ASSETS / "house-teacher"))


def mlp_halved(model, permute: bool, time_budget: float) -> tq.CompressionPlan:
    search = {"time_budget": time_budget} if permute else {}
    rules = halved_mlp_rules(model.config, r"\d+", permute, **search)
    return tq.CompressionPlan(rules, name="mlp-half" + ("-perm" if permute else ""))


def plans(name: str, model, time_budget: float) -> dict[str, tq.CompressionPlan]:
    if name == "house-teacher":
        perm = tq.preset("tqcompressedgpt2", model.config, time_budget=time_budget)
        plain = tq.preset("kngpt2", model.config)
    else:
        perm, plain = mlp_halved(model, True, time_budget), mlp_halved(model, False, time_budget)
    return {"kronecker": plain, "kronecker+perm": perm, "svd": matching_svd_plan(model, perm)}


def evaluate(model, texts: dict[str, list[int]], passages, tokenizer, window: int) -> dict:
    record = {
        f"{key}_ppl": perplexity(model, ids, max_length=window, progress=False)["ppl"] for key, ids in texts.items()
    }
    if passages:
        record["lambada_acc"] = lambada(model, tokenizer, passages, progress=False)["acc"]
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["house-teacher", "smollm2-135m"])
    parser.add_argument("--calibration-tokens", type=int, default=32_768)
    parser.add_argument("--max-tokens", type=int, default=8_000, help="tokens scored per perplexity set")
    parser.add_argument("--max-length", type=int, default=512, help="perplexity window")
    parser.add_argument("--lambada-passages", type=int, default=200, help="SmolLM2 only")
    parser.add_argument("--time-budget", type=float, default=5.0, help="permutation search seconds per layer")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--resume", action="store_true", help="keep finished records in calibration.json")
    parser.add_argument("--methods", nargs="+", default=["kronecker", "kronecker+perm", "svd"], help="in this order")
    parser.add_argument("--from-json", action="store_true", help="only rewrite the markdown and plot")
    args = parser.parse_args()
    path = args.out / "calibration.json"
    data = json.loads(path.read_text()) if (args.resume or args.from_json) and path.exists() else None
    data = data or {"meta": {}, "records": []}
    if not args.from_json:
        command = "python benchmarks/calibration.py " + " ".join(
            f"--{k.replace('_', '-')} {' '.join(v) if isinstance(v, list) else v}"
            for k, v in vars(args).items()
            if k not in ("out", "resume", "from_json")
        )
        commands = command_history(data["meta"], command + (" --resume" if args.resume else ""))
        data["meta"] = {"commands": commands}
        args.out.mkdir(parents=True, exist_ok=True)
        for name in args.models:
            run_model(name, args, data, path)
    write_report(data, args.out)


def run_model(name: str, args, data: dict, path: Path) -> None:
    done = {(r["model"], r["method"], r["calibrated"]) for r in data["records"]}
    model, tokenizer = load_smollm2() if name == "smollm2-135m" else load_house_teacher()
    heldout = heldout_ids(tokenizer)
    texts = {"heldout": heldout[: args.max_tokens + 1]}
    passages = []
    if name == "smollm2-135m":
        texts["wikitext2"] = tokenizer(read_text("wikitext2"), verbose=False)["input_ids"][: args.max_tokens + 1]
        passages = lambada_passages()[: args.lambada_passages]

    def record(method: str, calibrated: bool, compressed, extra: dict) -> None:
        row = {
            "model": name,
            "method": method,
            "calibrated": calibrated,
            "params": tq.count_parameters(compressed),
            "machine": machine(),
        }
        started = time.perf_counter()
        row.update(
            evaluate(compressed, texts, passages, tokenizer, args.max_length),
            eval_seconds=time.perf_counter() - started,
            **extra,
        )
        data["records"].append(row)
        path.write_text(json.dumps(data, indent=1))
        print(json.dumps({k: v for k, v in row.items() if k != "layers"}), flush=True)

    if (name, "dense", False) not in done:
        record("dense", False, model, {})
    text = load_blocks(ASSETS / "corpus/gutenberg/train", tokenizer, args.max_length, args.calibration_tokens, seed=0)
    blocks = torch.cat([text.train, text.heldout])
    all_plans = plans(name, model, args.time_budget)
    targets = dict.fromkeys(name for plan in all_plans.values() for _, name in resolve(model, plan))
    stats = collect(model, list(targets), blocks, progress=False)
    for method in args.methods:
        plan = all_plans[method]
        for calibrated in (False, True):
            if (name, method, calibrated) in done:
                continue
            compressed = copy.deepcopy(model)
            started = time.perf_counter()
            report = tq.compress_(compressed, plan, calibration=stats if calibrated else None, progress=False)
            layers = [
                {
                    "name": l.name,
                    "objective": l.objective,
                    "error_plain": l.error_plain,
                    "error": l.error,
                    "best_start": l.best_start,
                    "seconds": l.seconds,
                    **l.details,
                }
                for l in report.layers
            ]
            extra = {
                "compress_seconds": time.perf_counter() - started,
                "calibration_seconds": stats.seconds if calibrated else 0.0,
                "layers": layers,
            }
            record(method, calibrated, compressed.eval(), extra)


def write_report(data: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = data["records"]
    machines, legend = machine_labels(records)
    lines = [
        "# Calibrated against data-free compression (no distillation)",
        "",
        "Commands, in order: "
        + "; ".join(f"`{c}`" for c in data["meta"].get("commands", [data["meta"].get("command")]))
        + ".",
        legend,
        "Calibration text: `corpus/gutenberg/train`; held-out perplexity on `corpus/gutenberg/heldout`.",
        "",
        "| model | method | calibrated | params | held-out ppl | WikiText-2 ppl | LAMBADA acc | compress s | machine |",
        "|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in records:
        lines.append(
            f"| {r['model']} | {r['method']} | {'yes' if r['calibrated'] else 'no'} | {r['params']:,} | "
            f"{r['heldout_ppl']:.1f} | "
            + (f"{r['wikitext2_ppl']:.1f}" if "wikitext2_ppl" in r else "—")
            + " | "
            + (f"{r['lambada_acc']:.3f}" if "lambada_acc" in r else "—")
            + f" | {r.get('compress_seconds', 0):.0f} | {machines[r['machine']]} |"
        )
    measured = {(r["model"], r["method"], r["calibrated"]) for r in records}
    missing = [
        f"{model} {method} ({'calibrated' if calibrated else 'data-free'})"
        for model in dict.fromkeys(r["model"] for r in records)
        for method in ("kronecker", "kronecker+perm", "svd")
        for calibrated in (False, True)
        if (model, method, calibrated) not in measured
    ]
    if missing:
        lines += ["", f"Not measured in this run (stopped for time; `--resume` adds them): {', '.join(missing)}."]
    lines += ["", "## Targets", ""]
    for model, limit in (("house-teacher", 300.0), ("smollm2-135m", 100.0)):
        rows = [r for r in records if r["model"] == model]
        calibrated = [r for r in rows if r["calibrated"]]
        if not calibrated:
            lines.append(f"- {model}: not measured in this run.")
            continue
        best = min(calibrated, key=lambda r: r["heldout_ppl"])
        verdict = "met" if best["heldout_ppl"] <= limit else f"missed by {best['heldout_ppl'] / limit:.1f}x"
        lines.append(
            f"- {model}: best calibrated row ({best['method']}) held-out ppl {best['heldout_ppl']:.1f}, "
            f"target <= {limit:.0f}: {verdict}."
        )
        dense = next((r for r in rows if r["method"] == "dense"), None)
        if dense is not None and model == "smollm2-135m":
            ratio = best["heldout_ppl"] / dense["heldout_ppl"]
            lines.append(f"  Stretch (within 2x of the original's {dense['heldout_ppl']:.1f}): {ratio:.1f}x.")
        by_method = {r["method"]: r for r in calibrated}
        if "kronecker+perm" in by_method and "svd" in by_method:
            ratio = by_method["kronecker+perm"]["heldout_ppl"] / by_method["svd"]["heldout_ppl"]
            verdict = "met" if ratio <= 1 else f"missed: {ratio:.1f}x the SVD perplexity"
            lines.append(f"  Calibrated Kronecker + permutations at least matching calibrated SVD: {verdict}.")
    for model in dict.fromkeys(r["model"] for r in records):
        rows = [r for r in records if r["model"] == model and r.get("layers") and r["calibrated"]]
        if not rows:
            continue
        lines += [
            "",
            f"Per-layer calibrated relative error ‖X(W − Ŵ)‖/‖XW‖ of the installed layers, {model}:",
            "",
        ]
        lines += ["| layer | " + " | ".join(r["method"] for r in rows) + " |", "|---|" + "---:|" * len(rows)]
        for i, layer in enumerate(rows[0]["layers"]):
            cells = []
            for r in rows:
                other = r["layers"][i] if i < len(r["layers"]) else None
                cells.append("—" if other is None else f"{other['error']:.3f}")
            lines.append(f"| {layer['name']} | " + " | ".join(cells) + " |")
    (out / "calibration.md").write_text("\n".join(lines) + "\n")

    models = list(dict.fromkeys(r["model"] for r in records))
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        for r in (r for r in records if r["model"] == model):
            label = r["method"] + (" (calibrated)" if r["calibrated"] else "")
            ax.scatter(r["params"] / 1e6, r["heldout_ppl"], marker="o" if r["calibrated"] else "x", label=label)
        ax.set_yscale("log")
        ax.set_xlabel("parameters (M)")
        ax.set_ylabel("held-out perplexity")
        ax.set_title(model)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "calibration.png", dpi=120)


if __name__ == "__main__":
    main()
