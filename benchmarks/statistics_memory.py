"""Calibration statistics larger than memory: a budget's statistics (input moments and Fisher) for a
1.1-1.2B-parameter LLaMA (TinyLlama-1.1B's or Llama-3.2-1B's shape), collected in passes and kept on disk,
then read back and priced as the allocation prices them. Random weights and token ids: memory, disk and
time depend on the shapes alone (no quality is measured here).

    python benchmarks/statistics_memory.py [--shape tinyllama-1.1b] [--tokens 6144] [--price-modules 14]

Writes benchmarks/results/statistics_memory.{json,md,png} (one row per shape, the latest run of each):
passes, seconds, disk, peak resident memory, and the resident memory over time against what was free
at the start.
"""

from __future__ import annotations

import argparse
import json
import threading
import time

import psutil
import torch
from common import RESULTS, command_line, machine
from transformers import LlamaConfig, LlamaForCausalLM

import tqcompressor as tq
from tqcompressor.allocation import candidates, compressible_modules, offered_methods
from tqcompressor.calibration import OnDisk, calibration_targets, collect, free_memory, statistics_bytes

GIB = 2**30
SHAPES = {
    "tinyllama-1.1b": {
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_hidden_layers": 22,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "vocab_size": 32000,
        "tie_word_embeddings": False,
    },
    "llama-3.2-1b": {
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "tie_word_embeddings": True,
    },
}


class Sampler(threading.Thread):
    """The process's resident memory every ``interval`` seconds, with the phase it was in."""

    def __init__(self, interval: float = 1.0):
        super().__init__(daemon=True)
        self.interval, self.phase, self.samples, self.started = interval, "build", [], time.perf_counter()
        self.process, self.done = psutil.Process(), threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.interval):
            rss = self.process.memory_info().rss
            self.samples.append((time.perf_counter() - self.started, rss / GIB, self.phase))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=SHAPES, default="tinyllama-1.1b")
    parser.add_argument("--tokens", type=int, default=0, help="calibration tokens (default: the widest input's width)")
    parser.add_argument("--price-modules", type=int, default=0, help="price only the first N modules (0: all)")
    args = parser.parse_args()
    sampler = Sampler()
    sampler.start()
    torch.manual_seed(0)
    shape = SHAPES[args.shape]
    model = LlamaForCausalLM(LlamaConfig(**shape)).eval()
    tokens = args.tokens or shape["intermediate_size"]
    ids = torch.randint(0, shape["vocab_size"], (-(-tokens // 512), 512), generator=torch.Generator().manual_seed(0))
    names = compressible_modules(model)
    linear, embeddings = calibration_targets(model, names)
    inputs, outputs = statistics_bytes(model, linear, embeddings, ids[:1, :8], fisher=True)
    record = {
        "model": f"{args.shape} (random weights)",
        "params": tq.count_parameters(model),
        "tokens": ids.numel(),
        "input_moments_gib": inputs / GIB,
        "fisher_gib": outputs / GIB,
        "free_gib_at_start": free_memory(torch.device("cpu")) / GIB,
        "resident_gib_before": psutil.Process().memory_info().rss / GIB,
    }
    sampler.phase = "collect"
    started = time.perf_counter()
    stats = collect(model, names, ids, progress=True, fisher=True)
    record["collect_seconds"] = time.perf_counter() - started
    on_disk = isinstance(stats.inputs, OnDisk)
    record["on_disk"] = on_disk
    if on_disk:
        files = [*stats.inputs.files.values(), *stats.outputs.files.values()]
        record["passes"] = stats.inputs.passes
        record["disk_gib"] = sum(path.stat().st_size for path in files) / GIB
    sampler.phase = "read back"
    started = time.perf_counter()
    stats.check(model, names)  # every module's statistics read once, as the allocation's check does
    record["read_back_seconds"] = time.perf_counter() - started
    sampler.phase = "price"
    priced = names[: args.price_modules] if args.price_modules else names
    started = time.perf_counter()
    for name in priced:
        candidates(name, model.get_submodule(name), stats.for_module(name), offered_methods(["lowrank"]))
    record["priced_modules"] = len(priced)
    record["price_seconds"] = time.perf_counter() - started
    sampler.phase = "done"
    time.sleep(2 * sampler.interval)
    sampler.done.set()
    record["peak_resident_gib"] = max(rss for _, rss, _ in sampler.samples)
    record["machine"] = machine()
    record["command"] = command_line("statistics_memory.py", args)
    record["samples"] = [[round(t, 1), round(rss, 3), phase] for t, rss, phase in sampler.samples]
    path = RESULTS / "statistics_memory.json"
    runs = json.loads(path.read_text())["runs"] if path.exists() else []
    runs = [run for run in runs if run["model"] != record["model"]] + [record]
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"runs": runs}) + "\n")  # one line: thousands of memory samples
    write_markdown(runs)
    plot(runs)
    print(json.dumps({k: v for k, v in record.items() if k != "samples"}, indent=2))


def write_markdown(runs: list[dict]) -> None:
    lines = ["# Calibration statistics larger than memory (a budget's, for 1.1-1.2B-parameter LLaMAs)", ""]
    lines += [f"- {run['model']}: `{run['command']}` on {run['machine']}" for run in runs]
    lines += ["", "Resident memory sampled every second (a shorter peak can be missed); sizes in GiB."]
    lines += ["", "| quantity | " + " | ".join(run["model"] for run in runs) + " |", "|---|" + "---:|" * len(runs)]
    keys = [key for key in runs[-1] if key not in ("model", "command", "machine", "samples")]
    for key in keys:
        values = [run.get(key) for run in runs]
        shown = [
            f"{v:,.2f}" if isinstance(v, float) else f"{v:,}" if type(v) is int else str(v).lower() for v in values
        ]
        lines.append(f"| {key} | " + " | ".join(shown) + " |")
    (RESULTS / "statistics_memory.md").write_text("\n".join(lines) + "\n")


def plot(runs: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(7 * len(runs), 4), squeeze=False)
    for ax, record in zip(axes[0], runs, strict=True):
        samples = record["samples"]
        for phase in dict.fromkeys(p for _, _, p in samples):
            points = [(t, rss) for t, rss, p in samples if p == phase]
            ax.plot([t for t, _ in points], [rss for _, rss in points], ".", markersize=2, label=phase)
        limit = record["free_gib_at_start"] + record["resident_gib_before"]
        ax.axhline(limit, color="black", linestyle="--", linewidth=1, label="resident + free at the start")
        statistics = record["input_moments_gib"] + record["fisher_gib"] + record["resident_gib_before"]
        ax.axhline(statistics, color="red", linestyle=":", linewidth=1, label="resident + statistics in memory")
        ax.set_xlabel("seconds")
        ax.set_ylabel("resident memory (GiB)")
        ax.set_title(f"{record['model']}: budget statistics in passes, on disk", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "statistics_memory.png", dpi=120)


if __name__ == "__main__":
    main()
