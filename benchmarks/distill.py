"""The decisive comparison: distilled students of the house teacher at equal parameters and equal tokens.

    python benchmarks/distill.py [--tokens 503808] [--seeds 0 1] [--budgets tq half] [--variants ...] [--resume]

(On a machine without ../shared beside the checkout, such as a lent GPU, set TQCOMPRESSOR_ASSETS to a
copy of the assets; the trainer uses the GPU where there is one, compression stays on the CPU.)

Every student distils from ../shared/assets/house-teacher on corpus/gutenberg/train with the same
tokens, optimiser settings and loss (KL + CE, T = 1). Two parameter budgets:

- ``tq``: the ``tqcompressedgpt2`` size (14.1M: embedding ÷2 twice, odd layers' MLPs ½, r = 4);
- ``half``: the half-depth student's own size (25.0M: every other block kept).

Students (``variant``):

- ``tq-multi-step``: the paper's steps (at ``half``: attention, then MLPs, every layer ½), distilling
  after each step as one continuing run (one learning-rate schedule, optimizer state carried);
- ``tq-multi-step-restart``: the same but each step restarts AdamW and its warm-up (the old behaviour);
- ``tq-multi-step-shares``: continuing, with the tokens split 1 : 1 : 4 between the steps;
- ``tq-one-shot``: the same compression at once, then one distillation;
- ``kngpt2``: the same shapes without permutations (one-shot at ``half``, steps at ``tq``);
- ``calibrated``: truncated SVD at the same per-module sizes, fitted to calibration statistics
  (whitened), the best uniform calibrated plan of benchmarks/calibration.py;
- ``svd``: truncated SVD at the same sizes, data-free;
- ``auto``: the budget allocator's plan at the same total size, as ``compress --target-params
  --calibration`` makes it: every linear layer's candidates priced in KL by the Fisher output
  metrics, the embedding's measured, the plan fitted sequentially with the output metrics (records
  before 2026-11-27, such as ``distill_h100``, fitted it at once to the same statistics);
- ``half-depth``: every other block of the teacher (DistilGPT-2's initialisation); at ``tq`` also a
  low-rank embedding at the rank that reaches the budget;
- references: ``teacher`` (no training) and ``teacher-continued`` (the teacher trained on the same
  tokens with next-token loss only: the house teacher is undertrained, so distilling also trains).

Writes benchmarks/results/distill.{json,md,png}; each finished run is appended to the JSON at once,
so an interrupted benchmark continues with ``--resume``. The work folder keeps every run's models and logs.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import statistics
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from common import ASSETS, RESULTS, heldout_ids, machine

import tqcompressor as tq
from tqcompressor.allocation import allocation_plan, compressible_modules
from tqcompressor.calibration import collect
from tqcompressor.cli import DEFAULT_COUNT_TOKENS, DEFAULT_SENSITIVITY_TOKENS
from tqcompressor.data import load_blocks, token_counts
from tqcompressor.distillation import DistillationLoss
from tqcompressor.evaluation import perplexity, read_text
from tqcompressor.loading import load_model
from tqcompressor.methods.lowrank import LowRankConfig, rank_for_params
from tqcompressor.plan import CompressionPlan, Rule
from tqcompressor.presets import matching_svd_plan
from tqcompressor.schedule import Schedule, ScheduleStep, run_schedule, step_dir
from tqcompressor.sequential import compress_sequentially
from tqcompressor.surgery import resolve
from tqcompressor.training import FINAL, LOG, TrainConfig, Trainer, process_state
from tqcompressor.training.step import computes_bf16_natively

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = (
    "tq-multi-step",
    "tq-multi-step-restart",
    "tq-multi-step-shares",
    "tq-one-shot",
    "kngpt2",
    "calibrated",
    "svd",
    "auto",
    "half-depth",
    "teacher-continued",
)
MULTI_STEP = {"tq-multi-step": True, "tq-multi-step-restart": False, "tq-multi-step-shares": True}  # continuous?
# Token shares of the three steps at the ``tq`` budget: the third step (embedding ÷2 again) does the
# most damage, so it gets two thirds of the tokens (whole optimizer steps: 1/6 and 4/6 of the total).
SHARES = {"tq-multi-step-shares": (1, 1, 4)}
# What the report sets side by side at each budget: (title, variant, against variant).
COMPARISONS = (
    ("multi-step, continuing vs restarting", "tq-multi-step", "tq-multi-step-restart"),
    ("multi-step vs one-shot", "tq-multi-step", "tq-one-shot"),
    ("token shares 1 : 1 : 4 vs equal", "tq-multi-step-shares", "tq-multi-step"),
    ("the paper's claim, TQ vs DistilGPT-2-style", "tq-one-shot", "half-depth"),
    ("the paper's claim, TQ vs KnGPT-2", "tq-one-shot", "kngpt2"),
)
# Diagnostic variants: one seed at the first budget only.
DIAGNOSTIC = ("tq-multi-step-restart", "tq-multi-step-shares")
LAYERS = r"transformer\.h\.\d+\.{}"


def half_budget_schedule(permute: bool, time_budget: float) -> Schedule:
    """Every block's attention, then every block's MLP, at ½ (r = 4): the ``half`` budget's TQ steps."""
    search = {"permute": True, "time_budget": time_budget} if permute else {"permute": False}
    steps = []
    for name, pattern in (("attention", r"attn\.(c_attn|c_proj)"), ("mlp", r"mlp\.(c_fc|c_proj)")):
        rule = {"pattern": LAYERS.format(pattern), "method": "kronecker", "ratio": 0.5, **search}
        steps.append(ScheduleStep(name, CompressionPlan.from_dict({"rules": [rule], "name": name})))
    return Schedule(steps)


