"""How much calibration text a budget needs, and how much the choice of text matters: SmolLM2-135M at
a budget (``--ratio``; records at several budgets live side by side), chosen with the Fisher among
low-rank candidates (as allocation.py's ``auto-fisher-sequential`` rows; its ``auto-fisher`` rows offer
Kronecker candidates too, which SmolLM2's choices never took) and fitted sequentially with the layers
kept dense aimed (what the CLI does for a budget) or at once, at
several calibration sizes and seeds; no distillation.

    python benchmarks/calibration_tokens.py [--tokens 32768 65536] [--seeds 0] [--fits sequential at-once]
        [--anchors 0 1] [--reconstruction-epochs 0 10] [--ratio 0.7] [--sensitivity-tokens 1024]
        [--count-tokens 4194304] [--max-tokens 8000] [--lambada-passages 200] [--spread] [--uniform]
        [--min-kept 0] [--dense-embedding] [--neurons] [--resume]
    python benchmarks/calibration_tokens.py --from-json

The CLI's default is 262,144 calibration tokens; allocation.py uses 32,768 to stay within hours on two
cores. Each (size, seed) is calibrated from scratch on blocks of ``corpus/gutenberg/train``, its books
read in the seed's order (seed 0 as allocation.py), so another seed is other books, and a larger size
holds different blocks, not only more. Those blocks are the first books' (one or two at these sizes);
with ``--spread`` they are drawn at random from the first ``--count-tokens`` as the CLI draws them
(plan suffix ``-spread``), so another seed is another sample of 20 to 26 books (seeds 0-3). The fits
of a (size, seed) share its statistics and its plan: at once, and sequentially once per ``--anchors``
value and ``--reconstruction-epochs`` value (``compress_sequentially``'s anchor and block
reconstruction; plan ``auto-fisher-sequential-anchor-A`` where A is not 0, with ``-reconstructed-E``
where E is not 0). With ``--uniform`` each of those fits is also made of the uniform plan at the same
budget (every linear layer low-rank at one rank ratio, as allocation.py's ``uniform-svd``; plan
``uniform-svd-fisher...`` named after the auto plan whose fit it shares), so auto meets the uniform
plan like for like. ``--min-kept F`` lets the auto plan leave no module with less than F of its
parameters (plan suffix ``-min-kept-F``; the uniform plan is the same either way), and
``--dense-embedding`` keeps the token embedding (and the head tied to it) out of the auto plan's choice,
so that the linear layers alone give up the parameters the budget asks for (plan suffix
``-dense-embedding``): its price is measured at once, and nothing after the tied head can repair its
error, where the sequential fit repairs much of the linear layers'. ``--neurons`` offers the auto plan
whole-unit MLP cuts (method ``neurons``) beside low-rank (plan suffix ``-neurons``). Auto records hold
``kept``: per module, the share of its parameters the allocation kept (a record marked ``reallocated``,
made by older code: the plan as fitted, and ``allocated_kept`` the plan before its fit chose again).
Records are appended to benchmarks/results/calibration_tokens.json as they finish (``--resume`` keeps
them); the markdown (every run, then the spread over seeds) and the plot (held-out and WikiText-2 ppl
against calibration tokens, one series per plan and budget, one point per seed) are rewritten;
``--from-json`` only rewrites them.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from dataclasses import dataclass, replace

import torch
from allocation import calibrate, evaluate, evaluation_texts, reconstruction_fields, uniform_plan, with_fisher
from common import ASSETS, RESULTS, TARGET_LOWER, command_history, command_line, load_smollm2, machine, machine_labels

import tqcompressor as tq
from tqcompressor.allocation import Allocation, allocation_plan, linear_layers
from tqcompressor.cli import DEFAULT_COUNT_TOKENS
from tqcompressor.data import token_counts
from tqcompressor.linalg import OUTPUT_RIDGE
from tqcompressor.sequential import compress_sequentially

PATH = RESULTS / "calibration_tokens.json"


AUTO = "auto-fisher"
FITS = {"sequential": f"{AUTO}-sequential", "at-once": AUTO}
# Every linear layer low-rank at one rank ratio, fitted as the auto plan it is named after.
UNIFORM = "uniform-svd-fisher"


def run(args, data: dict) -> None:
    done = {(r["calibration_tokens"], r.get("seed", 0), r["plan"], r.get("target_ratio")) for r in data["records"]}
    suffix = "-spread" if args.spread else ""
    model, tokenizer = load_smollm2()
    model.eval()
    texts, passages = evaluation_texts(tokenizer, args.max_tokens, args.lambada_passages)
    counts = token_counts(
        ASSETS / "corpus/gutenberg/train", tokenizer, model.get_input_embeddings().num_embeddings, args.count_tokens
    )
    scoring = Scoring(texts, passages, tokenizer, frequency_ranks(counts))
    dense = [r for r in data["records"] if r["plan"] == "dense"]
    if not dense or "lambada_ppl" not in dense[0]:  # scored again where made before these scores were recorded
        data["records"] = [r for r in data["records"] if r["plan"] != "dense"]
        row = {"plan": "dense", "calibration_tokens": 0, "params": tq.count_parameters(model)}
        record(data, row, model, scoring)
    target = round(args.ratio * tq.count_parameters(model))
    for tokens in args.tokens:
        for seed in args.seeds:
            fits = [(FITS["at-once"] + suffix, None, 0)] if "at-once" in args.fits else []
            if "sequential" in args.fits:
                fits += [
                    (sequential_plan(anchor, epochs) + suffix, anchor, epochs)
                    for anchor in args.anchors
                    for epochs in args.reconstruction_epochs
                ]
            uniform_fits = (
                [(uniform_name(plan), anchor, epochs) for plan, anchor, epochs in fits] if args.uniform else []
            )
            suffix_of_auto = auto_suffix(args.min_kept, dense_embedding=args.dense_embedding, neurons=args.neurons)
            fits = [(plan + suffix_of_auto, anchor, epochs) for plan, anchor, epochs in fits] + uniform_fits
            plans = [fit for fit in fits if (tokens, seed, fit[0], args.ratio) not in done]
            if plans:
                fit_budget(args, data, model, scoring, target, tokens, seed, plans)


def fit_budget(args, data, model, scoring: Scoring, target: int, tokens: int, seed: int, plans) -> None:
    sizes = argparse.Namespace(
        calibration_tokens=tokens, count_tokens=args.count_tokens, sensitivity_tokens=args.sensitivity_tokens
    )
    stats, calibration_seconds, blocks, probe_blocks, counts = calibrate(
        model, scoring.tokenizer, sizes, seed=seed, spread=args.spread
    )
    fisher, fisher_seconds = with_fisher(model, stats, blocks)
    uniform = uniform_plan(model, linear_layers(model), target, "svd")
    # The allocation chooses for the modules its statistics describe: without the embedding's, it stays dense.
    chosen_for = replace(fisher, owner={n: key for n, key in fisher.owner.items() if key not in fisher.tokens})
    # The search (about 40 s) only where an auto plan is still to be fitted.
    allocation = (
        allocation_plan(
            model,
            chosen_for if args.dense_embedding else fisher,
            target,
            probe_blocks,
            methods=["lowrank", "neurons"] if args.neurons else ["lowrank"],
            min_kept=args.min_kept,
        )
        if any(not plan.startswith(UNIFORM) for plan, _, _ in plans)
        else None
    )
    for plan, anchor, epochs in plans:
        chosen = uniform if plan.startswith(UNIFORM) else allocation.plan
        compressed = copy.deepcopy(model)
        started = time.perf_counter()
        notes = []
        if anchor is not None:
            notes = compress_sequentially(
                compressed,
                chosen,
                blocks,
                progress=False,
                token_counts=counts,
                output_moments=fisher.outputs,
                anchor=anchor,
                reconstruction_epochs=epochs,
            ).notes
        else:
            tq.compress_(compressed, chosen, calibration=fisher, progress=False)
        row = {
            "plan": plan,
            **({} if anchor is None else {"anchor": anchor}),
            **reconstruction_fields(epochs),
            "calibration_tokens": tokens,
            "seed": seed,
            "calibrated_on": int(blocks.numel()),  # whole blocks of 512
            **({"drawn_from_tokens": args.count_tokens} if args.spread else {}),
            "target_ratio": args.ratio,
            "target_params": target,
            "params": tq.count_parameters(compressed),
            "output_ridge": OUTPUT_RIDGE,
            "calibration_seconds": calibration_seconds,
            "fisher_seconds": fisher_seconds,
            **({"min_kept": args.min_kept} if args.min_kept and chosen is not uniform else {}),
            **({"dense_embedding": True} if args.dense_embedding and chosen is not uniform else {}),
            **({"neurons": True} if args.neurons and chosen is not uniform else {}),
            **({} if chosen is uniform else {"kept": kept_shares(model, allocation)}),
            "search_seconds": 0.0 if chosen is uniform else allocation.seconds,
            "compress_seconds": time.perf_counter() - started,
            "notes": notes,
        }
        record(data, row, compressed, scoring)
        del compressed


def uniform_name(
    plan: str,
    min_kept: float = 0.0,
    reallocated: bool = False,
    dense_embedding: bool = False,
    neurons: bool = False,
) -> str:
    """The record's plan name for ``plan``'s fit of the uniform SVD plan instead of the allocator's (the
    same whatever ``--min-kept``, ``--dense-embedding`` or ``--neurons`` did to the auto plan, or the older
    code's reallocation: those are what ``plan`` was made with)."""
    suffix = auto_suffix(min_kept, reallocated, dense_embedding, neurons)
    return UNIFORM + plan.removeprefix(AUTO).removesuffix(suffix)


