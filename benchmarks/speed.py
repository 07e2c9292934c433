"""How fast compressed layers and models run against the dense original, and how long compression takes.

    python benchmarks/speed.py [--parts layers compiled models reads experts compression] [--rounds 7]

Layers: forward time over dense ``nn.Linear`` time measured in the same run (interleaved rounds,
medians), at GPT-2 small and SmolLM2-135M MLP shapes, for Kronecker factorisations at ½ the dense
parameters (r=1 B 2x1, r=2 B 2x2, r=4 B 2x4 / 4x2 as the presets use; with and without permutations)
and low-rank at equal parameters; for 1 token (decode), 8 tokens and 8x1024 tokens (prefill), in float32
and under bfloat16 autocast (where the CPU computes bf16 natively). Each record carries the multiply-adds
per token next to the time.
Compiled: the presets' r=4 permuted layers under ``torch.compile``, against eager, float32.
Models: tokens/s of prefill (one 512-token prompt) and of greedy decode with the KV cache, original
against compressed (every MLP projection halved: Kronecker + permutations, the same with the
permutations folded by ``tq.fold_permutations``, and low-rank), for the house teacher (plus its tied
÷4 embedding, the ``tqcompressedgpt2`` preset) and SmolLM2-135M. Speed does not depend on the
weights' values, so factors are fitted data-free without the search and the permutations are random
ones, which cost what searched ones cost.
Reads: greedy decode of a model that reads its head's weight at every step (Mamba casts its input to
``lm_head.weight.dtype``), Mamba-130m's shape with random weights: dense, its tied embedding compressed,
and the same with every read computing the whole table (as before such reads were deferred).
Experts: one MoE layer's experts of granite-3.0-1b-a400m's shape (32 experts of 1024 -> 2x512 -> 1024, 8
per token; random weights and routing): the stock fused tensors under transformers' default implementation,
under transformers' eager loop, unfused into per-expert linear layers (``tq.unfuse_experts``), and those at
½ their parameters (low-rank), for 1, 8 and 8x512 tokens, float32.
Compression: wall time of the ``tqcompressedgpt2`` preset with default search settings on a
random-weight GPT-2 small, and of a calibrated low-rank plan on SmolLM2 (calibration included).
Writes benchmarks/results/speed.{json,md,png}.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from common import ASSETS, RESULTS, load_smollm2, machine
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

import tqcompressor as tq
from tqcompressor.data import load_blocks
from tqcompressor.loading import load_model
from tqcompressor.methods.kronecker import KroneckerFactors, KroneckerLinear
from tqcompressor.methods.lowrank import LowRankFactors, LowRankLinear, rank_for_params
from tqcompressor.presets import halved_mlp_rules, matching_svd_plan
from tqcompressor.training.step import computes_bf16_natively

SHAPES = {"gpt2 mlp in": (768, 3072), "gpt2 mlp out": (3072, 768), "smollm2 mlp in": (576, 1536)}
SHAPES["smollm2 mlp out"] = (1536, 576)
TOKENS = (1, 8, 8192)


def kronecker_layers(rows: int, cols: int) -> dict[str, tuple[int, int, int, int, int]]:
    """Factor shapes (m1, n1, m2, n2, r) at ½ the dense parameters, B's shape following the MLP's direction."""
    grow = cols > rows
    return {
        "r1 B2x1": (rows // 2, cols, 2, 1, 1),
        "r2 B2x2": (rows // 2, cols // 2, 2, 2, 2),
        "r4 B2x4" if grow else "r4 B4x2": (rows // 2, cols // 4, 2, 4, 4) if grow else (rows // 4, cols // 2, 4, 2, 4),
    }


def layer_variants(rows: int, cols: int) -> dict[str, tuple[nn.Module, Callable[[int], int]]]:
    """name -> (module, multiply-adds per token at a number of tokens), all at about half the dense
    parameters."""
    g = torch.Generator().manual_seed(0)
    variants: dict[str, tuple[nn.Module, Callable[[int], int]]] = {
        "dense": (nn.Linear(rows, cols), lambda tokens: rows * cols)
    }
    bias = torch.randn(cols, generator=g)
    for name, (m1, n1, m2, n2, r) in kronecker_layers(rows, cols).items():
        a, b = torch.randn(r, m1, n1, generator=g), torch.randn(r, m2, n2, generator=g)
        for permute in (False, True):
            orders = (torch.randperm(rows, generator=g), torch.randperm(cols, generator=g))
            if not permute:
                orders = (torch.arange(rows), torch.arange(cols))
            layer = KroneckerLinear(KroneckerFactors(a, b, *orders), bias)
            variants[f"kronecker{'+perm' if permute else ''} {name}"] = (layer, layer.multiply_adds)
    rank = rank_for_params(rows, cols, rows * cols // 2)
    u, v = torch.randn(rows, rank, generator=g), torch.randn(rank, cols, generator=g)
    variants[f"lowrank r{rank}"] = (LowRankLinear(LowRankFactors(u, v), bias), lambda tokens: rank * (rows + cols))
    return variants


# bf16 rows only where the CPU computes bf16 natively (AVX-512, AMX): an AVX2-only CPU emulates it, 80x
# slower than float32, which measures the emulation rather than the layers.
DTYPES = ("float32", "bf16") if computes_bf16_natively(torch.device("cpu")) else ("float32",)


def autocast(dtype: str):
    return torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()


def forward(module: nn.Module, x: torch.Tensor, dtype: str = "float32") -> Callable[[], object]:
    """One inference forward pass of ``module`` on ``x``, as a call to time."""

    def run():
        with torch.inference_mode(), autocast(dtype):
            return module(x)

    return run


def interleaved_medians(calls: dict[str, Callable[[], object]], rounds: int, min_seconds: float = 0.005) -> dict:
    """Median seconds per call of each callable, timed in turns so that machine noise hits all alike."""
    repeats = {}
    for name, call in calls.items():
        for _ in range(3):  # warm-up: thread pools, allocator, first-call dispatch
            call()
        started = time.perf_counter()
        call()
        repeats[name] = max(1, int(min_seconds / max(time.perf_counter() - started, 1e-7)))
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            started = time.perf_counter()
            for _ in range(repeats[name]):
                call()
            samples[name].append((time.perf_counter() - started) / repeats[name])
    return {name: statistics.median(times) for name, times in samples.items()}


def measure_layers(rounds: int) -> list[dict]:
    records = []
    for shape_name, (rows, cols) in SHAPES.items():
        variants = layer_variants(rows, cols)
        for tokens in TOKENS:
            x = torch.randn(tokens, rows)
            for dtype in DTYPES:
                times = interleaved_medians(
                    {name: forward(module, x, dtype) for name, (module, _) in variants.items()},
                    rounds if tokens > 8 else 4 * rounds,
                )
                for name, (module, multiply_adds) in variants.items():
                    if name == "dense":
                        continue
                    records.append(
                        {
                            "kind": "layer",
                            "method": name,
                            "shape": f"{shape_name} {rows}x{cols}",
                            "tokens": tokens,
                            "dtype": dtype,
                            "ratio_to_dense": times[name] / times["dense"],
                            "flops_ratio": multiply_adds(tokens) / (rows * cols),
                            "params_ratio": tq.count_parameters(module) / (rows * cols + cols),
                            "dense_ms": times["dense"] * 1e3,
                        }
                    )
                    print(json.dumps(records[-1]), flush=True)
    return records


def measure_compiled(rounds: int) -> list[dict]:
    """The presets' r=4 permuted layers under ``torch.compile`` against eager, float32 (dense: eager)."""
    records = []
    for shape_name, (rows, cols) in SHAPES.items():
        variants = layer_variants(rows, cols)
        name = next(n for n in variants if n.startswith("kronecker+perm r4"))
        layer, multiply_adds = variants[name]
        compiled = torch.compile(layer, dynamic=False)
        for tokens in (1, 8192):
            x = torch.randn(tokens, rows)

            calls = {name: forward(module, x) for name, module in (("dense", variants["dense"][0]), ("eager", layer))}
            calls["compiled"] = forward(compiled, x)
            times = interleaved_medians(calls, rounds if tokens > 8 else 4 * rounds)
            records.append(
                {
                    "kind": "layer",
                    "method": f"compiled {name}",
                    "shape": f"{shape_name} {rows}x{cols}",
                    "tokens": tokens,
                    "dtype": "float32",
                    "ratio_to_dense": times["compiled"] / times["dense"],
                    "eager_ratio_to_dense": times["eager"] / times["dense"],
                    "flops_ratio": multiply_adds(tokens) / (rows * cols),
                    "params_ratio": tq.count_parameters(layer) / (rows * cols + cols),
                    "dense_ms": times["dense"] * 1e3,
                }
            )
            print(json.dumps(records[-1]), flush=True)
    return records


