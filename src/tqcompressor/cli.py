"""Command line: ``tqcompressor compress | eval | distill | export | inspect``.

User mistakes end in one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from .allocation import allocation_plan, check_min_kept, compressible_modules, offered_methods
from .assets import default_model
from .calibration import (
    CalibrationStats,
    calibration_targets,
    collect,
    expand_containers,
    fisher_moments,
    forward_order,
)
from .data import id_counts, load_blocks, pack_blocks, token_ids
from .depth import keep_layers_
from .distillation import DistillationLoss
from .evaluation import DATASETS, evaluate, fidelity, read_text, size_report
from .experts import fuse_experts, unfuse_experts
from .export import export
from .loading import check_runs_on_token_ids, is_causal_lm, load_model, stored_dtype
from .params import count_parameters
from .plan import CompressionPlan
from .plots import plot_layers
from .presets import PRESETS, preset
from .reconstruction import RECONSTRUCTION_LR
from .report import CompressionReport
from .schedule import Schedule, run_schedule, step_dir
from .sequential import compress_sequentially
from .serialization import load, read_config, save
from .surgery import compress_, resolve
from .training import FINAL, METRICS, TrainConfig, Trainer, process_state

DEFAULT_CALIBRATION_TOKENS = 262_144
DEFAULT_CALIBRATION_LENGTH = 512  # where the model reads more: the length every calibration measurement used
DEFAULT_SENSITIVITY_TOKENS = 1024  # one forward pass per module over these
DEFAULT_COUNT_TOKENS = 4_194_304  # tokenised only, about 15 s for GPT-2's tokenizer on 2 cores


def _refuse_preset_flags(args: argparse.Namespace, source: str) -> None:
    """--dense-head and --time-budget shape a preset; a file or saved model already says both."""
    given = [
        flag
        for flag, value in (("--dense-head", args.dense_head), ("--time-budget", args.time_budget is not None))
        if value
    ]
    if given:
        raise ValueError(f"{', '.join(given)} apply to presets only; {source} sets tie_head / time_budget itself")


def _compress(args: argparse.Namespace) -> None:
    model_name = args.model or default_model("--model")
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise FileExistsError(f"{out} already exists and is not empty (use --overwrite)")
    if args.plan:
        _refuse_preset_flags(args, "the plan file")
    _check_calibration_flags(args)
    budget = bool(args.target_params or args.target_ratio)
    if (
        args.sensitivity is not None or args.sensitivity_tokens is not None or args.methods or args.min_kept
    ) and not budget:
        raise ValueError(
            "--(no-)sensitivity, --sensitivity-tokens, --methods and --min-kept concern a budget's choices: "
            "give --target-params/ratio"
        )
    if args.methods:
        offered_methods(args.methods)  # before calibration, which can take minutes
    check_min_kept(args.min_kept)  # before calibration too
    if args.sensitivity_tokens is not None and args.sensitivity is False:
        raise ValueError("--sensitivity-tokens sets the measurement that --no-sensitivity turns off: give one")
    args.sensitivity = args.sensitivity is not False  # a budget measures unless told not to
    if args.fisher is None:
        # For a budget the Fisher is better and cheaper than measuring every module (SmolLM2 at 70%: held-out
        # ppl 75.7 against 92.8, calibration + search 900 s against 1314 s); only the embedding is measured.
        args.fisher = budget and bool(args.calibration) and args.sensitivity
    if args.sequential is None:
        # For a budget a sequential fit of the chosen plan beats fitting it at once in every row measured
        # (SmolLM2 at 70%: held-out ppl 59.9 against 75.7; at 50%: 147.6 against 234.9), for several
        # times the fitting time.
        args.sequential = budget and bool(args.calibration)
    if args.no_aim_dense and not args.sequential:
        raise ValueError("--no-aim-dense applies to a sequential fit only")
    if args.anchor is not None and not args.sequential:
        raise ValueError("--anchor applies to a sequential fit only")
    if args.reconstruction_epochs is not None and not args.sequential:
        raise ValueError("--reconstruction-epochs applies to a sequential fit only")
    if args.reconstruction_lr is not None and not args.reconstruction_epochs:
        raise ValueError("--reconstruction-lr sets the step of a block reconstruction: give --reconstruction-epochs")
    if args.sequential and args.save_calibration and not budget:
        raise ValueError(
            "--sequential collects each block's statistics on the model as compressed so far: none to save"
        )
    compresses = bool(args.preset or args.plan or budget)
    if not (compresses or args.keep_layers):
        raise ValueError("say what to do: --preset, --plan, --target-params, --target-ratio or --keep-layers")
    model, tokenizer = load_model(model_name, args.gguf_file)
    dtype = stored_dtype(model_name, args.gguf_file)  # fitted in float32, written as the original is stored
    if args.keep_layers:
        keep = args.keep_layers if args.keep_layers in ("even", "odd") else _indices(args.keep_layers)
        kept = keep_layers_(model, keep)
        print(f"kept blocks {kept}: {count_parameters(model):,} parameters", file=sys.stderr)
        if not compresses:
            if args.dense_head or args.time_budget is not None or args.calibration or args.calibration_stats:
                raise ValueError("--dense-head, --time-budget and calibration apply to a preset, plan or budget")
            save(model, out, tokenizer=tokenizer, overwrite=args.overwrite, dtype=dtype)
            print(f"saved to {out}")
            return
    _unfuse_experts(model)
    if budget:
        _compress_to_budget(args, model, tokenizer, out, dtype)
        return
    if args.plan:
        plan = CompressionPlan.load(args.plan)
    else:
        search = {"time_budget": args.time_budget} if args.time_budget is not None else {}
        plan = preset(args.preset, model.config, tie_head=not args.dense_head, **search)
    if args.sequential:
        blocks, ids = _calibration_text(args, model, tokenizer)
        names = [name for _, name in resolve(model, plan)]
        counts = _token_counts(model, ids, names)
        linear = calibration_targets(model, names)[0]
        fisher = fisher_moments(model, linear, blocks, progress=not args.quiet) if args.fisher and linear else None
        report = compress_sequentially(
            model,
            plan,
            blocks,
            progress=not args.quiet,
            token_counts=counts,
            output_moments=fisher,
            **_sequential_options(args),
        )
    else:
        calibration = _calibration(args, model, tokenizer, [name for _, name in resolve(model, plan)])[0]
        report = compress_(model, plan, calibration=calibration, progress=not args.quiet)
    _save(model, out, tokenizer, args, dtype)
    print(report.table())
    print(f"saved to {out}")


def _unfuse_experts(model: torch.nn.Module) -> None:
    """MoE experts as per-expert linear layers, which plans and budgets can name (same outputs)."""
    names = unfuse_experts(model)
    if names:
        print(
            f"experts of {len(names)} MoE layers as linear layers ({names[0]}.down_proj.0, ...) for plans and "
            "budgets to reach",
            file=sys.stderr,
        )


def _save(model: torch.nn.Module, out: Path, tokenizer, args: argparse.Namespace, dtype: torch.dtype, **extra) -> None:
    fuse_experts(model)  # the layers whose experts all stayed dense: the stock tensors and forward again
    save(model, out, tokenizer=tokenizer, overwrite=args.overwrite, dtype=dtype, **extra)


def _sequential_options(args: argparse.Namespace) -> dict:
    """``compress_sequentially``'s options as the command line gives them."""
    options = {"aim_dense": not args.no_aim_dense, "anchor": args.anchor or 0.0}
    options["reconstruction_epochs"] = args.reconstruction_epochs or 0
    if args.reconstruction_lr is not None:
        options["reconstruction_lr"] = args.reconstruction_lr
    return options


