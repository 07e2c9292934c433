"""How an embedding fit's weighting changes a tied head's logits and the model's perplexity.

    python benchmarks/embedding_weighting.py [--model house-teacher|smollm2-135m] [--calibration-tokens 32768]
        [--count-tokens 4194304] [--max-tokens 8000]

GPT-2 and SmolLM2 tie their output head to the token embedding, so an embedding fit also decides every
logit. This compresses only the embedding, three ways: data-free (plain SVD / Frobenius Kronecker);
rows weighted by token frequency (smoothed, ``TokenStats.weights``; the counts of ``--count-tokens``
of the calibration text, as the CLI takes them); and, the library's default, rows weighted so and
columns by the second moment of the tied head's inputs (``TokenStats.head_second_moment``). House
teacher: Kronecker ÷2 then ÷2 with permutations, and low-rank at the same size; SmolLM2: low-rank at
87% (what the budget allocator chose at 50% of the model with the frequency weighting) and ½, and
Kronecker ÷2 with permutations (the size of low-rank ½).
Measured on held-out Gutenberg text (SmolLM2 also WikiText-2):
- perplexity of the whole model;
- the head's logit error per token-frequency bucket, ‖H (E − Ê)_Vᵀ‖ / ‖H E_Vᵀ‖ over the model's
  final hidden states H, for the vocabulary columns V of each bucket (so the head alone is measured);
- mean next-token NLL grouped by the bucket of the target token.
Buckets come from the counts: "frequent" (the most common tokens, half the counted mass), "seen" (the
rest that occur), "unseen" (never counted). Writes benchmarks/results/embedding_weighting.{json,md,png}
(one section per model; a run replaces its model's section).
"""

from __future__ import annotations

import argparse
import copy
import json
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from common import ASSETS, RESULTS, heldout_ids, load_smollm2, machine

import tqcompressor as tq
from tqcompressor.allocation import compressible_modules
from tqcompressor.calibration import CalibrationStats, collect
from tqcompressor.cli import DEFAULT_COUNT_TOKENS
from tqcompressor.data import load_blocks, token_counts
from tqcompressor.evaluation import read_text
from tqcompressor.loading import load_model
from tqcompressor.statistics import TokenStats

BUCKETS = ("frequent", "seen", "unseen")
WEIGHTINGS = ("none", "frequency", "frequency + tied head")


def buckets(counts: torch.Tensor) -> torch.Tensor:
    """Bucket index (0 frequent, 1 seen, 2 unseen) of every token id."""
    order = torch.argsort(counts, descending=True)
    mass = torch.cumsum(counts[order], 0) / counts.sum()
    label = torch.full_like(counts, 1, dtype=torch.long)
    label[order[: int((mass < 0.5).sum()) + 1]] = 0
    label[counts == 0] = 2
    return label


def head_errors(hidden: torch.Tensor, dense: torch.Tensor, approx: torch.Tensor, label: torch.Tensor) -> dict:
    gram = hidden.T.double() @ hidden.double()
    delta = (dense - approx).double()
    missed = ((delta @ gram) * delta).sum(1)
    reference = ((dense.double() @ gram) * dense.double()).sum(1)
    return {
        name: float((missed[label == i].sum() / reference[label == i].sum()).sqrt()) for i, name in enumerate(BUCKETS)
    }


def nll_by_bucket(model, ids: torch.Tensor, label: torch.Tensor, window: int) -> tuple[float, dict]:
    """Perplexity over non-overlapping windows and the mean NLL of targets in each bucket."""
    nll = []
    targets = []
    with torch.no_grad():
        for start in range(0, ids.numel() - 1, window):
            chunk = ids[start : start + window + 1]
            logits = model(chunk[:-1].unsqueeze(0)).logits[0].float()
            nll.append(F.cross_entropy(logits, chunk[1:], reduction="none"))
            targets.append(chunk[1:])
    nll, targets = torch.cat(nll), torch.cat(targets)
    by_bucket = {
        name: float(nll[label[targets] == i].mean()) for i, name in enumerate(BUCKETS) if (label[targets] == i).any()
    }
    return float(nll.mean().exp()), by_bucket


