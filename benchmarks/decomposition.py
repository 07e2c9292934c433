"""Decomposition quality on real GPT-2 small attention matrices (layer speed: benchmarks/speed.py).

    python benchmarks/decomposition.py [--layers 0 1 ...] [--time-budget SECONDS]

Writes benchmarks/results/decomposition.json (one record per matrix, method and budget),
benchmarks/results/decomposition.md (means, the error reduction permutations bring, which start and
which move helped).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from tqcompressor import (
    nearest_kronecker,
    propose_kronecker_shape,
    search_permutations,
    truncated_svd,
)
from tqcompressor.methods.lowrank import rank_for_params

ROOT = Path(__file__).resolve().parents[1]
ASSET = ROOT.parent / "shared/assets/gpt2-attention/gpt2-small-partial.fp16.safetensors"
RESULTS = ROOT / "benchmarks/results"
RATIOS = (0.5, 0.25, 0.125)
# Settings of the committed results run: `python benchmarks/decomposition.py --layers 0 4 8 11` (20 s budget).
SEARCH_RECORDED = {"iterations": 6, "starts": ("identity", "cluster"), "time_budget": 20.0, "seed": 0}


def attention_matrices(path: Path, layers: list[int]) -> dict[str, torch.Tensor]:
    tensors = load_file(str(path))
    matrices = {}
    for layer in layers:
        qkv = tensors[f"h.{layer}.attn.c_attn.weight"].float()  # Conv1D layout: (in=768, out=3*768)
        for name, block in zip("qkv", qkv.split(qkv.shape[0], dim=1), strict=True):
            matrices[f"h.{layer}.attn.{name}"] = block.contiguous()
        matrices[f"h.{layer}.attn.c_proj"] = tensors[f"h.{layer}.attn.c_proj.weight"].float()
    return matrices


def measure_quality(matrices: dict[str, torch.Tensor], search_options: dict) -> list[dict]:
    records = []
    for name, weight in matrices.items():
        rows, cols = weight.shape
        for ratio in RATIOS:
            shape = propose_kronecker_shape(rows, cols, ratio)
            t0 = time.perf_counter()
            plain = nearest_kronecker(weight, shape)
            plain_seconds = time.perf_counter() - t0
            result = search_permutations(weight, shape, **search_options)
            rank = rank_for_params(rows, cols, shape.num_params)
            t0 = time.perf_counter()
            svd = truncated_svd(weight, rank)
            svd_seconds = time.perf_counter() - t0
            best = result.best_trial
            common = {"matrix": name, "ratio": ratio}
            records += [
                {
                    **common,
                    "method": "kronecker",
                    "params": shape.num_params,
                    "rel_error": plain.relative_error(weight),
                    "seconds": plain_seconds,
                    "factors": shape.describe(),
                },
                {
                    **common,
                    "method": "kronecker+perm",
                    "params": shape.num_params,
                    "rel_error": result.relative_error,
                    "seconds": result.seconds,
                    "factors": shape.describe(),
                    "best_start": best.start,
                    "move_gains": best.move_gains,
                    "start_errors": {t.start: t.error for t in result.trials},
                },
                {
                    **common,
                    "method": "svd",
                    "params": svd.num_params,
                    "rel_error": svd.relative_error(weight),
                    "seconds": svd_seconds,
                    "factors": f"rank {rank}",
                },
            ]
            print(
                f"{name} ratio {ratio}: plain {records[-3]['rel_error']:.4f} "
                f"perm {result.relative_error:.4f} svd {records[-1]['rel_error']:.4f} "
                f"({result.seconds:.1f}s, best start {best.start})",
                flush=True,
            )
    return records


def summarise(records: list[dict], search_options: dict, layers: list[int]) -> str:
    lines = [
        "# Decomposition quality on real GPT-2 small attention weights",
        "",
        f"Matrices: q, k, v (split from `c_attn`) and `c_proj` of layers {layers} "
        f"({len({r['matrix'] for r in records})} matrices of 768x768, fp16 weights computed in float32).",
        f"Search settings: `{search_options}`. Command: "
        "`python benchmarks/decomposition.py --layers 0 4 8 11 --time-budget 20`.",
        "",
        "| ratio | factors | params | kronecker | kronecker+perm | svd | perm reduction | search s/matrix |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for ratio in RATIOS:
        by_method = {
            m: [r for r in records if r["ratio"] == ratio and r["method"] == m]
            for m in ("kronecker", "kronecker+perm", "svd")
        }
        mean = {m: statistics.mean(r["rel_error"] for r in rs) for m, rs in by_method.items()}
        perm = by_method["kronecker+perm"]
        lines.append(
            f"| {ratio} | {perm[0]['factors']} | {perm[0]['params']} | {mean['kronecker']:.4f} | "
            f"{mean['kronecker+perm']:.4f} | {mean['svd']:.4f} | "
            f"{1 - mean['kronecker+perm'] / mean['kronecker']:.1%} | "
            f"{statistics.mean(r['seconds'] for r in perm):.1f} |"
        )
    lines += ["", "Relative Frobenius error, mean over matrices; perm reduction = 1 - perm/plain.", ""]
    perm = [r for r in records if r["method"] == "kronecker+perm"]
    wins: dict[str, int] = {}
    gains: dict[str, float] = {}
    for r in perm:
        wins[r["best_start"]] = wins.get(r["best_start"], 0) + 1
        for move, gain in r["move_gains"].items():
            gains[move] = gains.get(move, 0.0) + gain / len(perm)
    started = sorted({s for r in perm for s in r["start_errors"]})
    # A start the time budget never reached is averaged over the cases where it ran.
    start_means = {s: statistics.mean(r["start_errors"][s] for r in perm if s in r["start_errors"]) for s in started}
    lines += [
        "## What helped",
        "",
        "Best starting order (count of matrix x budget cases won): "
        + ", ".join(f"{k} {v}" for k, v in sorted(wins.items(), key=lambda kv: -kv[1])),
        "",
        "Mean final error by starting order: " + ", ".join(f"{k} {v:.4f}" for k, v in start_means.items()),
        "",
        "Mean relative-error reduction contributed by each move in the winning trial: "
        + ", ".join(f"{k} {v:.4f}" for k, v in sorted(gains.items(), key=lambda kv: -kv[1])),
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=list(range(12)))
    parser.add_argument("--iterations", type=int, default=6)
    parser.add_argument("--time-budget", type=float, default=8.0, help="search seconds per matrix and budget")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--from-json", action="store_true", help="only rewrite the markdown from the saved JSON")
    args = parser.parse_args()
    if args.from_json:
        records = json.loads((args.out / "decomposition.json").read_text())
        layers = sorted({int(r["matrix"].split(".")[1]) for r in records})
        (args.out / "decomposition.md").write_text(summarise(records, SEARCH_RECORDED, layers))
        print((args.out / "decomposition.md").read_text())
        return
    if not ASSET.exists():
        raise SystemExit(f"missing {ASSET}: run from a checkout with ../shared/assets beside it")
    search_options = {
        "iterations": args.iterations,
        "starts": ("identity", "cluster"),
        "time_budget": args.time_budget,
        "seed": 0,
    }
    records = measure_quality(attention_matrices(ASSET, args.layers), search_options)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "decomposition.json").write_text(json.dumps(records, indent=1))
    (args.out / "decomposition.md").write_text(summarise(records, search_options, args.layers))
    print((args.out / "decomposition.md").read_text())


if __name__ == "__main__":
    main()