def mlp_rules(model: nn.Module) -> dict[str, tq.CompressionPlan]:
    """Every MLP projection halved, as Kronecker (r=4, B 2x4 / 4x2; no search) and as low-rank."""
    rules = halved_mlp_rules(model.config, r"\d+", permute=False)
    if model.config.model_type == "gpt2":  # the preset's tied embedding ÷2 then ÷2 as well
        embedding = tq.Rule(r"transformer\.wte", tq.KroneckerConfig(embedding_factor=2, permute=False))
        rules = [embedding, *rules, embedding]
    kronecker = tq.CompressionPlan(rules, name="kronecker+perm")
    return {"kronecker+perm": kronecker, "lowrank": matching_svd_plan(model, kronecker)}


def randomise_orders(model: nn.Module, seed: int = 0) -> None:
    """Random permutations in every Kronecker layer: what a searched order costs at run time."""
    g = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, KroneckerLinear):
            module.input_index.copy_(torch.randperm(module.in_features, generator=g))
            module.output_index.copy_(torch.randperm(module.out_features, generator=g))
            module.refresh_orders()
        elif isinstance(module, tq.KroneckerEmbedding):
            for stage in range(len(module.scales)):
                index = module.stage_index(stage)
                index.copy_(torch.randperm(len(index), generator=g))