def kept_shares(model, allocation: Allocation) -> dict[str, float]:
    """Per module (an MLP cut whole: its projections together), the share of its weights' parameters the
    allocation keeps."""

    def weights(name: str) -> int:
        module = model.get_submodule(name)
        if hasattr(module, "weight"):
            return module.weight.numel()
        return sum(child.weight.numel() for child in module.children() if isinstance(child, torch.nn.Linear))

    return {name: round(candidate.params / weights(name), 4) for name, candidate in allocation.chosen.items()}


def auto_suffix(
    min_kept: float, reallocated: bool = False, dense_embedding: bool = False, neurons: bool = False
) -> str:
    """The auto plan's name suffix where each module keeps at least ``min_kept`` of its parameters, with
    ``reallocated`` the sequential fit chose each part again (older code: see the record's ``code``), with
    ``dense_embedding`` the token embedding was left out of the choice, and with ``neurons`` whole-unit
    MLP cuts were offered beside low-rank."""
    return (
        (f"-min-kept-{min_kept:g}" if min_kept else "")
        + ("-reallocated" if reallocated else "")
        + ("-dense-embedding" if dense_embedding else "")
        + ("-neurons" if neurons else "")
    )


def sequential_plan(anchor: float, epochs: int = 0) -> str:
    """The record's plan name for a sequential fit with ``anchor`` and ``epochs`` of block reconstruction
    (``compress_sequentially``)."""
    return (
        FITS["sequential"] + (f"-anchor-{anchor:g}" if anchor else "") + (f"-reconstructed-{epochs}" if epochs else "")
    )