def _indices(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"--keep-layers takes even, odd or comma-separated block indices, got {text!r}") from None


def _compress_to_budget(args: argparse.Namespace, model, tokenizer, out: Path, dtype: torch.dtype) -> None:
    """--target-params / --target-ratio: allocate, fit, and save the plan, table and plot beside the model."""
    if not (args.calibration or args.calibration_stats):
        raise ValueError("--target-params / --target-ratio need --calibration (or --calibration-stats)")
    if args.sensitivity and not args.calibration:
        raise ValueError(
            "a budget measures each module's sensitivity on the --calibration text: give --calibration DATA "
            "(or --no-sensitivity to choose by estimated errors alone)"
        )
    if args.dense_head or args.time_budget is not None:
        raise ValueError("--dense-head and --time-budget do not apply to a budget")
    if args.fisher and not args.sensitivity:
        raise ValueError(
            "--fisher prices the linear layers in KL; the token embedding has no such price and is measured on "
            "the sensitivity tokens: drop --no-sensitivity"
        )
    if args.target_ratio is not None and not 0 < args.target_ratio < 1:
        raise ValueError(f"--target-ratio must be between 0 and 1, got {args.target_ratio}")
    stats, blocks = _calibration(args, model, tokenizer, compressible_modules(model), reached_only=True)
    target = args.target_params or round(args.target_ratio * count_parameters(model))
    probe_blocks = None
    if args.sensitivity:
        wanted = args.sensitivity_tokens or DEFAULT_SENSITIVITY_TOKENS
        probe_blocks = blocks[: max(1, math.ceil(wanted / blocks.shape[1]))]
    allocation = allocation_plan(
        model, stats, target, probe_blocks, progress=not args.quiet, methods=args.methods, min_kept=args.min_kept
    )
    # The choice rests on the original model's statistics; a sequential fit then calibrates each part on
    # the model compressed so far.
    if args.sequential:
        counts = next((t.counts for t in stats.tokens.values()), None)  # counted once, for the statistics
        chosen = [name for name, candidate in allocation.chosen.items() if candidate.config is not None]
        fitted = set(expand_containers(model, chosen))  # an MLP cut whole: its projections' Fisher
        outputs = stats.fisher_of(fitted)
        # The fit collects each part's inputs afresh: the original's moments would only hold memory beside
        # it (width² each: 9.5 GiB for a 1.1B LLaMA).
        del stats
        report = compress_sequentially(
            model,
            allocation.plan,
            blocks,
            progress=not args.quiet,
            token_counts=counts,
            output_moments=outputs,
            **_sequential_options(args),
        )
    else:
        report = compress_(model, allocation.plan, calibration=stats, progress=not args.quiet)

    def write_allocation(folder: Path) -> None:
        allocation.plan.save(folder / "allocation.yaml")
        (folder / "allocation.txt").write_text(allocation.table() + "\n")
        plot_layers([report.to_dict()], folder / "allocation.png")

    _save(model, out, tokenizer, args, dtype, write_extra=write_allocation)
    print(allocation.table())
    print(report.table())
    print(f"saved to {out} (the chosen plan: {out / 'allocation.yaml'})")


