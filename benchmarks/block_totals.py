"""Experiment: does moving parameters between blocks change the best fit's perplexity? SmolLM2-135M at 70%,
the greedy Fisher choice among low-rank candidates (statistics and plan from benchmarks/block_ranks.py's cache:
32k calibration tokens drawn from 4.2M, seed 0), fitted sequentially with anchor 1 and 10 epochs of block
reconstruction as the greedy plan and with every low-rank layer's rank in blocks below ``--split`` scaled by
1 - delta and those from it on scaled up to hold the same parameter total (``--delta``; negative moves the
other way). Records held-out, WikiText-2 ppl and LAMBADA as allocation.py does. Not part of the library.

    python benchmarks/block_totals.py [--delta 0.15] [--split 15] [--out block_totals.json]
"""

import argparse
import copy
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch
from allocation import evaluate, evaluation_texts
from common import load_smollm2

import tqcompressor as tq
from tqcompressor.plan import CompressionPlan, Rule
from tqcompressor.sequential import compress_sequentially

p = argparse.ArgumentParser()
p.add_argument("--delta", type=float, default=0.15)
p.add_argument("--split", type=int, default=15)
p.add_argument("--plans", nargs="+", default=["greedy", "moved"])
p.add_argument("--out", default="block_totals.json")
args = p.parse_args()

state = torch.load("/tmp/block_ranks_state_32768.pt", weights_only=False)
model, tokenizer = load_smollm2()
model.eval()
texts, passages = evaluation_texts(tokenizer, 8000, 200)
greedy = CompressionPlan.from_dict(state["plan"])


def block_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[parts.index("layers") + 1]) if "layers" in parts else None


def moved_plan(plan: CompressionPlan) -> tuple[CompressionPlan, dict]:
    entries = []  # (rule index, in, out, rank, block)
    for i, rule in enumerate(plan.rules):
        name = rule.pattern.replace("\\", "")
        if rule.config.method == "lowrank" and block_of(name) is not None:
            m = model.get_submodule(name)
            entries.append((i, m.in_features, m.out_features, rule.config.rank_for(m.in_features, m.out_features)))
    cost = lambda e, r: r * (e[1] + e[2])  # noqa: E731
    early = [e for e in entries if block_of(plan.rules[e[0]].pattern.replace("\\", "")) < args.split]
    late = [e for e in entries if e not in early]
    new = {e[0]: max(1, round(e[3] * (1 - args.delta))) for e in early}
    freed = sum(cost(e, e[3]) for e in early) - sum(cost(e, new[e[0]]) for e in early)
    # the largest useful rank keeps fewer parameters than the dense layer
    cap = {e[0]: (e[1] * e[2]) // (e[1] + e[2]) for e in late}
    want = sum(cost(e, e[3]) for e in late) + freed
    lo, hi = -1.0, 10.0
    for _ in range(60):
        s = (lo + hi) / 2
        got = sum(cost(e, min(cap[e[0]], max(1, round(e[3] * (1 + s))))) for e in late)
        lo, hi = (s, hi) if got <= want else (lo, s)
    for e in late:
        new[e[0]] = min(cap[e[0]], max(1, round(e[3] * (1 + lo))))
    rules = [
        Rule(r.pattern, type(r.config)(rank=new[i], whitening=r.config.whitening)) if i in new else r
        for i, r in enumerate(plan.rules)
    ]
    info = {"late_scale": 1 + lo, "freed": freed, "late_added": sum(cost(e, new[e[0]]) - cost(e, e[3]) for e in late)}
    return CompressionPlan(rules, name=plan.name, tie_head=plan.tie_head), info


out = Path(args.out)
rows = json.loads(out.read_text())["rows"] if out.exists() else []
for which in args.plans:
    plan, info = (greedy, {}) if which == "greedy" else moved_plan(greedy)
    compressed = copy.deepcopy(model)
    started = time.perf_counter()
    compress_sequentially(
        compressed,
        plan,
        state["blocks"],
        progress=False,
        token_counts=state["counts"],
        output_moments=state["outputs"],
        anchor=1.0,
        reconstruction_epochs=10,
    )
    row = {
        "plan": which,
        "delta": 0.0 if which == "greedy" else args.delta,
        "split": args.split,
        **info,
        "params": tq.count_parameters(compressed),
        "compress_seconds": time.perf_counter() - started,
        **evaluate(compressed, texts, passages, tokenizer),
    }
    rows.append(row)
    print(json.dumps(row), flush=True)
    out.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    del compressed