def measure_models(rounds: int, prompt_tokens: int, decode_tokens: int) -> list[dict]:
    """Prefill and per-token decode times, each model's turn interleaved with the others' at every
    step, medians: the machine's noise comes in bursts of seconds, which would otherwise land on
    whichever model happened to run then."""
    records = []
    loaders = {"house-teacher": lambda: load_model(str(ASSETS / "house-teacher")), "smollm2-135m": load_smollm2}
    for model_name, loader in loaders.items():
        original, _ = loader()
        original.eval()
        models = {"dense": original}
        for method, plan in mlp_rules(original).items():
            compressed = copy.deepcopy(original)
            tq.compress_(compressed, plan, progress=False)
            randomise_orders(compressed)
            models[method] = compressed.eval()
            if method == "kronecker+perm":
                folded = copy.deepcopy(compressed)
                tq.fold_permutations(folded)
                models[f"{method} folded"] = folded
        prompt = torch.randint(0, original.config.vocab_size, (1, prompt_tokens), generator=torch.Generator())
        for dtype in DTYPES:
            prefill = {name: [] for name in models}
            decode = {name: [] for name in models}
            with torch.inference_mode(), autocast(dtype):
                for model in models.values():  # warm-up
                    model(prompt[:, :16], use_cache=True)
                for _ in range(rounds):
                    state = {}
                    for name, model in models.items():
                        started = time.perf_counter()
                        out = model(prompt, use_cache=True)
                        prefill[name].append(time.perf_counter() - started)
                        state[name] = (out.past_key_values, out.logits[:, -1:].argmax(-1))
                    for _ in range(decode_tokens):
                        for name, model in models.items():
                            cache, token = state[name]
                            started = time.perf_counter()
                            out = model(token, past_key_values=cache, use_cache=True)
                            decode[name].append(time.perf_counter() - started)
                            state[name] = (out.past_key_values, out.logits[:, -1:].argmax(-1))
            medians = {name: (statistics.median(prefill[name]), statistics.median(decode[name])) for name in models}
            for name, model in models.items():
                for phase, seconds, dense_seconds, tokens in (
                    ("prefill", medians[name][0], medians["dense"][0], prompt_tokens),
                    ("decode", medians[name][1], medians["dense"][1], 1),
                ):
                    records.append(
                        {
                            "kind": "model",
                            "model": model_name,
                            "method": name,
                            "shape": f"{tq.count_parameters(model) / 1e6:.1f}M params",
                            "params": tq.count_parameters(model),
                            "tokens": tokens,
                            "dtype": dtype,
                            "phase": phase,
                            "tokens_per_s": tokens / seconds,
                            "ratio_to_dense": seconds / dense_seconds,
                        }
                    )
                    print(json.dumps(records[-1]), flush=True)
    return records