def variants(model_name: str, time_budget: float) -> dict[str, list]:
    kron = tq.KroneckerConfig(embedding_factor=2, time_budget=time_budget)
    if model_name == "house-teacher":
        return {"kronecker+perm ÷4": [kron, kron], "lowrank ÷4": [tq.LowRankConfig(ratio=0.25)]}
    return {
        "lowrank 87%": [tq.LowRankConfig(ratio=0.87)],
        "lowrank ½": [tq.LowRankConfig(ratio=0.5)],
        "kronecker+perm ÷2": [kron],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=["house-teacher", "smollm2-135m"], default="house-teacher")
    parser.add_argument("--calibration-tokens", type=int, default=32_768)
    parser.add_argument("--count-tokens", type=int, default=DEFAULT_COUNT_TOKENS)
    parser.add_argument("--max-tokens", type=int, default=8_000)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--time-budget", type=float, default=20.0, help="permutation search seconds per step")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--from-json", action="store_true", help="only rewrite the markdown and plot")
    args = parser.parse_args()
    path = args.out / "embedding_weighting.json"
    data = json.loads(path.read_text()) if path.exists() else {"runs": {}}
    data.setdefault("runs", {})
    data.pop("meta", None), data.pop("records", None)  # the single-model layout before --model
    if args.from_json:
        write_report(data, args.out)
        return

    if args.model == "smollm2-135m":
        teacher, tokenizer = load_smollm2()
    else:
        teacher, tokenizer = load_model(str(ASSETS / "house-teacher"))
    teacher.eval()
    name = compressible_modules(teacher)[0]  # the token embedding
    source = ASSETS / "corpus/gutenberg/train"
    text = load_blocks(source, tokenizer, args.window, args.calibration_tokens, seed=0)
    embedding = teacher.get_submodule(name)
    counts = token_counts(source, tokenizer, embedding.num_embeddings, args.count_tokens)
    stats = collect(teacher, [name], torch.cat([text.train, text.heldout]), progress=False, token_counts=counts)
    tied = stats.for_module(name)
    frequency_only = CalibrationStats(
        stats.owner, tokens={name: TokenStats(tied.counts)}, digests=stats.digests, model_type=stats.model_type
    )
    calibration = {"none": None, "frequency": frequency_only, "frequency + tied head": stats}
    label = buckets(counts)
    texts = {"heldout": torch.tensor(heldout_ids(tokenizer, args.max_tokens))}
    if args.model == "smollm2-135m":
        texts["wikitext2"] = torch.tensor(
            tokenizer(read_text("wikitext2"), verbose=False)["input_ids"][: args.max_tokens + 1]
        )
    hidden = []
    hook = teacher.get_output_embeddings().register_forward_pre_hook(lambda m, a: hidden.append(a[0][0].detach()))
    ppl, nll = evaluate(teacher, texts, label, args.window)
    hook.remove()
    hidden = torch.cat(hidden)[: texts["heldout"].numel() - 1]  # the held-out text comes first
    dense = embedding.weight.detach().clone()
    records = [{"variant": "dense", "weighting": None, "params": dense.numel(), **ppl, "nll": nll}]
    for variant, configs in variants(args.model, args.time_budget).items():
        for weighting in WEIGHTINGS:
            model = copy.deepcopy(teacher)
            plan = tq.CompressionPlan([tq.Rule(re.escape(name), config) for config in configs])
            tq.compress_(model, plan, calibration=calibration[weighting], progress=False)
            compressed = model.get_submodule(name)
            ppl, nll = evaluate(model.eval(), texts, label, args.window)
            record = {
                "variant": variant,
                "weighting": weighting,
                "params": tq.count_parameters(compressed),
                **ppl,
                "nll": nll,
                "head_error": head_errors(hidden, dense, compressed.weight.detach(), label),
            }
            records.append(record)
            print(json.dumps(record), flush=True)
            del model
    shares = {b: float((label == i).sum()) for i, b in enumerate(BUCKETS)}
    mass = {b: float(counts[label == i].sum() / counts.sum()) for i, b in enumerate(BUCKETS)}
    data["runs"][args.model] = {
        "meta": {
            "command": f"python benchmarks/embedding_weighting.py --model {args.model} "
            f"--calibration-tokens {args.calibration_tokens} --count-tokens {args.count_tokens} "
            f"--max-tokens {args.max_tokens} --window {args.window} --time-budget {args.time_budget}",
            "machine": machine(),
            "bucket_tokens": shares,
            "bucket_count_mass": mass,
        },
        "records": records,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))
    write_report(data, args.out)