def _check_calibration_flags(args: argparse.Namespace) -> None:
    if args.calibration and args.calibration_stats:
        raise ValueError(
            "give --calibration DATA (collect statistics) or --calibration-stats FILE (reuse them), not both"
        )
    given = [
        args.calibration_tokens is not None,
        args.calibration_length is not None,
        args.count_tokens is not None,
        args.save_calibration,
        args.sequential,
        args.fisher,
    ]
    if not args.calibration and any(given):
        raise ValueError(
            "--calibration-tokens, --calibration-length, --count-tokens, --save-calibration, --sequential and "
            "--fisher apply to --calibration DATA only"
        )
    if args.calibration_length is not None and args.calibration_length < 2:
        raise ValueError(f"--calibration-length must be at least 2 tokens, got {args.calibration_length}")
    if args.count_tokens is not None and args.count_tokens < _calibration_tokens(args):
        raise ValueError(
            f"--count-tokens {args.count_tokens} is fewer than the calibration tokens, whose counts it includes: "
            f"give at least {_calibration_tokens(args)}"
        )


def _calibration_tokens(args: argparse.Namespace) -> int:
    """--calibration-tokens, or its default (left unset on the parser, so that giving it alone is an error)."""
    return args.calibration_tokens or DEFAULT_CALIBRATION_TOKENS