def measure_reads(rounds: int, decode_tokens: int) -> list[dict]:
    """Seconds per greedy token of a Mamba of Mamba-130m's shape (random weights), dense and with its tied
    embedding compressed, with reads of ``lm_head.weight`` deferred (the library) and computed in full."""
    from unittest import mock

    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(0)
    config = MambaConfig(vocab_size=50_280, hidden_size=768, num_hidden_layers=24, state_size=16)
    models = {"dense": MambaForCausalLM(config).eval()}
    for method, embedding in (
        ("lowrank 1/2", tq.LowRankConfig(ratio=0.5)),
        ("kronecker /2", tq.KroneckerConfig(embedding_factor=2, permute=False)),
    ):
        compressed = copy.deepcopy(models["dense"])
        tq.compress_(compressed, tq.CompressionPlan([tq.Rule(r"backbone\.embeddings", embedding)]), progress=False)
        models[f"embedding {method}"] = compressed
    prompt = torch.randint(0, config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))

    def decode(model: nn.Module, computed_in_full: bool) -> Callable[[], object]:
        def run():
            with contextlib.ExitStack() as stack:
                if computed_in_full:
                    for where in ("tqcompressor.methods.targets", "tqcompressor.tied_head"):
                        stack.enter_context(mock.patch(f"{where}.computed_weight", lambda compute, *_: compute()))
                model.generate(prompt, max_new_tokens=decode_tokens, do_sample=False, pad_token_id=0)

        return run

    calls = {name: decode(model, False) for name, model in models.items()}
    calls |= {f"{name}, every read computed": decode(model, True) for name, model in models.items() if name != "dense"}
    medians = interleaved_medians(calls, rounds)
    records = []
    for name, seconds in medians.items():
        model = models[name.split(",")[0]]
        records.append(
            {
                "kind": "read",
                "model": "mamba-130m shape (random)",
                "method": name,
                "params": tq.count_parameters(model),
                "seconds_per_token": seconds / decode_tokens,
                "ratio_to_dense": seconds / medians["dense"],
            }
        )
        print(json.dumps(records[-1]), flush=True)
    return records