def evaluate(model, texts: dict[str, torch.Tensor], label: torch.Tensor, window: int) -> tuple[dict, dict]:
    """({text}_ppl per text, NLL by bucket on the held-out text)."""
    ppl, nll = {}, {}
    for key, ids in texts.items():
        ppl[f"{key}_ppl"], by_bucket = nll_by_bucket(model, ids, label, window)
        nll = nll or by_bucket
    return ppl, nll


def write_report(data: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = ["# Weighting of embedding fits and the tied head (only the embedding compressed, no distillation)", ""]
    runs = data["runs"]
    fig, axes = plt.subplots(1, len(runs), figsize=(7 * len(runs), 4), squeeze=False)
    for (model, run), ax in zip(runs.items(), axes[0], strict=True):
        meta, records = run["meta"], run["records"]
        texts = [key[: -len("_ppl")] for key in records[0] if key.endswith("_ppl")]
        lines += [
            f"## {model}",
            "",
            f"Command: `{meta['command']}` on {meta['machine']}.",
            "Buckets (from the token counts on `corpus/gutenberg/train`): "
            + ", ".join(
                f"{b} {int(meta['bucket_tokens'][b]):,} ids ({meta['bucket_count_mass'][b]:.0%} of counted tokens)"
                for b in BUCKETS
            )
            + ".",
            "",
            "| embedding | weighting | params | "
            + " | ".join(f"{t} ppl" for t in texts)
            + " | head logit error frequent / seen / unseen | target NLL frequent / seen / unseen |",
            "|---|---|---:|" + "---:|" * len(texts) + "---|---|",
        ]
        for r in records:
            head = " / ".join(f"{r['head_error'][b]:.3f}" for b in BUCKETS) if "head_error" in r else "—"
            nll = " / ".join(f"{r['nll'][b]:.2f}" if b in r["nll"] else "—" for b in BUCKETS)
            ppl = " | ".join(f"{r[f'{t}_ppl']:.1f}" for t in texts)
            lines.append(f"| {r['variant']} | {r['weighting'] or '—'} | {r['params']:,} | {ppl} | {head} | {nll} |")
        lines += [""]
        for variant in dict.fromkeys(r["variant"] for r in records if "head_error" in r):
            found = {r["weighting"]: r for r in records if r["variant"] == variant}
            steps = " → ".join(
                f"{w} " + " / ".join(f"{found[w][f'{t}_ppl']:.1f}" for t in texts) for w in WEIGHTINGS if w in found
            )
            lines.append(f"- {variant}, {' / '.join(texts)} ppl: {steps}.")
        lines += [""]
        compressed = [r for r in records if "head_error" in r]
        width = 0.8 / len(compressed)
        for k, r in enumerate(compressed):
            ax.bar(
                [i + k * width for i in range(len(BUCKETS))],
                [r["head_error"][b] for b in BUCKETS],
                width,
                label=f"{r['variant']} ({r['weighting']})",
            )
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(BUCKETS))], BUCKETS)
        ax.set_title(model)
        ax.set_ylabel("relative logit error of the tied head")
        ax.legend(fontsize=6)
    lines += [
        "Perplexity over non-overlapping windows of `--window` tokens. Head logit error: ‖H (E − Ê)_Vᵀ‖ / "
        "‖H E_Vᵀ‖ with H the model's final hidden states on the held-out text and V the vocabulary ids of the "
        "bucket. Target NLL: mean next-token loss of the whole compressed model on the held-out text, grouped "
        "by the bucket of the token to predict.",
        "",
        "With one Kronecker term and B of one row, each token's row E'_v is the least-squares fit of its own row "
        "once b and the column order are fixed, so row weights can only change b and the order. The tied head's "
        "second moment C changes each row's fit (E'_v = E_v C Mᵀ (M C Mᵀ)⁻¹, M = I ⊗ bᵀ) and b (the maximiser "
        "of a trace ratio of width x width matrices); the column order is still searched on the "
        "frequency-weighted table. A low-rank fit shares its subspace across all rows; the tied head's second "
        "moment moves that subspace towards the directions the final hidden states take.",
    ]
    (out / "embedding_weighting.md").write_text("\n".join(lines) + "\n")
    fig.tight_layout()
    fig.savefig(out / "embedding_weighting.png", dpi=120)


if __name__ == "__main__":
    main()
