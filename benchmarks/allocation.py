"""Budget allocation against uniform plans at the same size, calibrated, no distillation.

    python benchmarks/allocation.py [--models house-teacher smollm2-135m gpt2-small-random] [--ratios 0.7 0.5]
        [--calibration-tokens 32768] [--sensitivity-tokens 1024] [--count-tokens 4194304] [--max-tokens 8000]
        [--sequential [--only-sequential]] [--fisher] [--reconstruction-epochs E] [--resume]

Plans per model and budget (every one fitted to the same calibration statistics):

- ``auto``: the allocator's choice among dense, whitened low-rank and Kronecker with and without
  permutations for every linear layer but the head, and low-rank or Kronecker for the token embedding
  (tied head counted once), by estimated relative output error;
- ``auto-sensitivity``: the same with every module's losses weighted by its measured sensitivity (KL
  of the output with that module alone at a probe, then at the candidate a first choice gave it, on
  ``--sensitivity-tokens`` calibration tokens);
- ``auto-sensitivity-sequential`` (with ``--sequential``): the same choice among low-rank candidates
  only, fitted by ``compress_sequentially`` (part by part, each part on the inputs the model compressed
  so far gives it, aimed at the original model's outputs); ``--sequential`` also fits the uniform SVD
  plan that way (``uniform-svd-sequential``, ``uniform-svd-tq-sequential``), for a like-for-like
  comparison; both leave the layers the plan keeps dense as they are (``aim_dense=False``);
- ``auto-sensitivity-sequential-aim-dense`` (with ``--sequential``): that row's plan, rebuilt from its
  record, refitted with the layers it keeps dense aimed too (the library's default);
- with ``--fisher``, the statistics also hold the Fisher output metrics (``collect(..., fisher=True)``):
  ``auto-fisher`` prices every linear layer's candidates in KL from them and measures only the
  embedding (on the sensitivity tokens), and every low-rank layer is fitted with the output metric;
  ``uniform-svd-fisher`` is the uniform SVD plan fitted the same way; with ``--sequential`` also
  ``auto-fisher-sequential`` (low-rank candidates, fitted part by part with the output metrics and the
  dense layers aimed) and ``uniform-svd-fisher-sequential``;
- with ``--fisher --sequential --reconstruction-epochs E`` also ``auto-fisher-sequential-reconstructed-E``
  and ``uniform-svd-fisher-sequential-reconstructed-E``: those fits followed in every block by E passes of
  block reconstruction (``compress_sequentially(..., reconstruction_epochs=E)``);
- uniform plans at the same size: SmolLM2: every linear layer low-rank at one rank ratio
  (``uniform-svd``), or Kronecker at that ratio without permutations (``uniform-kronecker``; a
  permutation search on all 210 layers would take most of an hour here); house teacher: the best
  uniform calibrated plan of benchmarks/calibration.py, truncated SVD at the ``tqcompressedgpt2``
  module sizes, calibrated (``uniform-svd-tq``).

House teacher at the ``tqcompressedgpt2`` size (14.1M); SmolLM2-135M (``../shared/assets/smollm2/fetch.sh``)
at ``--ratios`` of its parameters; ``gpt2-small-random`` only times the search (both plans, at 60%).
Calibration text: ``corpus/gutenberg/train``, the token embedding weighted by the token counts of its
first ``--count-tokens`` tokens (the CLI's default); held-out perplexity on ``corpus/gutenberg/heldout``
(SmolLM2 also WikiText-2 and LAMBADA). Records are appended to benchmarks/results/allocation.json as
they finish (``--resume`` keeps them; delete a record to redo it); allocation.md is rewritten.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import time
from collections import Counter
from dataclasses import replace

import torch
from common import (
    ASSETS,
    RESULTS,
    TARGET_LOWER,
    command_history,
    command_line,
    heldout_ids,
    load_smollm2,
    machine,
    machine_labels,
)
from transformers import GPT2Config, GPT2LMHeadModel

import tqcompressor as tq
from tqcompressor.allocation import allocation_plan, compressible_modules, linear_layers
from tqcompressor.calibration import collect, fisher_moments
from tqcompressor.cli import DEFAULT_COUNT_TOKENS
from tqcompressor.data import id_counts, pack_blocks, token_ids
from tqcompressor.evaluation import lambada, lambada_passages, perplexity, read_text
from tqcompressor.linalg import OUTPUT_RIDGE
from tqcompressor.loading import load_model
from tqcompressor.presets import matching_svd_plan
from tqcompressor.reconstruction import RECONSTRUCTION_LR
from tqcompressor.sequential import compress_sequentially
from tqcompressor.surgery import planned_parameters

# What the allocator offered every layer when a record was made (older records lack the field).
CANDIDATES = "low-rank; Kronecker with and without permutations; embedding low-rank and Kronecker"
GPT2_SMALL_RATIO = 0.6
# Auto with sensitivity, low-rank candidates only (Kronecker was never chosen, and pricing it is most of
# the search), fitted by compress_sequentially: part by part, aimed at the original model's outputs.
SEQUENTIAL = "auto-sensitivity-sequential"
# The same chosen plan refitted with the layers it keeps dense aimed too (the library's default).
AIM_DENSE = "auto-sensitivity-sequential-aim-dense"
FISHER = "auto-fisher"
FISHER_SEQUENTIAL = "auto-fisher-sequential"
MODELS = ["house-teacher", "smollm2-135m", "gpt2-small-random"]


def recorded_plan(model, record: dict) -> tq.CompressionPlan:
    """The low-rank plan a record chose, rebuilt from the parameters it gave each module."""
    rules = []
    for name, layer in record["layers"].items():
        if layer["method"] == "dense":
            continue
        if layer["method"] != "lowrank":
            raise ValueError(f"{name}: only low-rank choices can be rebuilt, got {layer['method']}")
        rank, rest = divmod(layer["params"], sum(model.get_submodule(name).weight.shape))
        if rest:
            raise ValueError(f"{name}: {layer['params']} parameters are no low-rank size")
        rules.append(tq.Rule(re.escape(name), tq.LowRankConfig(rank=rank)))
    return tq.CompressionPlan(rules, name=record["plan"])


def linear_ratio(model, names: list[str], target: int) -> float:
    """The share of the layers in ``names`` to keep so that the whole model has ``target`` parameters."""
    linear = sum(model.get_submodule(n).weight.numel() for n in names)
    return 1 - (tq.count_parameters(model) - target) / linear


def uniform_plan(model, names: list[str], target: int, method: str) -> tq.CompressionPlan:
    """Every layer in ``names`` at one ratio whose total is ``target``: low-rank (ranks rounded) or
    Kronecker without permutations (shapes proposed per layer, so the total lands near the target)."""
    ratio = linear_ratio(model, names, target)
    config = tq.LowRankConfig(ratio=ratio) if method == "svd" else tq.KroneckerConfig(ratio=ratio, permute=False)
    return tq.CompressionPlan([tq.Rule(re.escape(n), config) for n in names], name=f"uniform-{method}-{ratio:.3f}")


def budgets(name: str, model, ratios: list[float]) -> list[tuple[float, int, dict[str, tq.CompressionPlan]]]:
    """(target ratio, target params, uniform plans by record name) per budget."""
    if name == "house-teacher":
        preset = tq.preset("tqcompressedgpt2", model.config)
        size = planned_parameters(model, preset)
        return [(size / tq.count_parameters(model), size, {"uniform-svd-tq": matching_svd_plan(model, preset)})]
    total = tq.count_parameters(model)
    found = []
    for ratio in ratios:
        target = round(ratio * total)
        plans = {f"uniform-{m}": uniform_plan(model, linear_layers(model), target, m) for m in ("svd", "kronecker")}
        found.append((ratio, target, plans))
    return found


def label(candidate) -> str:
    """The method, and whether a Kronecker candidate searches permutations."""
    permuted = candidate.method == "kronecker" and candidate.config.permute is not False
    return f"{candidate.method}{'+perm' if permuted else ''}"


def evaluation_texts(tokenizer, max_tokens: int, passages: int | None) -> tuple[dict[str, list[int]], list[str]]:
    """What ``evaluate`` scores: (held-out token ids, and unless ``passages`` is None also WikiText-2's;
    the first ``passages`` LAMBADA passages)."""
    texts = {"heldout": heldout_ids(tokenizer, max_tokens)}
    if passages is None:
        return texts, []
    texts["wikitext2"] = tokenizer(read_text("wikitext2"), verbose=False)["input_ids"][: max_tokens + 1]
    return texts, lambada_passages()[:passages]


def evaluate(model, texts: dict[str, list[int]], passages, tokenizer) -> dict:
    model.eval()
    record = {f"{k}_ppl": perplexity(model, ids, max_length=512, progress=False)["ppl"] for k, ids in texts.items()}
    if passages:
        scored = lambada(model, tokenizer, passages, progress=False)
        record.update(lambada_acc=scored["acc"], lambada_ppl=scored["ppl"])
    return record


def calibrate(model, tokenizer, args, seed: int = 0, spread: bool = False):
    """(statistics of every compressible module, their seconds, the calibration blocks, the first
    ``--sensitivity-tokens`` of them for the sensitivity probe, the embedding's token counts on
    ``--count-tokens`` of the text as the CLI takes them). ``seed`` orders the books, so it picks the text;
    ``spread`` draws the blocks at random from those ``--count-tokens`` rather than reading the first books."""
    ids = token_ids(ASSETS / "corpus/gutenberg/train", tokenizer, args.count_tokens, seed=seed)
    # The first books' blocks are the first ids; spread blocks come from all of them.
    text = pack_blocks(ids if spread else ids[: args.calibration_tokens], 512, args.calibration_tokens, seed=seed)
    blocks = torch.cat([text.train, text.heldout])
    counts = id_counts(ids, model.get_input_embeddings().num_embeddings)
    started = time.perf_counter()
    stats = collect(model, compressible_modules(model), blocks, progress=False, token_counts=counts)
    seconds = time.perf_counter() - started
    return stats, seconds, blocks, blocks[: max(1, args.sensitivity_tokens // blocks.shape[1])], counts


def with_fisher(model, stats, blocks):
    """``stats`` and the Fisher output metrics of every linear layer on the same blocks, and their seconds."""
    started = time.perf_counter()
    outputs = fisher_moments(model, linear_layers(model), blocks, progress=False)
    return replace(stats, outputs=outputs), time.perf_counter() - started


def run_model(name: str, args, data: dict, path) -> None:
    done = {(r["model"], r["plan"], r.get("target_ratio")) for r in data["records"]}
    model, tokenizer = load_smollm2() if name == "smollm2-135m" else load_model(str(ASSETS / "house-teacher"))
    model.eval()
    wide = name == "smollm2-135m"  # also WikiText-2 and LAMBADA
    texts, passages = evaluation_texts(tokenizer, args.max_tokens, args.lambada_passages if wide else None)

    def record(row: dict, compressed) -> None:
        row.update(
            model=name,
            params=tq.count_parameters(compressed),
            machine=machine(),
            **evaluate(compressed, texts, passages, tokenizer),
        )
        data["records"].append(row)
        path.write_text(json.dumps(data, indent=1))
        print(json.dumps({k: v for k, v in row.items() if k != "layers"}), flush=True)

    if (name, "dense", None) not in done:
        record({"plan": "dense", "target_ratio": None}, model)
    stats, calibration_seconds, blocks, probe_blocks, counts = calibrate(model, tokenizer, args)
    counted = {"count_tokens": int(counts.sum())}

    fisher, fisher_seconds = with_fisher(model, stats, blocks) if args.fisher else (None, 0.0)

    def fit(
        compressed, plan, sequential: bool, aim_dense: bool = False, weighted: bool = False, epochs: int = 0
    ) -> None:
        calibration = fisher if weighted else stats
        if sequential:
            compress_sequentially(
                compressed,
                plan,
                blocks,
                progress=False,
                aim_dense=aim_dense,
                token_counts=counts,
                output_moments=calibration.outputs,
                reconstruction_epochs=epochs,
            )
        else:
            tq.compress_(compressed, plan, calibration=calibration, progress=False)

    epochs = args.reconstruction_epochs
    reconstructed = f"{FISHER_SEQUENTIAL}-reconstructed-{epochs}" if epochs else ""
    fisher_sequential = [p for p in (FISHER_SEQUENTIAL, reconstructed) if p] if args.fisher and args.sequential else []
    for ratio, target, uniforms in budgets(name, model, args.ratios):
        plans = {}
        for plan_name, sensitivity in (("auto", None), ("auto-sensitivity", probe_blocks)):
            if (name, plan_name, ratio) not in done and not args.only_sequential:
                plans[plan_name] = allocation_plan(model, stats, target, sensitivity)
        if args.sequential and (name, SEQUENTIAL, ratio) not in done:
            plans[SEQUENTIAL] = allocation_plan(model, stats, target, probe_blocks, methods=["lowrank"])
        if args.fisher and (name, FISHER, ratio) not in done and not args.only_sequential:
            plans[FISHER] = allocation_plan(model, fisher, target, probe_blocks)
        wanted = [p for p in fisher_sequential if (name, p, ratio) not in done]
        if wanted:  # one choice for the fits with and without reconstruction
            choice = allocation_plan(model, fisher, target, probe_blocks, methods=["lowrank"])
            plans.update(dict.fromkeys(wanted, choice))
        for plan_name, allocation in plans.items():
            compressed = copy.deepcopy(model)
            started = time.perf_counter()
            sequential = plan_name in (SEQUENTIAL, *fisher_sequential)
            weighted = plan_name in (FISHER, *fisher_sequential)
            passes = epochs if plan_name == reconstructed else 0
            aim_dense = plan_name in fisher_sequential
            fit(compressed, allocation.plan, sequential, aim_dense=aim_dense, weighted=weighted, epochs=passes)
            chosen = allocation.chosen
            row = {
                "plan": plan_name,
                **reconstruction_fields(passes),
                "target_ratio": ratio,
                "target_params": target,
                **counted,
                "candidates": "low-rank" if sequential else CANDIDATES,
                # KL measured at the probe, then at the first choice's candidates (older records: probe only).
                "sensitivity_points": None if plan_name == "auto" else "probe + first choice",
                "search_seconds": allocation.seconds,
                "calibration_seconds": calibration_seconds + (fisher_seconds if weighted else 0.0),
                **({"fisher_seconds": fisher_seconds, "output_ridge": OUTPUT_RIDGE} if weighted else {}),
                "compress_seconds": time.perf_counter() - started,
                "chosen": dict(Counter(label(c) for c in chosen.values())),
                "layers": {
                    n: {"method": label(c), "params": c.params, "dense": model.get_submodule(n).weight.numel()}
                    for n, c in chosen.items()
                },
            }
            record(row, compressed)
            del compressed
        key = (name, SEQUENTIAL, ratio)
        earlier = next((r for r in data["records"] if (r["model"], r["plan"], r["target_ratio"]) == key), None)
        if args.sequential and earlier is not None and (name, AIM_DENSE, ratio) not in done:
            compressed = copy.deepcopy(model)
            started = time.perf_counter()
            fit(compressed, recorded_plan(model, earlier), sequential=True, aim_dense=True)
            row = {"plan": AIM_DENSE, "target_ratio": ratio, "target_params": target, "aim_dense": True, **counted}
            copied = ("candidates", "sensitivity_points", "chosen", "layers")
            row.update({k: earlier[k] for k in copied if k in earlier})
            record({**row, "compress_seconds": time.perf_counter() - started}, compressed)
        fits = [(uniform_name, uniform, False, False, 0) for uniform_name, uniform in uniforms.items()]
        if args.sequential:  # the same fit for the best uniform plan, so that the comparison is like for like
            fits += [(f"{n}-sequential", u, True, False, 0) for n, u in uniforms.items() if n.startswith("uniform-svd")]
        if args.fisher:
            svd = [(n, u) for n, u in uniforms.items() if n.startswith("uniform-svd")]
            fits += [(f"{n}-fisher", u, False, True, 0) for n, u in svd]
            fits += [(f"{n}-fisher-sequential", u, True, True, 0) for n, u in svd if args.sequential]
            if args.sequential and reconstructed:
                fits += [(f"{n}-fisher-sequential-reconstructed-{epochs}", u, True, True, epochs) for n, u in svd]
        for uniform_name, uniform, sequential, weighted, passes in fits:
            if (name, uniform_name, ratio) in done:
                continue
            compressed = copy.deepcopy(model)
            started = time.perf_counter()
            fit(compressed, uniform, sequential, aim_dense=sequential and weighted, weighted=weighted, epochs=passes)
            row = {"plan": uniform_name, "target_ratio": ratio, "target_params": target, **counted}
            row.update(reconstruction_fields(passes))
            if weighted:
                row["output_ridge"] = OUTPUT_RIDGE
            record({**row, "compress_seconds": time.perf_counter() - started}, compressed)


def time_gpt2_small(args, data: dict, path) -> None:
    """The allocation's cost at GPT-2-small size (random weights from ``GPT2Config()``; no quality)."""
    if any(r["model"] == "gpt2-small-random" for r in data["records"]):
        return
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config()).eval()
    tokenizer = load_model(str(ASSETS / "house-teacher"))[1]  # the GPT-2 tokenizer
    stats, calibration_seconds, blocks, probe_blocks, _ = calibrate(model, tokenizer, args)
    target = round(GPT2_SMALL_RATIO * tq.count_parameters(model))
    for plan_name, sensitivity in (("auto", None), ("auto-sensitivity", probe_blocks)):
        allocation = allocation_plan(model, stats, target, sensitivity)
        row = {
            "model": "gpt2-small-random",
            "plan": plan_name,
            "target_ratio": GPT2_SMALL_RATIO,
            "target_params": target,
            "params": allocation.params,
            "candidates": CANDIDATES,
            "calibration_tokens": int(blocks.numel()),
            "calibration_seconds": calibration_seconds,
            "search_seconds": allocation.seconds,
            "chosen": dict(Counter(label(c) for c in allocation.chosen.values())),
            "machine": machine(),
        }
        data["records"].append(row)
        path.write_text(json.dumps(data, indent=1))
        print(json.dumps(row), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.7, 0.5], help="SmolLM2 budgets")
    parser.add_argument("--calibration-tokens", type=int, default=32_768)
    parser.add_argument("--sensitivity-tokens", type=int, default=1024)
    parser.add_argument(
        "--count-tokens", type=int, default=DEFAULT_COUNT_TOKENS, help="text whose token counts weight the embedding"
    )
    parser.add_argument("--max-tokens", type=int, default=8_000)
    parser.add_argument("--lambada-passages", type=int, default=200, help="SmolLM2 only")
    parser.add_argument("--sequential", action="store_true", help=f"also the {SEQUENTIAL} plan")
    parser.add_argument(
        "--only-sequential",
        action="store_true",
        help=f"with --sequential: the {SEQUENTIAL} plans, not the at-once ones",
    )
    parser.add_argument("--fisher", action="store_true", help=f"also the {FISHER} plans (Fisher output metrics)")
    parser.add_argument(
        "--reconstruction-epochs",
        type=int,
        default=0,
        help="with --fisher --sequential: also those fits with this many passes of block reconstruction",
    )
    parser.add_argument("--resume", action="store_true", help="keep finished records in allocation.json")
    parser.add_argument("--from-json", action="store_true", help="only rewrite the markdown")
    args = parser.parse_args()
    if args.only_sequential and not args.sequential:
        parser.error("--only-sequential needs --sequential")
    if args.reconstruction_epochs and not (args.fisher and args.sequential):
        parser.error("--reconstruction-epochs needs --fisher and --sequential")
    path = RESULTS / "allocation.json"
    data = json.loads(path.read_text()) if (args.resume or args.from_json) and path.exists() else None
    if data is None or "models" not in data["meta"]:
        data = {"meta": {"models": args.models}, "records": []}
    if not args.from_json:
        command = command_line("allocation.py", args, left_out=("from_json", "resume"))
        meta = data["meta"]
        data["meta"] = {
            "commands": command_history(meta, command + (" --resume" if args.resume else "")),
            "models": list(dict.fromkeys([*meta.get("models", []), *args.models])),
        }
        RESULTS.mkdir(parents=True, exist_ok=True)
        for name in args.models:
            if name == "gpt2-small-random":
                time_gpt2_small(args, data, path)
            else:
                run_model(name, args, data, path)
    write_report(data)