def measure_experts(rounds: int) -> list[dict]:
    from transformers import GraniteMoeConfig
    from transformers.models.granitemoe.modeling_granitemoe import GraniteMoeExperts

    config = GraniteMoeConfig(hidden_size=1024, intermediate_size=512, num_local_experts=32, num_experts_per_tok=8)
    config._experts_implementation = "grouped_mm"  # what a model built on this CPU chooses by default
    torch.manual_seed(0)
    fused = GraniteMoeExperts(config).eval()
    for weight in fused.parameters():
        nn.init.normal_(weight, std=0.02)
    holder = nn.ModuleDict({"experts": fused})
    eager = copy.deepcopy(holder)
    eager["experts"].config._experts_implementation = "eager"
    unfused = copy.deepcopy(holder)
    tq.unfuse_experts(unfused)
    halved = copy.deepcopy(unfused)
    rule = tq.Rule(r"experts\.(gate_up|down)_proj\.\d+", tq.LowRankConfig(ratio=0.5))
    tq.compress_(halved, tq.CompressionPlan([rule]), progress=False)
    variants = {
        "fused (stock)": holder,
        "fused, eager": eager,
        "unfused, dense": unfused,
        "unfused, low-rank 1/2": halved,
    }
    shape = "granite-3.0-1b-a400m experts (32 x 1024->2x512->1024, top 8)"
    records = []
    for tokens in (1, 8, 8 * 512):
        generator = torch.Generator().manual_seed(tokens)
        x = torch.randn(tokens, config.hidden_size, generator=generator)
        index = torch.rand(tokens, config.num_local_experts, generator=generator).topk(8).indices
        weights = torch.rand(tokens, 8, generator=generator)

        calls = {name: partial(run_experts, module["experts"], x, index, weights) for name, module in variants.items()}
        medians = interleaved_medians(calls, rounds)
        for name, seconds in medians.items():
            records.append(
                {
                    "kind": "experts",
                    "shape": shape,
                    "method": name,
                    "implementation": variants[name]["experts"].config._experts_implementation,
                    "tokens": tokens,
                    "params": tq.count_parameters(variants[name]),
                    "seconds": seconds,
                    "ratio_to_dense": seconds / medians["fused (stock)"],
                }
            )
            print(json.dumps(records[-1]), flush=True)
    return records


@torch.inference_mode()
def run_experts(experts: nn.Module, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> None:
    experts(x, index, weights)


def measure_compression(calibration_tokens: int) -> list[dict]:
    records = []
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config())
    started = time.perf_counter()
    report = tq.compress_(gpt2, "tqcompressedgpt2", progress=False)
    records.append(
        {
            "kind": "compression",
            "model": "gpt2-small (random weights)",
            "plan": "tqcompressedgpt2, default search settings",
            "seconds": time.perf_counter() - started,
            "params": tq.count_parameters(gpt2),
            "slowest_layers": sorted(((l.name, l.seconds) for l in report.layers), key=lambda x: -x[1])[:3],
        }
    )
    print(json.dumps(records[-1]), flush=True)
    del gpt2

    model, tokenizer = load_smollm2()
    kronecker = mlp_rules(model)["kronecker+perm"]
    plan = matching_svd_plan(model, kronecker)
    started = time.perf_counter()
    text = load_blocks(ASSETS / "corpus/gutenberg/train", tokenizer, 512, calibration_tokens, seed=0)
    stats = tq.calibrate(model, plan, torch.cat([text.train, text.heldout]), progress=False)
    calibrated = time.perf_counter() - started
    tq.compress_(model, plan, calibration=stats, progress=False)
    records.append(
        {
            "kind": "compression",
            "model": "smollm2-135m",
            "plan": f"every MLP projection ½, calibrated low-rank ({calibration_tokens} calibration tokens)",
            "seconds": time.perf_counter() - started,
            "calibration_seconds": calibrated,
            "params": tq.count_parameters(model),
        }
    )
    print(json.dumps(records[-1]), flush=True)
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parts = ["layers", "compiled", "models", "reads", "experts", "compression"]
    parser.add_argument("--parts", nargs="+", choices=parts, default=parts)
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds (x4 for 1 and 8 tokens)")
    parser.add_argument("--model-rounds", type=int, default=5, help="prompts per model (each then decoded)")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--calibration-tokens", type=int, default=32_768)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--from-json", action="store_true", help="only rewrite the markdown and plot")
    args = parser.parse_args()
    path = args.out / "speed.json"
    if args.from_json:
        write_report(json.loads(path.read_text()), args.out)
        return
    previous = json.loads(path.read_text()) if path.exists() else {"meta": {}, "records": []}
    kinds = {
        "layers": "layer",
        "compiled": "compiled",
        "models": "model",
        "reads": "read",
        "experts": "experts",
        "compression": "compression",
    }
    command = (
        f"python benchmarks/speed.py --parts {' '.join(args.parts)} --rounds {args.rounds} "
        f"--model-rounds {args.model_rounds} --prompt-tokens {args.prompt_tokens} "
        f"--decode-tokens {args.decode_tokens} --calibration-tokens {args.calibration_tokens}"
    )
    data = {
        "meta": {
            # Parts not run this time keep their records and the command that made them.
            "commands": {**previous["meta"].get("commands", {}), **{part: command for part in args.parts}},
            "machines": {**previous["meta"].get("machines", {}), **{part: machine() for part in args.parts}},
        },
        "records": [r for r in previous["records"] if record_kind(r) not in {kinds[part] for part in args.parts}],
    }
    if "layers" in args.parts:
        data["records"] += measure_layers(args.rounds)
    if "compiled" in args.parts:
        data["records"] += measure_compiled(args.rounds)
    if "models" in args.parts:
        data["records"] += measure_models(args.model_rounds, args.prompt_tokens, args.decode_tokens)
    if "reads" in args.parts:
        data["records"] += measure_reads(args.model_rounds, args.decode_tokens)
    if "experts" in args.parts:
        data["records"] += measure_experts(args.rounds)
    if "compression" in args.parts:
        data["records"] += measure_compression(args.calibration_tokens)
    args.out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))
    write_report(data, args.out)


