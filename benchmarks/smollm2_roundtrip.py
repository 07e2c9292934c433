"""SmolLM2-135M (a real LLaMA-architecture LM, loaded from GGUF) end to end: compress with the paper's
preset mapped onto LLaMA names (calibrated), save, reload, compare logits, export to a plain Hugging
Face directory, and evaluate each.

    python benchmarks/smollm2_roundtrip.py [--calibration-tokens 16384] [--max-tokens 4000]

Writes benchmarks/results/smollm2_roundtrip.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from common import ASSETS, RESULTS, heldout_ids, load_smollm2

import tqcompressor as tq
from tqcompressor.data import load_blocks
from tqcompressor.evaluation import perplexity
from tqcompressor.export import export
from tqcompressor.loading import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calibration-tokens", type=int, default=16_384)
    parser.add_argument("--max-tokens", type=int, default=4_000)
    parser.add_argument("--time-budget", type=float, default=3.0)
    args = parser.parse_args()
    model, tokenizer = load_smollm2()
    heldout = heldout_ids(tokenizer, args.max_tokens)
    record = {
        "params_dense": tq.count_parameters(model),
        "ppl_dense": perplexity(model, heldout, max_length=512)["ppl"],
    }
    text = load_blocks(ASSETS / "corpus/gutenberg/train", tokenizer, 512, args.calibration_tokens, seed=0)
    plan = tq.preset("tqcompressedgpt2", model.config, time_budget=args.time_budget)
    started = time.perf_counter()
    stats = tq.calibrate(model, plan, torch.cat([text.train, text.heldout]), progress=False)
    report = tq.compress_(model, plan, calibration=stats, progress=False)
    record.update(
        plan=plan.name,
        params=report.params_after,
        head=report.head,
        compress_seconds=time.perf_counter() - started,
        ppl_compressed=perplexity(model, heldout, max_length=512)["ppl"],
    )
    ids = torch.tensor([heldout[:64]])
    with tempfile.TemporaryDirectory() as folder:
        tq.save(model, Path(folder) / "run", tokenizer)
        loaded = tq.load(Path(folder) / "run")
        with torch.no_grad():
            logits, reloaded = model(ids).logits, loaded(ids).logits
        record["reload_bit_identical"] = bool(torch.equal(logits, reloaded))
        export(Path(folder) / "run", Path(folder) / "hf")
        dense, _ = load_model(str(Path(folder) / "hf"))
        with torch.no_grad():
            record["export_max_abs_logit_diff"] = float((dense(ids).logits - logits).abs().max())
        record["export_class"] = type(dense).__name__
        record["ppl_exported"] = perplexity(dense, heldout, max_length=512)["ppl"]
    record["command"] = "python benchmarks/smollm2_roundtrip.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "smollm2_roundtrip.json").write_text(json.dumps(record, indent=2))
    lines = ["# SmolLM2-135M end to end (GGUF in, calibrated tqcompressedgpt2 preset, save, reload, export)", ""]
    lines += [f"Command: `{record['command']}`.", "", "| quantity | value |", "|---|---|"]
    lines += [
        f"| {key} | {value:.4g} |" if isinstance(value, float) else f"| {key} | {value} |"
        for key, value in record.items()
        if key != "command"
    ]
    (RESULTS / "smollm2_roundtrip.md").write_text("\n".join(lines) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