def tq_schedule(budget: str, permute: bool, config, time_budget: float) -> Schedule:
    if budget == "half":
        return half_budget_schedule(permute, time_budget)
    if permute:
        return Schedule.from_preset("tqcompressedgpt2", config, time_budget=time_budget)
    return Schedule.from_preset("kngpt2", config)


def half_depth(teacher, budget_params: int | None):
    """Every other block; with a budget, a low-rank (tied) embedding at the rank that reaches it."""
    student = copy.deepcopy(teacher)
    tq.keep_layers_(student, "even")
    if budget_params is not None:
        embedding = student.get_input_embeddings().weight
        target = budget_params - (tq.count_parameters(student) - embedding.numel())
        rank = rank_for_params(embedding.shape[0], embedding.shape[1], target)
        plan = CompressionPlan([Rule(r"transformer\.wte", LowRankConfig(rank=rank))], name="half-depth-embedding")
        tq.compress_(student, plan, progress=False)
    return student


class Runner:
    """Builds each student, distils it and evaluates it; caches what several runs share."""

    def __init__(self, args):
        self.args = args
        self.teacher, self.tokenizer = load_model(args.teacher)
        self.teacher.eval()
        self.texts = {
            "heldout": heldout_ids(self.tokenizer, args.eval_tokens),
            "wikitext2": self.tokenizer(read_text("wikitext2"), verbose=False)["input_ids"][: args.eval_tokens + 1],
        }
        heldout_fraction = 0.02
        self.data = load_blocks(
            args.data,
            self.tokenizer,
            args.block_size,
            max_tokens=int(args.tokens / (1 - heldout_fraction)) + 2 * args.block_size,
            heldout_fraction=heldout_fraction,
        )
        self.config = TrainConfig(
            tokens=args.tokens,
            batch_size=args.batch_size,
            micro_batch_size=args.micro_batch_size,
            lr=args.lr,
            eval_every=25,
            checkpoint_every=100,
            loss=DistillationLoss(alpha=1.0, beta=1.0),
        )
        self.statistics = {}
        self.allocations = {}
        self.tq_params = None

    def evaluate(self, model) -> dict[str, float]:
        model.eval()
        return {
            f"{name}_ppl": perplexity(model, ids, max_length=self.args.window, progress=False)["ppl"]
            for name, ids in self.texts.items()
        }

    def calibration_blocks(self) -> torch.Tensor:
        """Calibration text that training never reads first (its own seed) but that comes from the same
        training books."""
        text = load_blocks(self.args.data, self.tokenizer, 512, self.args.calibration_tokens, seed=1)
        return torch.cat([text.train, text.heldout])

    def calibration(self, plan: CompressionPlan):
        """Statistics of every module the plan compresses."""
        names = tuple(dict.fromkeys(name for _, name in resolve(self.teacher, plan)))
        if names not in self.statistics:
            self.statistics[names] = collect(self.teacher, list(names), self.calibration_blocks(), progress=False)
        return self.statistics[names]

    def allocated(self, budget: str):
        """(the allocator's plan at the budget, the statistics to fit it to), as the CLI's
        ``--target-params --calibration`` makes them (with the Fisher); chosen once per budget."""
        if budget not in self.allocations:
            blocks = self.calibration_blocks()
            vocab = self.teacher.get_input_embeddings().num_embeddings
            counts = token_counts(self.args.data, self.tokenizer, vocab, DEFAULT_COUNT_TOKENS)
            names = compressible_modules(self.teacher)
            stats = collect(self.teacher, names, blocks, progress=False, token_counts=counts, fisher=True)
            probe = blocks[: max(1, math.ceil(DEFAULT_SENSITIVITY_TOKENS / blocks.shape[1]))]
            plan = allocation_plan(self.teacher, stats, self.budget_params(budget), probe).plan
            self.allocations[budget] = plan, stats
        return self.allocations[budget]

    def budget_params(self, budget: str) -> int:
        if budget == "half":
            return tq.count_parameters(half_depth(self.teacher, None))
        if self.tq_params is None:
            plan = tq_schedule("tq", False, self.teacher.config, 0).one_shot().steps[0].plan
            student = copy.deepcopy(self.teacher)
            tq.compress_(student, plan, progress=False)
            self.tq_params = tq.count_parameters(student)
        return self.tq_params

    def student(self, variant: str, budget: str):
        """(the student before distillation, its compression seconds) for the single-stage variants."""
        started = time.perf_counter()
        if variant == "teacher-continued":
            student = copy.deepcopy(self.teacher)
        elif variant == "auto":
            plan, statistics = self.allocated(budget)
            student = copy.deepcopy(self.teacher)
            counts = next((t.counts for t in statistics.tokens.values()), None)
            compress_sequentially(
                student,
                plan,
                self.calibration_blocks(),
                progress=False,
                token_counts=counts,
                output_moments=statistics.outputs,
            )
        elif variant == "half-depth":
            student = half_depth(self.teacher, None if budget == "half" else self.budget_params(budget))
        else:
            permute = variant == "tq-one-shot"
            plan = tq_schedule(budget, permute, self.teacher.config, self.args.time_budget).one_shot().steps[0].plan
            if variant in ("svd", "calibrated"):
                plan = matching_svd_plan(self.teacher, plan)
            calibration = self.calibration(plan) if variant == "calibrated" else None
            student = copy.deepcopy(self.teacher)
            tq.compress_(student, plan, calibration=calibration, progress=False)
        return student, time.perf_counter() - started

    def run(self, variant: str, budget: str, seed: int, work: Path) -> dict:
        if work.exists():
            shutil.rmtree(work)
        torch.manual_seed(seed)
        config = replace(self.config, seed=seed)
        started = time.perf_counter()
        record = {"variant": variant, "budget": budget, "seed": seed}
        if variant in MULTI_STEP or (variant == "kngpt2" and budget == "tq"):
            permute = variant != "kngpt2"
            schedule = tq_schedule(budget, permute, self.teacher.config, self.args.time_budget)
            if variant in SHARES:
                schedule = schedule.share_tokens(self.args.tokens, list(SHARES[variant]))
            before = copy.deepcopy(self.teacher)
            tq.compress_(before, schedule.one_shot().steps[0].plan, progress=False)
            record["before"] = self.evaluate(before)
            continuous = MULTI_STEP.get(variant, True)
            results = run_schedule(
                self.teacher,
                self.tokenizer,
                schedule,
                self.data,
                config,
                work,
                self.args.tokens,
                False,
                False,
                continuous=continuous,
            )
            final = tq.load(step_dir(work, len(schedule.steps), schedule.steps[-1]) / FINAL)
            record["steps"] = [
                {"step": r["step"], "params": r["params"], "tokens": r["tokens"], "curve": curve(work / folder)}
                for r, folder in zip(results, sorted(p.name for p in work.iterdir()), strict=True)
            ]
            record["tokens"] = sum(r["tokens"] for r in results)
        else:
            student, record["compress_seconds"] = self.student(variant, budget)
            record["before"] = self.evaluate(student)
            if variant == "teacher-continued":
                config = replace(config, loss=DistillationLoss(alpha=0.0, beta=1.0))
            teacher = None if variant == "teacher-continued" else self.teacher
            result = Trainer(student, teacher, self.data, config, work, self.tokenizer, progress=False).run()
            final = tq.load(work / FINAL)
            record["tokens"] = result["tokens"]
            record["curve"] = curve(work)
        self.teacher.cpu()  # the trainer moved it to its device; every student is compressed on the CPU
        record["params"] = tq.count_parameters(final)
        record["after"] = self.evaluate(final)
        record["seconds"] = time.perf_counter() - started
        return record