def record(data: dict, row: dict, model, scoring: Scoring) -> None:
    row.update(
        model="smollm2-135m", machine=machine(), **evaluate(model, scoring.texts, scoring.passages, scoring.tokenizer)
    )
    row.update(by_frequency(model, scoring))
    data["records"].append(row)
    PATH.write_text(json.dumps(data, indent=1))
    print(json.dumps(row), flush=True)


@dataclass
class Scoring:
    texts: dict[str, list[int]]
    passages: list[str]
    tokenizer: object
    ranks: torch.Tensor  # each token id's rank by frequency in the Gutenberg text (0: the most frequent)


# Target tokens by their frequency rank: what a model that drifts toward frequent tokens would show.
FREQUENCY_BINS = ((0, 100), (100, 1_000), (1_000, 10_000), (10_000, None))


def frequency_ranks(counts: torch.Tensor) -> torch.Tensor:
    ranks = torch.empty(len(counts), dtype=torch.long)
    ranks[counts.argsort(descending=True, stable=True)] = torch.arange(len(counts))
    return ranks


def bin_name(low: int, high: int | None) -> str:
    return f"{low}-{high}" if high is not None else f"{low}+"


@torch.inference_mode()
def by_frequency(model, scoring: Scoring, window: int = 512) -> dict:
    """Held-out NLL by the target token's frequency bin (windows of ``window`` side by side, each target
    scored once), and the share of LAMBADA passages whose greedy first token of the last word is one
    of the 100 most frequent tokens (the target's own share is in the dense record)."""
    ids = torch.tensor(scoring.texts["heldout"])
    nll, targets = [], []
    for start in range(0, len(ids) - 1, window - 1):
        chunk = ids[start : start + window]
        logits = model(chunk[:-1].unsqueeze(0)).logits[0].float()
        nll.append(torch.nn.functional.cross_entropy(logits, chunk[1:], reduction="none"))
        targets.append(chunk[1:])
    nll, rank = torch.cat(nll), scoring.ranks[torch.cat(targets)]
    bins = {}
    for low, high in FREQUENCY_BINS:
        chosen = (rank >= low) & (rank < (high if high is not None else len(scoring.ranks)))
        bins[bin_name(low, high)] = {"tokens": int(chosen.sum()), "nll": float(nll[chosen].mean())}
    frequent, target_frequent = 0, 0
    for text in scoring.passages:
        context, word = text.rsplit(" ", 1)
        context_ids = scoring.tokenizer(context)["input_ids"]
        first = scoring.tokenizer(" " + word)["input_ids"][0]
        guess = int(model(torch.tensor([context_ids])).logits[0, -1].argmax())
        frequent += int(scoring.ranks[guess] < 100)
        target_frequent += int(scoring.ranks[first] < 100)
    share = frequent / max(len(scoring.passages), 1)
    return {
        "heldout_nll_by_frequency": bins,
        "lambada_guess_frequent": share,
        "lambada_target_frequent": target_frequent / max(len(scoring.passages), 1),
    }