def record_kind(record: dict) -> str:
    """The part of the benchmark that made ``record`` (compiled layers are layer records)."""
    return "compiled" if record.get("method", "").startswith("compiled ") else record["kind"]


def write_report(data: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = data["records"]
    lines = [
        "# Speed of compressed layers and models against the dense original",
        "",
        "Each part's rows come from its latest run, on the machine named:",
        "",
        *(
            f"- {part}: `{command}` on {data['meta']['machines'][part]}"
            for part, command in data["meta"]["commands"].items()
        ),
        "",
        "Times are ratios to the dense module or model measured in the same run (interleaved rounds, medians); "
        "below 1 is faster than dense. FLOPs: multiply-adds per token over the dense layer's, in the "
        "contraction order the layer takes at that many tokens; where they differ by token count the column "
        "gives 1 token / 8 tokens / 8x1024 tokens (B-first layers contract with A first for one token, to "
        "read A once; from 1024 tokens per forward Kronecker layers build their dense matrix, r x in x out "
        "multiply-adds once, and take one dense GEMM).",
    ]
    layers = [r for r in records if r["kind"] == "layer"]
    if layers:
        lines += ["", "## Layers at ½ the dense parameters", ""]
        for dtype in dict.fromkeys(r["dtype"] for r in layers):
            lines += [
                f"### {dtype}",
                "",
                "| shape | method | FLOPs | 1 token | 8 tokens | 8x1024 tokens |",
                "|---|---|---:|---:|---:|---:|",
            ]
            rows = dict.fromkeys((r["shape"], r["method"]) for r in layers if r["dtype"] == dtype)
            for shape, method in rows:
                key = (shape, method, dtype)
                cells = {r["tokens"]: r for r in layers if (r["shape"], r["method"], r["dtype"]) == key}
                flops = [f"{cells[t]['flops_ratio']:.2f}" for t in TOKENS if t in cells]
                flops = flops[0] if len(set(flops)) == 1 else " / ".join(flops)
                ratios = " | ".join(f"{cells[t]['ratio_to_dense']:.2f}" if t in cells else "—" for t in TOKENS)
                lines.append(f"| {shape} | {method} | {flops} | {ratios} |")
            lines.append("")
        compiled = [r for r in layers if r["method"].startswith("compiled ")]
        if compiled:
            lines += [
                "`torch.compile` of the r=4 permuted layer against eager, float32, both from the run that "
                "measured `--parts compiled`:",
                "",
            ]
            lines += [
                f"- {r['shape']}, {r['tokens']} tokens: compiled {r['ratio_to_dense']:.2f}x dense, "
                f"eager {r['eager_ratio_to_dense']:.2f}x"
                for r in compiled
            ]
            lines.append("")
        lines += targets(layers)
    models = [r for r in records if r["kind"] == "model"]
    if models:
        lines += [
            "",
            "## Whole models (prefill: one prompt; decode: greedy with the KV cache)",
            "",
            "| model | method | params | dtype | prefill tok/s | prefill ratio | decode tok/s | decode ratio |",
            "|---|---|---:|---|---:|---:|---:|---:|",
        ]
        keys = dict.fromkeys((r["model"], r["method"], r["dtype"]) for r in models)
        for model, method, dtype in keys:
            phase = {r["phase"]: r for r in models if (r["model"], r["method"], r["dtype"]) == (model, method, dtype)}
            p, d = phase["prefill"], phase["decode"]
            lines.append(
                f"| {model} | {method} | {p['params']:,} | {dtype} | {p['tokens_per_s']:.0f} | "
                f"{p['ratio_to_dense']:.2f} | {d['tokens_per_s']:.1f} | {d['ratio_to_dense']:.2f} |"
            )
        smol = [r for r in models if r["model"] == "smollm2-135m" and r["phase"] == "decode" and r["method"] != "dense"]
        for r in smol:
            verdict = "met" if r["ratio_to_dense"] <= 1.0 else "missed"
            lines.append(
                f"\nTarget, SmolLM2 with MLPs halved ({r['method']}, {r['dtype']}): decode tokens/s at least the "
                f"original's: {verdict} ({1 / r['ratio_to_dense']:.2f}x the original's tokens/s)."
            )
    reads = [r for r in records if r["kind"] == "read"]
    if reads:
        lines += [
            "",
            "## A model that reads its head's weight (greedy decode, float32)",
            "",
            "Mamba casts its input to `lm_head.weight.dtype` at every step; with the tied embedding compressed, "
            "the head's weight is computed from the factors. The library defers that computation when no "
            "gradients are recorded; the rows marked 'every read computed' compute it in full at each read.",
            "",
            "| model | method | params | s/token | ratio to dense |",
            "|---|---|---:|---:|---:|",
        ]
        lines += [
            f"| {r['model']} | {r['method']} | {r['params']:,} | {r['seconds_per_token']:.4f} | "
            f"{r['ratio_to_dense']:.2f} |"
            for r in reads
        ]
    experts = [r for r in records if r["kind"] == "experts"]
    if experts:
        lines += [
            "",
            f"## MoE experts: {experts[0]['shape']}, float32",
            "",
            "Forward of one layer's experts (random routing): the stock fused tensors under the implementation "
            "a model built on this CPU takes (grouped_mm) and under transformers' eager loop, the same experts as "
            "per-expert linear layers (`tq.unfuse_experts`, what plans and budgets compress), and those at ½ "
            "their parameters.",
            "",
            "| method | implementation | params | 1 token | 8 tokens | 4096 tokens |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for method in dict.fromkeys(r["method"] for r in experts):
            cells = {r["tokens"]: r for r in experts if r["method"] == method}
            first = next(iter(cells.values()))
            ratios = " | ".join(f"{cells[t]['ratio_to_dense']:.2f}" for t in sorted(cells))
            lines.append(f"| {method} | {first['implementation']} | {first['params']:,} | {ratios} |")
    compression = [r for r in records if r["kind"] == "compression"]
    if compression:
        lines += ["", "## Compression time", ""]
        for r in compression:
            lines.append(f"- {r['model']}, {r['plan']}: {r['seconds']:.0f} s")
            if "slowest_layers" in r:
                slowest = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in r["slowest_layers"])
                verdict = "met" if r["seconds"] < 300 else "missed"
                lines[-1] += f" (slowest: {slowest}). Target under 5 minutes on this machine: {verdict}."
            if "calibration_seconds" in r:
                lines[-1] += f" (calibration {r['calibration_seconds']:.0f} s)."
    (out / "speed.md").write_text("\n".join(lines) + "\n")

    if layers:
        fig, axes = plt.subplots(1, len(TOKENS), figsize=(5 * len(TOKENS), 4.5), sharey=True)
        float32 = [r for r in layers if r["dtype"] == "float32"]
        methods = list(dict.fromkeys(r["method"] for r in float32))
        shapes = list(dict.fromkeys(r["shape"] for r in float32))
        for ax, tokens in zip(axes, TOKENS, strict=True):
            for method in methods:
                points = [
                    (shapes.index(r["shape"]), r["ratio_to_dense"])
                    for r in float32
                    if r["method"] == method and r["tokens"] == tokens
                ]
                ax.plot(*zip(*points, strict=True), marker="o", linestyle="", label=method)
            ax.axhline(1.0, color="grey", linewidth=0.8)
            ax.set_xticks(range(len(shapes)), [s.split(" ", 1)[1] if " " in s else s for s in shapes], rotation=20)
            ax.set_title(f"{tokens} tokens per forward (float32)")
            ax.set_yscale("log")
        axes[0].set_ylabel("time / dense nn.Linear time")
        axes[-1].legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(out / "speed.png", dpi=120)
    if experts:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        methods = list(dict.fromkeys(r["method"] for r in experts))
        counts = sorted({r["tokens"] for r in experts})
        for i, method in enumerate(methods):
            cells = {r["tokens"]: r["ratio_to_dense"] for r in experts if r["method"] == method}
            ratios = [cells[t] for t in counts]
            ax.bar([j + 0.25 * i for j in range(len(counts))], ratios, width=0.25, label=method)
        ax.axhline(1.0, color="grey", linewidth=0.8)
        middle = 0.25 * (len(methods) - 1) / 2
        ax.set_xticks([j + middle for j in range(len(counts))], [f"{t} token{'s' * (t > 1)}" for t in counts])
        ax.set_ylabel("time / fused (stock) time")
        ax.set_title(experts[0]["shape"], fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "speed_experts.png", dpi=120)
    if reads:
        fig, ax = plt.subplots(figsize=(9, 3.5))
        ax.barh([r["method"] for r in reads], [r["ratio_to_dense"] for r in reads])
        ax.axvline(1.0, color="grey", linewidth=0.8)
        ax.set_xlabel("decode time per token / dense")
        ax.set_title(f"{reads[0]['model']}: greedy decode, float32", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / "speed_reads.png", dpi=120)


def targets(layers: list[dict]) -> list[str]:
    """Issue targets for the layers the presets use (r=4) and low-rank, float32, and where dense is faster."""
    slower = [
        f"{r['method']} at {r['shape']} ({r['ratio_to_dense']:.2f}x)"
        for r in layers
        if r["dtype"] == "float32"
        and r["tokens"] == 1
        and r["ratio_to_dense"] > 1
        and " r4 " in f"{r['method']} "
        and not r["method"].startswith("compiled ")
    ]
    lines = [
        "Slower than dense at decode (float32), where `tq.materialize(model, pattern)` on those layers trades "
        "their parameter saving for dense speed: " + ("; ".join(slower) if slower else "none") + ".",
        "",
        "Targets (float32, layers at ½ parameters as the presets build them):",
        "",
    ]
    for method_prefix in ("kronecker+perm r4", "kronecker r4", "lowrank"):
        rows = [r for r in layers if r["dtype"] == "float32" and r["method"].startswith(method_prefix)]
        decode = [r for r in rows if r["tokens"] == 1]
        prefill = [r for r in rows if r["tokens"] == 8192]
        if not decode or not prefill:
            continue
        worst_decode = max(decode, key=lambda r: r["ratio_to_dense"])
        worst_prefill = max(prefill, key=lambda r: r["ratio_to_dense"])
        lines.append(
            f"- {method_prefix}: decode worst {worst_decode['ratio_to_dense']:.2f}x dense (target ≤ 1.0: "
            f"{'met' if worst_decode['ratio_to_dense'] <= 1.0 else 'missed'}); prefill worst "
            f"{worst_prefill['ratio_to_dense']:.2f}x (target ≤ 1.3: "
            f"{'met' if worst_prefill['ratio_to_dense'] <= 1.3 else 'missed'}; "
            f"FLOPs {worst_prefill['flops_ratio']:.2f}x dense)."
        )
    return lines


if __name__ == "__main__":
    main()