def _count_tokens(args: argparse.Namespace) -> int:
    """--count-tokens, or its default: the part of the --calibration text that is read at all."""
    return args.count_tokens or max(DEFAULT_COUNT_TOKENS, _calibration_tokens(args))


def _calibration_text(args: argparse.Namespace, model, tokenizer) -> tuple[torch.Tensor, list[int]]:
    """(the calibration blocks, the --count-tokens of the --calibration text they are drawn from): the
    text is tokenised once, for the blocks and for the embedding's counts."""
    limit = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", 512)
    length = args.calibration_length or min(DEFAULT_CALIBRATION_LENGTH, limit)
    if length > limit:
        raise ValueError(f"--calibration-length {length} is longer than the {limit} tokens the model reads at a time")
    ids = token_ids(args.calibration, tokenizer, _count_tokens(args), seed=0)
    # Drawn across --count-tokens of the text: a cap filled from the start reads one or two long books.
    text = pack_blocks(ids, length, _calibration_tokens(args), source=args.calibration)
    blocks = torch.cat([text.train, text.heldout])  # calibration holds nothing out
    vocab = model.get_input_embeddings().num_embeddings
    if int(blocks.max()) >= vocab:
        raise ValueError(f"the tokenizer produces ids up to {int(blocks.max())}, beyond the model's {vocab} embeddings")
    return blocks, ids


def _token_counts(model, ids: list[int], names: list[str]) -> torch.Tensor | None:
    """The token counts an embedding among ``names`` is weighted by, taken on all of ``ids`` (the
    --count-tokens read: more than the forward passes read, since counting only tokenises); None without one."""
    embeddings = calibration_targets(model, names)[1]
    if not embeddings:
        return None
    return id_counts(ids, model.get_submodule(embeddings[0]).num_embeddings)


def _calibration(
    args: argparse.Namespace, model, tokenizer, names: list[str], reached_only: bool = False
) -> tuple[CalibrationStats | None, torch.Tensor | None]:
    """(statistics of the modules ``names`` (with ``reached_only``, of those the text runs through):
    loaded, collected from --calibration, or none; the calibration blocks, where --calibration gives them)."""
    if args.calibration_stats:
        return CalibrationStats.load(args.calibration_stats), None
    if not args.calibration:
        return None, None
    calibration_targets(model, names)  # refuses a model calibration cannot run on before the text is read
    blocks, ids = _calibration_text(args, model, tokenizer)
    if reached_only:
        reached = set(forward_order(model, names, blocks[:1]))
        names = [name for name in names if name in reached]
    counts = _token_counts(model, ids, names)
    stats = collect(
        model,
        names,
        blocks,
        progress=not args.quiet,
        token_counts=counts,
        fisher=args.fisher,
        spill=not args.save_calibration,  # statistics larger than memory stay in temporary files, unsaved
    )
    print(f"calibration: {json.dumps(stats.summary())}", file=sys.stderr)
    if args.save_calibration:
        stats.save(args.save_calibration)
    return stats, blocks


def _eval(args: argparse.Namespace) -> None:
    if args.tasks:
        harness_only = [flag for flag, value in (("--max-length", args.max_length), ("--stride", args.stride)) if value]
        if harness_only:
            raise ValueError(f"{', '.join(harness_only)} apply to --dataset; harness tasks set their own windows")
        try:
            from .harness import evaluate_tasks
        except ImportError as err:
            raise ValueError(str(err)) from err
        scores = evaluate_tasks(args.model, args.tasks.split(","), args.include_path, args.limit)
        _print_result({"model": args.model, "tasks": scores}, args.json)
        return
    if args.include_path or args.limit:
        raise ValueError("--include-path and --limit apply to harness --tasks only")
    model, tokenizer = load_model(args.model)
    if not is_causal_lm(model):
        check_runs_on_token_ids(model, "fidelity", "score it with its own seq2seq metrics")
        if not args.reference:
            raise ValueError(
                f"perplexity and LAMBADA apply to causal LMs; this is a {type(model).__name__}: pass --reference "
                "ORIGINAL to measure fidelity (cosine of final hidden states, agreement of outputs)"
            )
        reference, _ = load_model(args.reference)
        ids = tokenizer(read_text(args.dataset), verbose=False)["input_ids"]
        window = min(args.max_length or 128, getattr(model.config, "max_position_embeddings", 512))
        result = {"dataset": args.dataset, **fidelity(model, reference, ids, window, args.max_tokens)}
        result.update(model=args.model, reference=args.reference, kind=type(model).__name__)
        _print_result(result, args.json)
        return
    if args.reference:
        raise ValueError("--reference applies to models without a perplexity (encoders, classifiers)")
    result = evaluate(
        model,
        tokenizer,
        args.dataset,
        max_tokens=args.max_tokens,
        max_length=args.max_length,
        stride=args.stride,
        progress=not args.quiet,
    )
    result["model"] = args.model
    result["size"] = size_report(model, args.model if Path(args.model).is_dir() else None)
    _print_result(result, args.json)