def curve(folder: Path) -> list[list[float]]:
    """(tokens, held-out ppl on the training books' held-out slice) as the trainer logged them."""
    records = [json.loads(line) for line in (folder / LOG).read_text().splitlines()]
    return [[r["tokens"], r["heldout_ppl"]] for r in records if "heldout_ppl" in r]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher", default=str(ASSETS / "house-teacher"))
    parser.add_argument("--data", default=str(ASSETS / "corpus/gutenberg/train"))
    parser.add_argument("--tokens", type=int, default=503_808, help="training tokens per student")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--budgets", nargs="+", default=["tq", "half"], choices=["tq", "half"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument(
        "--other-budget-seeds", type=int, default=1, help="seeds at budgets after the first (the issue: one)"
    )
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--eval-tokens", type=int, default=20_000, help="tokens per perplexity set")
    parser.add_argument("--window", type=int, default=512, help="perplexity window")
    parser.add_argument("--calibration-tokens", type=int, default=32_768)
    parser.add_argument("--time-budget", type=float, default=5.0, help="permutation search seconds per layer")
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks/work/distill", help="models and logs")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--resume", action="store_true", help="keep finished records in distill.json")
    parser.add_argument("--from-json", action="store_true", help="only rewrite the markdown and plot")
    args = parser.parse_args()
    path = args.out / "distill.json"
    if args.from_json:
        write_report(json.loads(path.read_text()), args.out)
        return
    # Whole optimizer steps for every step of every variant, so that all students train on equal tokens.
    unit = 6 * args.batch_size * args.block_size
    args.tokens = max(1, math.ceil(args.tokens / unit)) * unit
    data = json.loads(path.read_text()) if args.resume and path.exists() else None
    if data is None or data["meta"]["tokens"] != args.tokens:
        data = {"meta": {}, "records": []}
    runner = Runner(args)
    data["meta"] = {
        "command": "python benchmarks/distill.py "
        + f"--tokens {args.tokens} --seeds {' '.join(map(str, args.seeds))} --budgets {' '.join(args.budgets)} "
        + f"--variants {' '.join(args.variants)} --batch-size {args.batch_size} --lr {args.lr} "
        + f"--calibration-tokens {args.calibration_tokens} --time-budget {args.time_budget}",
        "machine": machine(),
        "tokens": args.tokens,
        "train_config": asdict(runner.config),
        "bf16": runner.config.bf16 and computes_bf16_natively(process_state().device),
        "block_size": args.block_size,
        "time_budget": args.time_budget,
        "eval": f"first {args.eval_tokens} tokens of each set, {args.window}-token windows",
        "budgets": {budget: runner.budget_params(budget) for budget in args.budgets},
        "seeds": args.seeds,
        "other_budget_seeds": args.other_budget_seeds,
        "variants": list(VARIANTS),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    if not any(r["variant"] == "teacher" for r in data["records"]):
        teacher = runner.evaluate(runner.teacher)
        params = tq.count_parameters(runner.teacher)
        data["records"].append({"variant": "teacher", "budget": None, "seed": None, "params": params, "after": teacher})
    done = {(r["budget"], r["variant"], r["seed"]) for r in data["records"]}
    for budget, variant, seed in planned_runs(args.budgets, args.seeds, args.other_budget_seeds, args.variants):
        if (budget, variant, seed) in done:
            continue
        record = runner.run(variant, budget, seed, args.work / budget / variant / f"seed{seed}")
        data["records"].append(record)
        path.write_text(json.dumps(data, indent=1))
        print(json.dumps({k: v for k, v in record.items() if k not in ("steps", "curve")}), flush=True)
    path.write_text(json.dumps(data, indent=1))
    write_report(data, args.out)


def planned_runs(budgets: list[str], seeds: list[int], other_budget_seeds: int, variants: list[str]) -> list:
    """(budget, variant, seed) in the order they run: every row's first seed, then the other seeds, then
    the other budget, so that a cut-short benchmark has whole rows."""
    return [
        (budget, variant, seed)
        for i, budget in enumerate(budgets)
        for seed in (seeds if i == 0 else seeds[:other_budget_seeds])
        for variant in variants
        if not (variant in DIAGNOSTIC and (i > 0 or seed != seeds[0]))
        # one reference at the teacher's own size serves both budgets
        and not (variant == "teacher-continued" and i > 0)
    ]


def summary(records: list[dict]) -> dict[tuple[str, str], dict]:
    """Mean, spread (max - min over seeds) and count of each (budget, variant)'s final perplexities."""
    rows: dict[tuple[str, str], dict] = {}
    for r in records:
        if r["variant"] == "teacher":
            continue
        row = rows.setdefault((r["budget"], r["variant"]), {"runs": []})
        row["runs"].append(r)
    for row in rows.values():
        for key in ("heldout_ppl", "wikitext2_ppl"):
            values = [r["after"][key] for r in row["runs"]]
            row[key] = statistics.mean(values)
            row[f"{key}_spread"] = max(values) - min(values)
        row["before"] = statistics.mean(r["before"]["heldout_ppl"] for r in row["runs"])
        row["params"] = row["runs"][0]["params"]
    return rows


def described(variant: str, row: dict) -> str:
    seeds = len(row["runs"])
    spread = f", spread {row['heldout_ppl_spread']:.1f}" if seeds > 1 else ""
    return f"{variant} {row['heldout_ppl']:.1f} ({seeds} seed{'s' if seeds > 1 else ''}{spread})"


def write_report(data: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meta, records = data["meta"], data["records"]
    teacher = next(r for r in records if r["variant"] == "teacher")
    rows = summary(records)
    precision = "bf16 autocast" if meta.get("bf16", True) else "float32 (no native bf16 on the device)"
    lines = [
        "# Distilled students of the house teacher at equal parameters and equal tokens",
        "",
        f"Command: `{meta['command']}` on {meta['machine']}.",
        f"Training: AdamW lr {meta['train_config']['lr']}, batch {meta['train_config']['batch_size']} x "
        f"{meta['block_size']} tokens, {meta['tokens']:,} tokens per student, {precision}, loss KL + CE (T = 1), "
        f"data corpus/gutenberg/train; permutation search {meta['time_budget']} s per layer. Perplexity: "
        f"{meta['eval']} (held-out Gutenberg books; WikiText-2).",
        "",
        f"Teacher: {teacher['params']:,} params, held-out ppl {teacher['after']['heldout_ppl']:.1f}, "
        f"WikiText-2 ppl {teacher['after']['wikitext2_ppl']:.0f}. Budgets: "
        + ", ".join(f"`{name}` {params:,}" for name, params in meta["budgets"].items())
        + ".",
        "",
        "| budget | variant | params | seeds | held-out ppl before | held-out ppl after (mean) | spread | "
        "WikiText-2 after | spread |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (budget, variant), row in sorted(rows.items(), key=lambda item: (item[0][0], item[1]["heldout_ppl"])):
        lines.append(
            f"| {budget} | {variant} | {row['params']:,} | {len(row['runs'])} | {row['before']:.1f} "
            f"| {row['heldout_ppl']:.1f} | {row['heldout_ppl_spread']:.1f} | {row['wikitext2_ppl']:.0f} "
            f"| {row['wikitext2_ppl_spread']:.0f} |"
        )
    lines += ["", "Spread: max − min over seeds (0 with one seed). Winners per budget, students only:", ""]
    for budget in meta["budgets"]:
        students = sorted(
            ((v, row) for (b, v), row in rows.items() if b == budget and v != "teacher-continued"),
            key=lambda item: item[1]["heldout_ppl"],
        )
        if len(students) < 2:
            continue
        (best, first), (second_name, second) = students[0], students[1]
        gap = second["heldout_ppl"] - first["heldout_ppl"]
        if min(len(first["runs"]), len(second["runs"])) < 2:
            verdict = "one seed of at least one of them: the seed spread is not measured, so this is no verdict"
        else:
            spread = max(first["heldout_ppl_spread"], second["heldout_ppl_spread"])
            verdict = f"the gap is {'more than' if gap > spread else 'within'} the larger seed spread, {spread:.1f}"
        lines.append(
            f"- `{budget}`: **{best}** {first['heldout_ppl']:.1f}, then {second_name} {second['heldout_ppl']:.1f} "
            f"({gap / second['heldout_ppl']:.1%} lower; {verdict})."
        )
        here = {v: row for (b, v), row in rows.items() if b == budget}
        for title, left, right in COMPARISONS:
            if left in here and right in here:
                change = 1 - here[left]["heldout_ppl"] / here[right]["heldout_ppl"]
                lines.append(
                    f"- `{budget}`, {title}: {described(left, here[left])} against {described(right, here[right])}: "
                    f"{abs(change):.1%} {'lower' if change >= 0 else 'higher'}."
                )
    expected = planned_runs(list(meta["budgets"]), meta["seeds"], meta["other_budget_seeds"], meta["variants"])
    present = {(r["budget"], r["variant"], r["seed"]) for r in records}
    missing = [key for key in expected if key not in present]
    if missing:
        lines += [
            "",
            f"Not run yet ({len(missing)} runs; `--resume` continues): "
            + ", ".join(f"{v} at `{b}` seed {s}" for b, v, s in missing)
            + ".",
        ]
    multi = [r for r in records if r.get("steps")]
    if multi:
        lines += [
            "",
            "Multi-step runs, per step (held-out slice of the training books as the trainer logged it):",
            "",
            "| budget | variant | seed | step | params | tokens | ppl at step start | ppl at step end |",
            "|---|---|---:|---|---:|---:|---:|---:|",
        ]
        for r in multi:
            for s in r["steps"]:
                lines.append(
                    f"| {r['budget']} | {r['variant']} | {r['seed']} | {s['step']} | {s['params']:,} "
                    f"| {s['tokens']:,} | {s['curve'][0][1]:.1f} | {s['curve'][-1][1]:.1f} |"
                )
        jumps = [
            (r, before["curve"][-1][1], after["curve"][0][1], after["curve"][-1][1])
            for r in multi
            for before, after in zip(r["steps"], r["steps"][1:], strict=False)
            if after["curve"][0][1] > 1.5 * before["curve"][-1][1]
        ]
        if jumps:
            lines += [
                "",
                "Why multi-step can trail one-shot: a step that compresses again throws away much of what the "
                "previous steps' distillation bought, and the tokens left for it may not recover it "
                "(ppl at the end of the step before, at the start and at the end of that step):",
                "",
            ]
            lines += [
                f"- {r['variant']} `{r['budget']}` seed {r['seed']}: {end:.1f} → {start:.1f} → {final:.1f}"
                for r, end, start, final in jumps
            ]
    lines += [
        "",
        "Read with care: the house teacher saw only 7.7M training tokens (see its README), so distilling on more",
        "of its own training books also continues its training and a student can beat the teacher;",
        "`teacher-continued` separates the two effects. Multi-step and one-shot runs train on the same number",
        "of tokens; the multi-step steps read consecutive parts of the data.",
        "",
    ]
    (out / "distill.md").write_text("\n".join(lines))

    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    for (budget, variant), row in sorted(rows.items()):
        left.errorbar(
            row["params"] / 1e6,
            row["heldout_ppl"],
            yerr=row["heldout_ppl_spread"] / 2,
            fmt="o" if budget == "tq" else "s",
            capsize=3,
            label=f"{variant} ({budget})",
        )
    left.axhline(teacher["after"]["heldout_ppl"], color="grey", linestyle="--", label="teacher")
    left.set(xlabel="parameters (M)", ylabel="held-out ppl after distillation", title="students")
    left.legend(fontsize=7)
    for r in multi:
        offset = 0
        for s in r["steps"]:
            tokens = [offset + t for t, _ in s["curve"]]
            right.plot(
                tokens,
                [p for _, p in s["curve"]],
                label=f"{r['variant']} {r['budget']} s{r['seed']}" if s is r["steps"][0] else None,
                color=f"C{multi.index(r) % 10}",
            )
            offset = tokens[-1]
    for r in records:
        if r.get("curve") and r["variant"] == "tq-one-shot":
            right.plot(
                [t for t, _ in r["curve"]],
                [p for _, p in r["curve"]],
                linestyle=":",
                label=f"tq-one-shot {r['budget']} s{r['seed']}",
            )
    right.set(xlabel="training tokens", ylabel="held-out ppl (training books)", yscale="log", title="per-step curves")
    right.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out / "distill.png", dpi=120)
    plt.close(figure)


if __name__ == "__main__":
    main()