def write_report(data: dict) -> None:
    meta, records = data["meta"], data["records"]
    machines, legend = machine_labels(records)
    lines = [
        "# Budget allocation against uniform plans (calibrated, no distillation)",
        "",
        "Commands, in order: " + "; ".join(f"`{c}`" for c in meta["commands"]) + ".",
        "",
        legend,
        "",
        "| model | plan | target | params | held-out ppl | WikiText-2 ppl | LAMBADA acc | chosen | search s "
        "| machine |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|---|",
    ]
    models = list(dict.fromkeys(r["model"] for r in records))
    quality = sorted(
        (r for r in records if "heldout_ppl" in r),
        key=lambda r: (models.index(r["model"]), -(r["target_ratio"] or 1.0), r["plan"]),
    )
    for r in quality:
        chosen = ", ".join(f"{k} {v}" for k, v in r.get("chosen", {}).items())
        if r["plan"].startswith("auto") and "candidates" not in r:
            chosen += " †"
        if r["plan"].startswith("auto-sensitivity") and not r.get("sensitivity_points"):
            chosen += " ‡"
        if r["plan"] != "dense" and "count_tokens" not in r:
            chosen += " §"
        if "-fisher" in r["plan"] and r.get("output_ridge", 1.0) != OUTPUT_RIDGE:
            chosen += " ¶"
        wikitext = f"{r['wikitext2_ppl']:.1f}" if "wikitext2_ppl" in r else "—"
        acc = f"{r['lambada_acc']:.3f}" if "lambada_acc" in r else "—"
        target = f"{r['target_ratio']:.2f}" if r.get("target_ratio") else "1.00"
        lines.append(
            f"| {r['model']} | {r['plan']} | {target} | {r['params']:,} | {r['heldout_ppl']:.1f} | {wikitext} "
            f"| {acc} | {chosen} | {r.get('search_seconds', 0):.0f} | {machines[r['machine']]} |"
        )
    if any(r["plan"].startswith("auto") and "candidates" not in r for r in quality):
        lines += ["", "† made before the allocator offered permuted Kronecker and Kronecker embedding candidates."]
    if any(r["plan"].startswith("auto-sensitivity") and not r.get("sensitivity_points") for r in quality):
        lines += [
            "",
            "‡ made before the allocator measured the KL at its first choice too (the probe's alone).",
        ]
    if any(r["plan"] != "dense" and "count_tokens" not in r for r in quality):
        lines += [
            "",
            "§ made before the embedding's token counts were taken on more text than the calibration blocks "
            "(`--count-tokens`; rows without § count "
            + ", ".join(f"{n:,}" for n in sorted({r["count_tokens"] for r in quality if "count_tokens" in r}))
            + " tokens). The counts matter only where an embedding is compressed or priced: SmolLM2's uniform "
            "plans do neither.",
        ]
    if any("-fisher" in r["plan"] and r.get("output_ridge", 1.0) != OUTPUT_RIDGE for r in quality):
        lines += [
            "",
            f"¶ made with the Fisher fits' output ridge at 1.0 (`linalg.OUTPUT_RIDGE`, now {OUTPUT_RIDGE}).",
        ]
    lines += ["", f"Candidates now: {CANDIDATES}.", ""]
    lines += [
        "Auto against the best uniform plan at the same budget, fitted the same way (target: "
        f"≥ {TARGET_LOWER:.0%} lower held-out ppl):",
        "",
    ]
    dense_rows = {r["model"]: r for r in quality if r["plan"] == "dense"}
    for model in dict.fromkeys(r["model"] for r in quality):
        for ratio in dict.fromkeys(r["target_ratio"] for r in quality if r["model"] == model and r["target_ratio"]):
            rows = {r["plan"]: r for r in quality if r["model"] == model and r["target_ratio"] == ratio}
            order = ("auto", "auto-sensitivity", SEQUENTIAL, AIM_DENSE, FISHER, FISHER_SEQUENTIAL)
            autos = [p for p in rows if p.startswith("auto")]
            for plan in sorted(autos, key=lambda p: order.index(p) if p in order else len(order)):
                # Against the best uniform plan fitted the same way (at once or sequentially, with or
                # without the Fisher output metric, with as many passes of reconstruction).
                fitted_alike = [r for p, r in rows.items() if p.startswith("uniform") and fitting(p) == fitting(plan)]
                uniform = min(fitted_alike, key=lambda r: r["heldout_ppl"], default=None)
                if plan in rows and uniform is not None:
                    change = 1 - rows[plan]["heldout_ppl"] / uniform["heldout_ppl"]
                    verdict = "met" if change >= TARGET_LOWER else "missed"
                    needed, dense = (1 - TARGET_LOWER) * uniform["heldout_ppl"], dense_rows.get(model)
                    if change < TARGET_LOWER and dense is not None and needed < dense["heldout_ppl"]:
                        verdict += f"; it would take {needed:.1f}, below the dense model's {dense['heldout_ppl']:.1f}"
                    lines.append(
                        f"- {model} at {ratio:.2f}: {plan} {rows[plan]['heldout_ppl']:.1f} vs {uniform['plan']} "
                        f"{uniform['heldout_ppl']:.1f}: {abs(change):.0%} {'lower' if change >= 0 else 'higher'} "
                        f"({verdict})"
                    )
    for model in meta.get("models", []):
        if not any(r["model"] == model and r["plan"] != "dense" for r in records):
            lines.append(f"- {model}: no compressed row yet (`--resume` continues the run)")
    lines += where_chosen(quality)
    timed = [r for r in records if r["model"] == "gpt2-small-random"]
    if timed:
        lines += ["", "Allocation time at GPT-2-small size (random weights from `GPT2Config()`, 124M; no quality):", ""]
        for r in timed:
            chosen = ", ".join(f"{k} {v}" for k, v in r["chosen"].items())
            lines.append(
                f"- {r['plan']} at {r['target_ratio']:.2f}: search {r['search_seconds']:.0f} s after "
                f"{r['calibration_seconds']:.0f} s of calibration on {r['calibration_tokens']:,} tokens "
                f"({machines[r['machine']]}); chose {chosen}"
            )
    (RESULTS / "allocation.md").write_text("\n".join(lines) + "\n")


def reconstruction_fields(passes: int) -> dict:
    """A record's block reconstruction settings (none without passes)."""
    return {"reconstruction_epochs": passes, "reconstruction_lr": RECONSTRUCTION_LR} if passes else {}


def fitting(plan: str) -> tuple:
    """How a plan's record was fitted, from its name: sequentially, with the Fisher, reconstructed how long."""
    passes = re.search(r"-reconstructed-\d+", plan)
    return "-sequential" in plan, "-fisher" in plan, passes.group() if passes else ""


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