def _print_result(result: dict, json_path: str | None) -> None:
    print(json.dumps(result, indent=2))
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2))


def _export(args: argparse.Namespace) -> None:
    dtype = getattr(torch, args.dtype) if args.dtype else None
    print(f"exported to {export(args.directory, args.out, args.overwrite, dtype)}")


def _inspect(args: argparse.Namespace) -> None:
    config = read_config(args.directory)
    section = config.get("tqcompressor")
    if section is None:
        raise ValueError(f"{args.directory} is not a tqcompressor model (no 'tqcompressor' section in config.json)")
    for step in section.get("history", []):
        print(CompressionReport.from_dict(step["report"]).table())
        print()
    print(json.dumps(size_report(load(args.directory), args.directory), indent=2))
    if args.plot is not None:
        target = Path(args.plot or Path(args.directory) / "layers.png")
        print(f"plot: {plot_layers([step['report'] for step in section.get('history', [])], target)}")


def _distill(args: argparse.Namespace) -> None:
    if args.student and (args.schedule or args.preset or args.one_shot or args.token_shares or args.restart_each_step):
        raise ValueError(
            "--student distils one saved model; it cannot be combined with --schedule/--preset/--one-shot/"
            "--token-shares/--restart-each-step"
        )
    if not (args.student or args.schedule or args.preset):
        raise ValueError("give --schedule FILE, --preset NAME, or --student DIR")
    if not args.preset:
        _refuse_preset_flags(args, "--student" if args.student else "the schedule file")
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.resume:
        raise FileExistsError(f"{out} is not empty (pass --resume to continue the run there)")
    if args.student and args.resume and (out / METRICS).is_file():
        print(f"{out} holds a finished run; nothing to resume. distilled model: {out / FINAL}")
        return
    teacher, tokenizer = load_model(args.teacher or default_model("--teacher"))
    check_runs_on_token_ids(teacher, "distillation", "compress it with a plan and fine-tune it with a seq2seq trainer")
    loss = DistillationLoss(args.alpha, args.beta, args.gamma, args.temperature, args.hidden_layers or [])
    if args.student:
        student, _ = load_model(args.student)
        budgets = [args.tokens] if args.tokens else []
    else:
        search = {"time_budget": args.time_budget} if args.time_budget is not None else {}
        if args.schedule:
            schedule = Schedule.load(args.schedule)
        else:
            schedule = Schedule.from_preset(args.preset, teacher.config, tie_head=not args.dense_head, **search)
        if args.one_shot:
            schedule = schedule.one_shot()
        if args.token_shares:
            if not args.tokens:
                raise ValueError("--token-shares splits --tokens: give both")
            schedule = schedule.share_tokens(args.tokens, args.token_shares)
        schedule.check(teacher)
        budgets = schedule.token_budgets(args.tokens)
    if not budgets or not all(budgets):
        raise ValueError("--tokens (the training token budget) is required")
    data_tokens = args.data_tokens or math.ceil(sum(budgets) / (1 - args.heldout_fraction)) + 2 * args.block_size
    data = load_blocks(args.data, tokenizer, args.block_size, data_tokens, args.heldout_fraction, args.seed)
    config = TrainConfig(
        tokens=budgets[0],
        batch_size=args.batch_size,
        micro_batch_size=args.micro_batch_size,
        lr=args.lr,
        warmup_fraction=args.warmup,
        grad_clip=args.grad_clip,
        bf16=not args.no_bf16,
        trainable=args.train,
        eval_every=args.eval_every,
        checkpoint_every=args.checkpoint_every,
        seed=args.seed,
        loss=loss,
    )
    evaluate_step = None
    if args.eval_dataset:

        def evaluate_step(model):
            return {
                name: evaluate(model, tokenizer, name, max_tokens=args.eval_max_tokens, max_length=args.block_size)
                for name in args.eval_dataset
            }

    progress = not args.quiet
    if args.student:
        results = [Trainer(student, teacher, data, config, out, tokenizer, args.resume, progress).run()]
    else:
        results = run_schedule(
            teacher,
            tokenizer,
            schedule,
            data,
            config,
            out,
            args.tokens,
            args.resume,
            progress,
            evaluate_step,
            continuous=not args.restart_each_step,
        )
    if not process_state().is_main_process:
        return  # under torchrun / accelerate launch, one summary is enough
    for result in results:
        print(json.dumps({k: v for k, v in result.items() if k != "compression"}))
    if results and results[-1].get("finished"):
        final = out if args.student else step_dir(out, len(schedule.steps), schedule.steps[-1])
        print(f"distilled model: {final / FINAL}")
    elif results:
        print(f"stopped early; continue with the same command and --resume (checkpoint in {out})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tqcompressor", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    c = commands.add_parser("compress", help="compress a model with a preset or a plan file and save it")
    c.add_argument(
        "--model", help="HF name or directory, or a .gguf file (default: $TQCOMPRESSOR_ASSETS/house-teacher)"
    )
    c.add_argument("--gguf-file", help="the GGUF file inside the --model directory (needs the gguf package)")
    c.add_argument(
        "--keep-layers",
        help="first keep only these transformer blocks, with their weights: even (0, 2, ...: the DistilGPT-2 "
        "baseline), odd, or indices such as 0,3,5; alone, or before a preset, plan or budget",
    )
    which = c.add_mutually_exclusive_group()
    which.add_argument("--preset", choices=PRESETS)
    which.add_argument("--plan", help="YAML or JSON plan file")
    which.add_argument("--target-params", type=int, help="choose every layer's method and size for this budget")
    which.add_argument("--target-ratio", type=float, help="the same, as a share of the model's parameters")
    c.add_argument(
        "--sensitivity",
        action=argparse.BooleanOptionalAction,
        help="with a budget: measure how much each module's compression changes the output (KL on part of "
        "the --calibration text, one pass per module; default); --no-sensitivity chooses by estimated "
        "errors alone: faster, and on SmolLM2 far worse",
    )
    c.add_argument(
        "--sensitivity-tokens",
        type=int,
        help=f"calibration tokens the sensitivity is measured on (default {DEFAULT_SENSITIVITY_TOKENS})",
    )
    c.add_argument(
        "--methods",
        nargs="+",
        help="with a budget: the registered methods whose candidates are offered (default: all); "
        "'--methods lowrank' skips pricing Kronecker candidates, most of the search's time",
    )
    c.add_argument(
        "--min-kept",
        type=float,
        default=0.0,
        help="with a budget: no module keeps less than this share of its parameters (default 0: as the "
        "estimates choose)",
    )
    c.add_argument("--out", required=True)
    c.add_argument("--overwrite", action="store_true")
    c.add_argument("--dense-head", action="store_true", help="keep a separate dense LM head (counted in full)")
    c.add_argument("--time-budget", type=float, help="permutation search seconds per layer (preset only)")
    c.add_argument("--calibration", help="text (file, folder, JSONL or Hub name) to fit every layer to its real inputs")
    c.add_argument(
        "--fisher",
        action=argparse.BooleanOptionalAction,
        help="with --calibration: also take each linear layer's output gradients (a backward pass per batch): "
        "low-rank fits then weigh output directions by how much they matter to the predictions, and a budget "
        "prices linear layers in estimated KL without measuring them (default: on for a budget that measures "
        "sensitivity, off for a plan or preset, where it triples calibration time)",
    )
    c.add_argument(
        "--calibration-tokens",
        type=int,
        help="tokens run through the model, in blocks drawn at random from --count-tokens of the text "
        f"(default {DEFAULT_CALIBRATION_TOKENS:,})",
    )
    c.add_argument(
        "--calibration-length",
        type=int,
        help="tokens in each calibration sequence (default: the model's context, at most "
        f"{DEFAULT_CALIBRATION_LENGTH}); shorter ones need less memory in the Fisher's pass",
    )
    c.add_argument(
        "--count-tokens",
        type=int,
        help="tokens of the --calibration text read: the calibration blocks are drawn from them and their "
        "counts weight an embedding's rows (tokenised only, no forward pass; at least --calibration-tokens; "
        f"default {DEFAULT_COUNT_TOKENS:,}, or all of a shorter text)",
    )
    c.add_argument("--calibration-stats", help="statistics saved earlier with --save-calibration")
    c.add_argument(
        "--save-calibration",
        help="write the collected statistics here (safetensors); they must then fit in memory (without it, "
        "statistics larger than memory are collected in several passes and kept in TMPDIR for this run)",
    )
    c.add_argument(
        "--sequential",
        action=argparse.BooleanOptionalAction,
        help="with --calibration: fit the plan part by part in forward order, each part on the inputs the model "
        "compressed so far gives it and aimed at the original model's outputs (default: on for a budget, whose "
        "choice still rests on the original model's statistics; off for a plan or preset)",
    )
    c.add_argument(
        "--no-aim-dense",
        action="store_true",
        help="with a sequential fit, leave the linear layers the plan keeps dense as they are (by default they are "
        "aimed at the original outputs too: their size stays, their weights change)",
    )
    c.add_argument(
        "--anchor",
        type=float,
        help="with a sequential fit, also hold each part to the original model on the original inputs, with this "
        "weight: ‖X̃Ŵ − XW‖² + A‖X(Ŵ − W)‖² (default 0: aimed only; large: as fitted at once). Aimed fits drift "
        "toward frequent tokens; with --reconstruction-epochs, 1 lowered SmolLM2's held-out ppl 2-3%%; see README, "
        "'Anchoring sequential fits' and 'Reconstruction with an anchor'",
    )
    c.add_argument(
        "--reconstruction-epochs",
        type=int,
        help="with a sequential fit, after each block's layers are fitted, tune all the block's parameters together "
        "to its original outputs by gradient descent for this many passes over the calibration text (one batch "
        "held out keeps the best pass; default 0: closed-form fits only); see README, 'Block reconstruction'",
    )
    c.add_argument(
        "--reconstruction-lr",
        type=float,
        help=f"Adam's step for --reconstruction-epochs (default {RECONSTRUCTION_LR:g})",
    )
    c.add_argument("--quiet", action="store_true")
    c.set_defaults(run=_compress)

    e = commands.add_parser("eval", help="perplexity / LAMBADA of a model")
    e.add_argument("model", help="compressed directory, HF directory or HF name")
    what = e.add_mutually_exclusive_group(required=True)
    what.add_argument("--dataset", help=f"{' | '.join(DATASETS)} | a text file or folder")
    what.add_argument("--tasks", help="lm-evaluation-harness tasks, comma-separated (needs lm-eval)")
    e.add_argument("--include-path", help="a folder of local harness task YAML files")
    e.add_argument("--limit", type=int, help="harness examples per task")
    e.add_argument("--reference", help="the original model, for the fidelity of encoders and classifiers")
    e.add_argument("--max-tokens", type=int)
    e.add_argument("--max-length", type=int, help="window length (default: the model's context)")
    e.add_argument("--stride", type=int)
    e.add_argument("--json", help="also write the result to this file")
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(run=_eval)

    d = commands.add_parser("distill", help="compress step by step and distil from the teacher after each step")
    d.add_argument("--teacher", help="HF name or directory (default: $TQCOMPRESSOR_ASSETS/house-teacher)")
    source = d.add_mutually_exclusive_group()
    source.add_argument("--schedule", help="YAML/JSON schedule file (steps of rules and token budgets)")
    source.add_argument("--preset", choices=PRESETS, help="a preset as a 3-step schedule")
    source.add_argument("--student", help="a saved (compressed) model to distil as one stage")
    d.add_argument("--one-shot", action="store_true", help="apply all steps at once, then distil once")
    d.add_argument("--data", required=True, help="text file, folder, JSONL, or a Hub dataset name")
    d.add_argument("--tokens", type=int, help="training tokens in total (shared equally by the steps)")
    d.add_argument(
        "--token-shares",
        type=float,
        nargs="+",
        metavar="SHARE",
        help="split --tokens between the steps in these proportions (e.g. 1 1 2; default equal)",
    )
    d.add_argument(
        "--restart-each-step",
        action="store_true",
        help="fresh AdamW and learning-rate warm-up at every step (default: one schedule over the run, "
        "optimizer state kept for parameters a step leaves unchanged)",
    )
    d.add_argument("--data-tokens", type=int, help="tokens to read from --data (default: enough for one pass)")
    d.add_argument("--heldout-fraction", type=float, default=0.02)
    d.add_argument("--out", required=True)
    d.add_argument("--resume", action="store_true", help="continue the run in --out exactly where it stopped")
    d.add_argument("--block-size", type=int, default=256)
    d.add_argument("--batch-size", type=int, default=16, help="sequences per optimizer step (global)")
    d.add_argument("--micro-batch-size", type=int, default=4, help="sequences per forward pass per process")
    d.add_argument("--lr", type=float, default=3e-4)
    d.add_argument("--warmup", type=float, default=0.05, help="fraction of the steps")
    d.add_argument("--grad-clip", type=float, default=1.0)
    d.add_argument(
        "--no-bf16",
        action="store_true",
        help="train in float32 (default: bf16 autocast where the device computes bf16 natively: "
        "CUDA with bf16, CPUs with AVX-512 or AMX; float32 elsewhere)",
    )
    d.add_argument("--train", choices=("all", "compressed"), default="all", help="which parameters to train")
    d.add_argument("--alpha", type=float, default=1.0, help="weight of KL(teacher || student)")
    d.add_argument("--beta", type=float, default=1.0, help="weight of next-token cross-entropy")
    d.add_argument("--gamma", type=float, default=0.0, help="weight of the hidden-state MSE")
    d.add_argument("--temperature", type=float, default=1.0)
    d.add_argument("--hidden-layers", type=int, nargs="*", help="hidden states to match (0 = embeddings)")
    d.add_argument("--eval-every", type=int, default=50, help="steps between held-out evaluations")
    d.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints")
    d.add_argument("--eval-dataset", nargs="*", help="also evaluate each step's model on these (as in eval)")
    d.add_argument("--eval-max-tokens", type=int, default=20_000)
    d.add_argument("--dense-head", action="store_true", help="keep a separate dense LM head (preset only)")
    d.add_argument("--time-budget", type=float, help="permutation search seconds per layer (preset only)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(run=_distill)

    x = commands.add_parser("export", help="write a compressed run as a plain dense Hugging Face model directory")
    x.add_argument("directory", metavar="RUN_DIR", help="a directory written by compress or distill")
    x.add_argument("out")
    x.add_argument("--overwrite", action="store_true")
    x.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        help="write the weights in this dtype (default: as the run is stored; distill writes float32)",
    )
    x.set_defaults(run=_export)

    i = commands.add_parser("inspect", help="per-layer report and sizes of a compressed directory")
    i.add_argument("directory")
    i.add_argument(
        "--plot", nargs="?", const="", help="draw per-layer error and parameters kept (PNG; default DIR/layers.png)"
    )
    i.set_defaults(run=_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, OSError) as err:
        print(f"tqcompressor: error: {err}".splitlines()[0], file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