def write_report(data: dict) -> None:
    meta = data["meta"]
    records = sorted(
        data["records"], key=lambda r: (-r.get("target_ratio", 1), r["calibration_tokens"], r["plan"], r.get("seed", 0))
    )
    dense = next((r for r in records if r["plan"] == "dense"), None)
    fitted = [r for r in records if r["plan"] != "dense"]
    labels, legend = machine_labels(records)
    lines = [
        "# Calibration text for a budget: SmolLM2-135M, auto (Fisher, low-rank), no training",
        "",
        "Commands, in order: " + "; ".join(f"`{c}`" for c in meta["commands"]) + ".",
        "",
        legend,
        "",
        "| budget | calibration tokens | seed | plan | params | held-out ppl | WikiText-2 ppl | LAMBADA acc "
        "| LAMBADA ppl | calibration s | Fisher s | search s | fitting s | machine |",
        "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    if dense is not None:
        lines.append(
            f"| 100% | dense | — | dense | {dense['params']:,} | {dense['heldout_ppl']:.1f} "
            f"| {dense['wikitext2_ppl']:.1f} | {dense['lambada_acc']:.3f} | {_optional(dense, 'lambada_ppl')} "
            f"| — | — | — | — | {labels[dense['machine']]} |"
        )
    for r in fitted:
        lines.append(
            f"| {r['target_ratio']:.0%} | {r['calibration_tokens']:,} | {r.get('seed', 0)} | {r['plan']} "
            f"| {r['params']:,} "
            f"| {r['heldout_ppl']:.1f} | {r['wikitext2_ppl']:.1f} | {r['lambada_acc']:.3f} "
            f"| {_optional(r, 'lambada_ppl')} | {r['calibration_seconds']:.0f} | {r['fisher_seconds']:.0f} "
            f"| {r['search_seconds']:.0f} | {r['compress_seconds']:.0f} | {labels[r['machine']]} |"
        )
    older = [r for r in fitted if "code" in r]
    if older:
        lines += ["", "Made by older code:", ""]
        lines += [f"- {r['plan']}, seed {r.get('seed', 0)}: {r['code']}" for r in older]
    groups: dict[tuple[int, str, float], list[dict]] = {}
    for r in fitted:
        groups.setdefault((r["calibration_tokens"], r["plan"], r["target_ratio"]), []).append(r)
    if any(len(group) > 1 for group in groups.values()):
        lines += [
            "",
            "Over seeds (mean, min–max):",
            "",
            "| budget | calibration tokens | plan | seeds | held-out ppl | WikiText-2 ppl | LAMBADA acc |",
            "|---:|---:|---|---:|---|---|---|",
        ]
        for (tokens, plan, ratio), group in groups.items():
            spread = " | ".join(_spread([r[k] for r in group], digits) for k, digits in SPREAD_COLUMNS)
            lines.append(f"| {ratio:.0%} | {tokens:,} | {plan} | {len(group)} | {spread} |")
    if dense is not None:  # run() scores the dense model before any fit, so every pair has it
        lines += against_uniform(fitted, dense)
    analysed = [r for r in records if "heldout_nll_by_frequency" in r]
    if analysed:
        names = list(analysed[0]["heldout_nll_by_frequency"])
        lines += [
            "",
            "Where the loss goes: held-out NLL by the target token's frequency rank in the Gutenberg text "
            "(tokens per bin in the header), and the share of LAMBADA passages whose greedy first token of "
            "the last word is one of the 100 most frequent tokens (of the targets: "
            f"{analysed[0]['lambada_target_frequent']:.3f}):",
            "",
            "| budget | calibration tokens | seed | plan | "
            + " | ".join(f"NLL rank {n} ({analysed[0]['heldout_nll_by_frequency'][n]['tokens']})" for n in names)
            + " | LAMBADA guess frequent |",
            "|---:|---:|---:|---|" + "---:|" * (len(names) + 1),
        ]
        for r in analysed:
            nll = " | ".join(f"{r['heldout_nll_by_frequency'][n]['nll']:.2f}" for n in names)
            tokens = "dense" if r["plan"] == "dense" else f"{r['calibration_tokens']:,}"
            seed = "—" if r["plan"] == "dense" else r.get("seed", 0)
            budget = f"{r.get('target_ratio', 1):.0%}"
            lines.append(f"| {budget} | {tokens} | {seed} | {r['plan']} | {nll} | {r['lambada_guess_frequent']:.3f} |")
    (RESULTS / "calibration_tokens.md").write_text("\n".join(lines) + "\n")
    if not fitted:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = sorted({(r["plan"], r["target_ratio"]) for r in fitted})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharex=True)
    for ax, (key, label) in zip(axes, (("heldout_ppl", "held-out"), ("wikitext2_ppl", "WikiText-2")), strict=True):
        for index, (plan, ratio) in enumerate(series):
            runs = [r for r in fitted if (r["plan"], r["target_ratio"]) == (plan, ratio)]
            ax.plot(
                [r["calibration_tokens"] for r in runs],
                [r[key] for r in runs],
                "oxs^vD<>"[index % 8],
                color=f"C{index % 10}",
                label=f"{plan}, at {ratio:.0%}",
            )
        if dense is not None:
            ax.axhline(dense[key], color="black", linestyle=":", label="dense")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("calibration tokens (one point per seed)")
        ax.set_ylabel(f"{label} perplexity")
    if dense is not None:
        axes[0].axhline(1.5 * dense["heldout_ppl"], color="grey", linestyle="--", label="1.5x dense (the stretch)")
    fig.suptitle("SmolLM2-135M: auto budget, Fisher, no training")
    fig.tight_layout()
    # Below the axes, however many series there are; the saved image grows to hold it.
    fig.legend(*axes[0].get_legend_handles_labels(), loc="upper center", bbox_to_anchor=(0.5, 0), ncol=2, fontsize=7)
    fig.savefig(RESULTS / "calibration_tokens.png", dpi=120, bbox_inches="tight")
    plt.close(fig)


