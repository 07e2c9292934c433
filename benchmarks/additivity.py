"""Is a plan's harm the sum of its modules' harms, as the allocation assumes, and does correcting the
Fisher's estimates by measurement choose better? SmolLM2-135M at a budget (``--ratio``): the auto plan
(Fisher, low-rank candidates, as calibration_tokens.py's) and the uniform SVD plan at the same size,
both fitted at once on the same statistics. Each module's fit is applied alone, then every module of a
kind together (every q_proj, ...), every module of a block together, and all of them: the KL of the
model's next-token distribution from the original's on the calibration blocks the allocation's
sensitivity probe uses (``--measure-tokens``). The auto plan is then chosen again with each module's
Fisher estimates scaled by its measured KL over its estimate (at the candidate chosen for it; at the
sensitivity probe for a module kept dense), plan ``auto-fisher-rescaled``; held-out ppl of all three.
No distillation, no reconstruction.

    python benchmarks/additivity.py [--tokens 16384] [--measure-tokens 1024] [--ratio 0.7] [--seed 0]
        [--count-tokens 4194304] [--max-tokens 8000]
    python benchmarks/additivity.py --from-json

Writes benchmarks/results/additivity.json, .md and .png (per block: KL of the block's modules applied
together against the sum of their KLs alone, per plan).
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import time
from dataclasses import replace

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from allocation import calibrate, uniform_plan, with_fisher
from common import RESULTS, command_line, heldout_ids, load_smollm2, machine

import tqcompressor as tq
from tqcompressor.allocation import (
    Candidate,
    Divergence,
    allocate,
    allocation_plan,
    candidates,
    fitted_weight,
    linear_layers,
    probe,
)
from tqcompressor.cli import DEFAULT_COUNT_TOKENS
from tqcompressor.evaluation import perplexity

PATH = RESULTS / "additivity.json"


def kind(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def block(name: str) -> int | None:
    found = re.search(r"\.layers\.(\d+)\.", name)
    return int(found.group(1)) if found else None


def measure(divergence: Divergence, fitted: dict[str, torch.Tensor]) -> dict:
    """Every module in ``fitted`` (its fitted weight) alone, by kind, by block and all together."""
    alone = {name: divergence({name: weight}) for name, weight in fitted.items()}

    def grouped(key) -> dict[str, dict[str, float]]:
        groups: dict[str, list[str]] = {}
        for name in fitted:
            groups.setdefault(str(key(name)), []).append(name)
        return {
            g: {"together": divergence({n: fitted[n] for n in names}), "alone_sum": sum(alone[n] for n in names)}
            for g, names in groups.items()
        }

    return {"alone": alone, "kinds": grouped(kind), "blocks": grouped(block), "all": divergence(fitted)}


def run(args) -> dict:
    torch.manual_seed(args.seed)
    model, tokenizer = load_smollm2()
    model.eval()
    sizes = argparse.Namespace(
        calibration_tokens=args.tokens, count_tokens=args.count_tokens, sensitivity_tokens=args.measure_tokens
    )
    stats, _, blocks, probe_blocks, _ = calibrate(model, tokenizer, sizes, seed=args.seed, spread=True)
    fisher, _ = with_fisher(model, stats, blocks)
    total = tq.count_parameters(model)
    target = round(args.ratio * total)
    auto = allocation_plan(model, fisher, target, probe_blocks, methods=["lowrank"])
    uniform = uniform_plan(model, linear_layers(model), target, "svd")
    divergence = Divergence(model, probe_blocks)
    plans = {
        "auto-fisher": {n: c.config for n, c in auto.chosen.items() if c.config is not None},
        "uniform-svd": {n: r.config for r in uniform.rules for n in auto.chosen if r.matches(n)},
    }
    measured = {}
    for plan, configs in plans.items():
        started = time.perf_counter()
        fitted = {n: fitted_weight(model.get_submodule(n), c, fisher.for_module(n)) for n, c in configs.items()}
        measured[plan] = measure(divergence, fitted) | {"seconds": time.perf_counter() - started}
    # Rescaled: the Fisher's curve per module, its scale from the KL measured where the choice fell.
    options = {n: candidates(n, model.get_submodule(n), fisher.for_module(n), ["lowrank"]) for n in auto.chosen}
    scales = {}
    for name, found in options.items():
        chosen = auto.chosen[name]
        if chosen.kl is None:
            continue  # unpriced (the embedding): kept as the auto plan chose it
        at = chosen if chosen.config is not None else probe(found)
        if at is chosen:
            kl = measured["auto-fisher"]["alone"][name]
        else:
            kl = divergence({name: fitted_weight(model.get_submodule(name), at.config, fisher.for_module(name))})
        scales[name] = kl / max(at.kl, 1e-12)
    rescaled_options = {
        n: [replace(c, kl=c.kl * scales[n]) for c in found] if n in scales else [auto.chosen[n]]
        for n, found in options.items()
    }
    saving = sum(found[0].params - auto.chosen[n].params for n, found in rescaled_options.items())
    rescaled = allocate(rescaled_options, saving)
    plans["auto-fisher-rescaled"] = {n: c.config for n, c in rescaled.items() if c.config is not None}
    ids = heldout_ids(tokenizer, args.max_tokens)
    records = []
    for plan, configs in plans.items():
        compressed = copy.deepcopy(model)
        rules = [tq.Rule(re.escape(n), config) for n, config in configs.items()]
        tq.compress_(compressed, tq.CompressionPlan(rules, name=plan), calibration=fisher, progress=False)
        records.append(
            {
                "plan": plan,
                "params": tq.count_parameters(compressed),
                "heldout_ppl": perplexity(compressed, ids, max_length=512, progress=False)["ppl"],
                "kept": kept_by_kind(model, compressed, list(auto.chosen)),
                **({"fisher_kl": fisher_by_kind(auto.chosen)} if plan == "auto-fisher" else {}),
                **({"measured": measured[plan]} if plan in measured else {}),
                **({"scales": scales} if plan == "auto-fisher-rescaled" else {}),
            }
        )
        del compressed
    return {"meta": {"command": command_line("additivity.py", args), "machine": machine()}, "records": records}


def kept_by_kind(model, compressed, names) -> dict[str, float]:
    """Per kind, the share of its dense parameters the compressed model keeps."""
    kept: dict[str, list[int]] = {}
    for name in names:
        share = kept.setdefault(kind(name), [0, 0])
        share[0] += tq.count_parameters(compressed.get_submodule(name))
        share[1] += tq.count_parameters(model.get_submodule(name))
    return {k: round(a / b, 3) for k, (a, b) in kept.items()}


def fisher_by_kind(chosen: dict[str, Candidate]) -> dict[str, float]:
    sums: dict[str, float] = {}
    for name, c in chosen.items():
        if c.kl is not None:
            sums[kind(name)] = sums.get(kind(name), 0.0) + c.kl
    return sums


def write_report(data: dict) -> None:
    by_plan = {r["plan"]: r for r in data["records"]}
    auto, uniform = by_plan["auto-fisher"], by_plan["uniform-svd"]
    lines = [
        "# Is a plan's KL the sum of its modules'? SmolLM2-135M, fitted at once, no training",
        "",
        f"Command: `{data['meta']['command']}`. Machine: {data['meta']['machine']}.",
        "",
        "KL: of the next-token distribution from the original model's, nats per token, on the calibration "
        "blocks of the allocation's sensitivity probe. Alone: the sum over modules of each one's KL with "
        "only it at its fit. Fisher: the sum of the allocation's estimates.",
        "",
        "| plan | params | held-out ppl | KL all together | sum of KL alone | together / alone | Fisher sum |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in data["records"]:
        m = r.get("measured")
        fisher = sum(r["fisher_kl"].values()) if "fisher_kl" in r else None
        alone = sum(m["alone"].values()) if m else None
        lines.append(
            f"| {r['plan']} | {r['params']:,} | {r['heldout_ppl']:.1f} | "
            + (f"{m['all']:.3f} | {alone:.3f} | {m['all'] / alone:.2f}" if m else "— | — | —")
            + f" | {'—' if fisher is None else f'{fisher:.3f}'} |"
        )
    lines += [
        "",
        "Per kind (every module of the kind at its fit together, and the sum of each alone); kept: share of the "
        "kind's dense parameters:",
        "",
        "| kind | auto kept | auto together | auto alone sum | auto Fisher sum | uniform kept | uniform together "
        "| uniform alone sum | rescaled kept |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rescaled = by_plan.get("auto-fisher-rescaled", {}).get("kept", {})
    for k in auto["kept"]:
        a, u = auto["measured"]["kinds"].get(k), uniform["measured"]["kinds"].get(k)

        def pair(group):
            return f"{group['together']:.3f} | {group['alone_sum']:.3f}" if group else "0 | 0"

        lines.append(
            f"| {k} | {auto['kept'][k]:.2f} | {pair(a)} | {auto['fisher_kl'].get(k, 0.0):.3f} | "
            f"{uniform['kept'].get(k, 1.0):.2f} | {pair(u)} | {rescaled.get(k, float('nan')):.2f} |"
        )
    lines += ["", "Per block (its modules at their fits together, and the sum of each alone):", ""]
    lines += [
        "| block | auto together | auto alone sum | uniform together | uniform alone sum |",
        "|---:|---:|---:|---:|---:|",
    ]
    for b in sorted((k for k in uniform["measured"]["blocks"] if k != "None"), key=int):
        a, u = auto["measured"]["blocks"].get(b), uniform["measured"]["blocks"][b]
        cells = f"{a['together']:.3f} | {a['alone_sum']:.3f}" if a else "0 | 0"
        lines.append(f"| {b} | {cells} | {u['together']:.3f} | {u['alone_sum']:.3f} |")
    RESULTS.joinpath("additivity.md").write_text("\n".join(lines) + "\n")
    figure, axis = plt.subplots(figsize=(8, 4))
    for r, color in ((auto, "tab:blue"), (uniform, "tab:orange")):
        groups = sorted(((int(b), g) for b, g in r["measured"]["blocks"].items() if b != "None"))
        axis.plot(
            [b for b, _ in groups], [g["together"] for _, g in groups], color=color, label=f"{r['plan']} together"
        )
        axis.plot(
            [b for b, _ in groups],
            [g["alone_sum"] for _, g in groups],
            "--",
            color=color,
            label=f"{r['plan']} alone, summed",
        )
    axis.set(
        xlabel="block", ylabel="KL from the original (nats/token)", yscale="log", title="SmolLM2-135M, fitted at once"
    )
    axis.legend()
    figure.tight_layout()
    figure.savefig(RESULTS / "additivity.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=16_384, help="calibration tokens")
    parser.add_argument("--measure-tokens", type=int, default=1_024, help="calibration tokens the KL is measured on")
    parser.add_argument("--ratio", type=float, default=0.7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--count-tokens", type=int, default=DEFAULT_COUNT_TOKENS)
    parser.add_argument("--max-tokens", type=int, default=8_000)
    parser.add_argument("--from-json", action="store_true", help="only rewrite the markdown and the plot")
    args = parser.parse_args()
    if args.from_json:
        write_report(json.loads(PATH.read_text()))
        return
    data = run(args)
    RESULTS.mkdir(parents=True, exist_ok=True)
    PATH.write_text(json.dumps(data, indent=1))
    write_report(data)


if __name__ == "__main__":
    main()
