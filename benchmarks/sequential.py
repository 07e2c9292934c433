"""Sequential calibration against fitting at once, and the damping of the aimed weights (SmolLM2-135M).

    python benchmarks/sequential.py [--ratio 0.7] [--calibration-tokens 8192] [--max-tokens 8000]
        [--dampings 0.01 0.1 1.0] [--plans uniform mlp]

SmolLM2-135M (``../shared/assets/smollm2/fetch.sh``) with every linear layer but the head low-rank at one
rank ratio, so that the model keeps ``--ratio`` of its parameters (the allocation benchmark's
``uniform-svd`` plan), calibrated on ``corpus/gutenberg/train``; held-out perplexity on
``corpus/gutenberg/heldout``, WikiText-2 perplexity and LAMBADA accuracy (``--lambada-passages``).
Variants:

- ``at once``: one calibration pass over the original model, every layer fitted to it;
- ``sequential, not aimed``: ``compress_sequentially`` with damping 1e9, whose correction to W shrinks
  as 1/damping: each part calibrated on what the compressed model feeds it, fitted to its own weight;
- ``sequential, damping d``: the same, each part aimed at the original model's outputs, for every
  ``--dampings`` value.

Plan ``mlp`` (the case that broke SmolLM2 without calibration): every MLP projection low-rank at half
its parameters, attention dense; fitted at once, sequentially (default damping), and sequentially with
``aim_dense`` (the attention layers the plan keeps dense aimed too). ``--plans`` runs some of the two;
the records of the others in sequential.json are kept.

Writes benchmarks/results/sequential.{json,md,png}.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from allocation import evaluate, uniform_plan
from common import ASSETS, RESULTS, heldout_ids, load_smollm2, machine, machine_labels

import tqcompressor as tq
from tqcompressor.allocation import linear_layers
from tqcompressor.data import load_blocks
from tqcompressor.evaluation import lambada_passages, read_text
from tqcompressor.sequential import DAMPING, compress_sequentially

NOT_AIMED = 1e9
MLP = r".*\.mlp\.(gate|up|down)_proj"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ratio", type=float, default=0.7)
    parser.add_argument("--calibration-tokens", type=int, default=8192)
    parser.add_argument("--max-tokens", type=int, default=8_000)
    parser.add_argument("--lambada-passages", type=int, default=200)
    parser.add_argument("--dampings", type=float, nargs="+", default=[0.01, 0.1, 1.0])
    parser.add_argument("--plans", nargs="+", choices=["uniform", "mlp"], default=["uniform", "mlp"])
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--from-json", action="store_true", help="only rewrite the markdown and plot")
    args = parser.parse_args()
    if args.from_json:
        write_report(json.loads((args.out / "sequential.json").read_text()), args.out)
        return
    model, tokenizer = load_smollm2()
    model.eval()
    text = load_blocks(ASSETS / "corpus/gutenberg/train", tokenizer, 512, args.calibration_tokens, seed=0)
    blocks = torch.cat([text.train, text.heldout])
    texts = {
        "heldout": heldout_ids(tokenizer, args.max_tokens),
        "wikitext2": tokenizer(read_text("wikitext2"), verbose=False)["input_ids"][: args.max_tokens + 1],
    }
    passages = lambada_passages()[: args.lambada_passages]
    plans = {
        "uniform": uniform_plan(model, linear_layers(model), round(args.ratio * tq.count_parameters(model)), "svd"),
        "mlp": tq.CompressionPlan([tq.Rule(MLP, tq.LowRankConfig(ratio=0.5))], name="mlp-lowrank-0.5"),
    }
    previous = args.out / "sequential.json"
    earlier = json.loads(previous.read_text()) if previous.exists() else {"meta": {}, "records": []}
    records = [r for r in earlier["records"] if r["variant"] != "dense" and r.get("plan", "uniform") not in args.plans]
    records.insert(
        0,
        {
            "variant": "dense",
            "params": tq.count_parameters(model),
            "machine": machine(),
            **evaluate(model, texts, passages, tokenizer),
        },
    )
    variants = []
    if "uniform" in args.plans:
        variants += [("uniform", "at once", None, False), ("uniform", "sequential, not aimed", NOT_AIMED, False)]
        variants += [("uniform", f"sequential, damping {d:g}", d, False) for d in args.dampings]
    if "mlp" in args.plans:
        variants += [("mlp", "at once", None, False), ("mlp", "sequential, attention as it was", DAMPING, False)]
        variants += [("mlp", "sequential, attention aimed too (default)", DAMPING, True)]
    for plan_name, variant, damping, aim_dense in variants:
        plan = plans[plan_name]
        compressed = copy.deepcopy(model)
        started = time.perf_counter()
        if damping is None:
            stats = tq.calibrate(compressed, plan, blocks, progress=False)
            tq.compress_(compressed, plan, calibration=stats, progress=False)
        else:
            compress_sequentially(compressed, plan, blocks, progress=False, damping=damping, aim_dense=aim_dense)
        records.append(
            {
                "plan": plan_name,
                "variant": variant,
                "damping": damping,
                "params": tq.count_parameters(compressed),
                "seconds": time.perf_counter() - started,
                "machine": machine(),
                **evaluate(compressed, texts, passages, tokenizer),
            }
        )
        print(json.dumps(records[-1]), flush=True)
        del compressed
    command = (
        f"python benchmarks/sequential.py --ratio {args.ratio} --calibration-tokens {args.calibration_tokens} "
        f"--max-tokens {args.max_tokens} --lambada-passages {args.lambada_passages} "
        f"--dampings {' '.join(f'{d:g}' for d in args.dampings)} --plans {' '.join(args.plans)}"
    )
    data = {
        "meta": {
            "commands": [*earlier["meta"].get("commands", []), command],
            "plans": {name: plan.name for name, plan in plans.items()},
            "default_damping": DAMPING,
        },
        "records": records,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sequential.json").write_text(json.dumps(data, indent=1))
    write_report(data, args.out)


def write_report(data: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meta, records = data["meta"], data["records"]
    dense = next(r for r in records if r["variant"] == "dense")
    fitted = [r for r in records if r["variant"] != "dense"]
    machines, legend = machine_labels(records)
    lines = [
        "# Sequential calibration: SmolLM2-135M, low-rank, no training",
        "",
        "Commands, in order: " + "; ".join(f"`{c}`" for c in meta["commands"]) + f". {legend} "
        f"Dense: held-out ppl {dense['heldout_ppl']:.1f}, WikiText-2 {dense['wikitext2_ppl']:.1f}, LAMBADA "
        f"{dense['lambada_acc']:.3f} ({dense['params']:,} parameters). The library's "
        f"default damping: {meta['default_damping']:g}.",
    ]
    titles = {
        "uniform": "Every linear layer low-rank at one ratio",
        "mlp": "Every MLP projection low-rank at ½, attention dense",
    }
    for plan_name, title in titles.items():
        rows = [r for r in fitted if r.get("plan", "uniform") == plan_name]
        if not rows:
            continue
        at_once = next(r for r in rows if r["variant"] == "at once")
        lines += [
            "",
            f"## {title} (`{meta['plans'][plan_name]}`)",
            "",
            "| variant | params | held-out ppl | against at once | WikiText-2 ppl | LAMBADA acc | fitting s "
            "| machine |",
            "|---|---:|---:|---:|---:|---:|---:|---|",
        ]
        for r in rows:
            lines.append(
                f"| {r['variant']} | {r['params']:,} | {r['heldout_ppl']:.1f} | "
                f"{r['heldout_ppl'] / at_once['heldout_ppl']:.2f}x | {r['wikitext2_ppl']:.1f} | "
                f"{r['lambada_acc']:.3f} | {r['seconds']:.0f} | {machines[r['machine']]} |"
            )
    (out / "sequential.md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(7, 1 + 0.4 * len(fitted)))
    labels = [f"{r.get('plan', 'uniform')}: {r['variant']}" for r in fitted]
    ax.barh(labels, [r["heldout_ppl"] for r in fitted], color="tab:blue")
    ax.axvline(dense["heldout_ppl"], color="black", linestyle="--", label="dense")
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # overlapping labels otherwise
    ax.set_xlabel("held-out perplexity (log)")
    ax.invert_yaxis()
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "sequential.png", dpi=120)


if __name__ == "__main__":
    main()