SPREAD_COLUMNS = (("heldout_ppl", 1), ("wikitext2_ppl", 1), ("lambada_acc", 3))


def against_uniform(fitted: list[dict], dense: dict) -> list[str]:
    """Each uniform fit against the auto fit of the same calibration (tokens, seed) made the same way, also
    in excess loss over the dense model, ln(ppl / dense ppl): how much of the uniform
    plan's excess auto removes, and how much the target asks for (-ln(1 - TARGET_LOWER) / uniform's excess), which
    grows as a better fit brings the uniform plan nearer the dense model."""
    runs = {(r["target_ratio"], r["calibration_tokens"], r.get("seed", 0), r["plan"]): r for r in fitted}
    pairs = []
    for (ratio, tokens, seed, plan), auto in runs.items():
        made = uniform_name(
            plan,
            auto.get("min_kept", 0.0),
            auto.get("reallocated", False),
            auto.get("dense_embedding", False),
            auto.get("neurons", False),
        )
        uniform = runs.get((ratio, tokens, seed, made))
        if plan.startswith(AUTO) and uniform is not None:
            pairs.append((auto, uniform))
    if not pairs:
        return []
    lines = [
        "",
        "Auto against the uniform SVD plan, same statistics and same fit (issue target: auto "
        f"≥ {TARGET_LOWER:.0%} lower held-out ppl); excess: held-out ln(ppl / dense ppl), auto's share of the uniform "
        f"plan's excess that it removes, and the share the target asks for (ln {1 / (1 - TARGET_LOWER):g} over "
        "uniform's excess):",
        "",
        "| budget | calibration tokens | seed | fit | auto params | uniform params | auto held-out | uniform held-out "
        "| auto lower by | auto WT2 | uniform WT2 | auto LAMBADA acc | uniform LAMBADA acc | auto excess "
        "| uniform excess | removed | target asks |",
        "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for auto, uniform in pairs:
        lower = 1 - auto["heldout_ppl"] / uniform["heldout_ppl"]
        fit = auto["plan"].removeprefix(AUTO).lstrip("-") or "at-once"
        auto_excess = math.log(auto["heldout_ppl"] / dense["heldout_ppl"])
        uniform_excess = math.log(uniform["heldout_ppl"] / dense["heldout_ppl"])
        lines.append(
            f"| {auto['target_ratio']:.0%} | {auto['calibration_tokens']:,} | {auto.get('seed', 0)} | {fit} "
            f"| {auto['params']:,} | {uniform['params']:,} | {auto['heldout_ppl']:.1f} | {uniform['heldout_ppl']:.1f} "
            f"| {lower:.0%} | {auto['wikitext2_ppl']:.1f} | {uniform['wikitext2_ppl']:.1f} "
            f"| {auto['lambada_acc']:.3f} | {uniform['lambada_acc']:.3f} | {auto_excess:.3f} | {uniform_excess:.3f} "
            f"| {1 - auto_excess / uniform_excess:.0%} | {-math.log1p(-TARGET_LOWER) / uniform_excess:.0%} |"
        )
    return lines


def _spread(values: list[float], digits: int) -> str:
    return f"{sum(values) / len(values):.{digits}f} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def _optional(record: dict, key: str) -> str:
    """Records made before a column existed show a dash."""
    return f"{record[key]:.1f}" if key in record else "—"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[32_768, 65_536])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="orders of the books the text is read from")
    parser.add_argument("--fits", nargs="+", choices=sorted(FITS), default=["sequential"])
    parser.add_argument(
        "--anchors", type=float, nargs="+", default=[0.0], help="a sequential fit for each (compress_sequentially)"
    )
    parser.add_argument(
        "--reconstruction-epochs",
        type=int,
        nargs="+",
        default=[0],
        help="a sequential fit for each anchor and each of these (compress_sequentially; 0: none)",
    )
    parser.add_argument("--ratio", type=float, default=0.7)
    parser.add_argument("--sensitivity-tokens", type=int, default=1024)
    parser.add_argument("--count-tokens", type=int, default=DEFAULT_COUNT_TOKENS)
    parser.add_argument("--max-tokens", type=int, default=8_000)
    parser.add_argument("--lambada-passages", type=int, default=200)
    parser.add_argument(
        "--spread",
        action="store_true",
        help="draw the calibration blocks at random from the first --count-tokens (plan suffix -spread) "
        "instead of taking the first books",
    )
    parser.add_argument(
        "--uniform",
        action="store_true",
        help=f"also fit every linear layer low-rank at one rank ratio, each fit as the auto plan's (plan {UNIFORM}...)",
    )
    parser.add_argument(
        "--min-kept",
        type=float,
        default=0.0,
        help="the auto plan keeps at least this share of each module's parameters (plan suffix -min-kept-F)",
    )
    parser.add_argument(
        "--dense-embedding",
        action="store_true",
        help="keep the token embedding out of the auto plan's choice (plan suffix -dense-embedding)",
    )
    parser.add_argument(
        "--neurons",
        action="store_true",
        help="offer the auto plan whole-unit MLP cuts (method neurons) beside low-rank (plan suffix -neurons)",
    )
    parser.add_argument("--resume", action="store_true", help="keep finished records")
    parser.add_argument("--from-json", action="store_true", help="only rewrite the markdown and the plot")
    args = parser.parse_args()
    if args.from_json:
        write_report(json.loads(PATH.read_text()))
        return
    data = json.loads(PATH.read_text()) if args.resume and PATH.exists() else {"meta": {}, "records": []}
    command = command_line("calibration_tokens.py", args, left_out=("resume",))
    data["meta"] = {"commands": command_history(data["meta"], command + (" --resume" if args.resume else ""))}
    RESULTS.mkdir(parents=True, exist_ok=True)
    run(args, data)
    write_report(data)


if __name__ == "__main__":
    main()
