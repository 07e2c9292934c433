"""Command line: ``tqcompressor compress | eval | inspect``. User mistakes end in one line, exit 2."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .evaluation import DATASETS, assets_dir, evaluate, size_report
from .plan import CompressionPlan
from .presets import PRESETS, preset
from .serialization import is_compressed_dir, load, read_config, save
from .surgery import CompressionReport, compress


def house_teacher() -> Path | None:
    path = assets_dir() / "house-teacher"
    return path if path.is_dir() else None


def load_model(name_or_path: str):
    """(model, tokenizer) from a tqcompressor directory, a local HF directory or a Hub name."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if is_compressed_dir(name_or_path):
        model = load(name_or_path)
    else:
        model = AutoModelForCausalLM.from_pretrained(name_or_path)
    model.eval()
    return model, AutoTokenizer.from_pretrained(name_or_path)


def _compress(args: argparse.Namespace) -> None:
    model_name = args.model
    if model_name is None:
        teacher = house_teacher()
        if teacher is None:
            raise ValueError("--model is required (no ../shared/assets/house-teacher beside this checkout)")
        model_name = str(teacher)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise FileExistsError(f"{out} already exists and is not empty (use --overwrite)")
    model, tokenizer = load_model(model_name)
    search = {"time_budget": args.time_budget} if args.time_budget is not None else {}
    if args.plan:
        plan = CompressionPlan.load(args.plan)
        if args.dense_head:
            plan.tie_head = False
    else:
        plan = preset(args.preset, model.config, tie_head=not args.dense_head, **search)
    report = compress(model, plan, progress=not args.quiet)
    save(model, out, tokenizer=tokenizer, overwrite=args.overwrite)
    print(report.table())
    print(f"saved to {out}")


def _eval(args: argparse.Namespace) -> None:
    model, tokenizer = load_model(args.model)
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
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


def _inspect(args: argparse.Namespace) -> None:
    config = read_config(args.directory)
    section = config.get("tqcompressor")
    if section is None:
        raise ValueError(f"{args.directory} is not a tqcompressor model (no 'tqcompressor' section in config.json)")
    for step in section.get("history", []):
        print(CompressionReport.from_dict(step["report"]).table())
        print()
    print(json.dumps(size_report(load(args.directory), args.directory), indent=2))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tqcompressor", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    c = commands.add_parser("compress", help="compress a model with a preset or a plan file and save it")
    c.add_argument("--model", help="HF name or directory (default: ../shared/assets/house-teacher if present)")
    which = c.add_mutually_exclusive_group(required=True)
    which.add_argument("--preset", choices=PRESETS)
    which.add_argument("--plan", help="YAML or JSON plan file")
    c.add_argument("--out", required=True)
    c.add_argument("--overwrite", action="store_true")
    c.add_argument("--dense-head", action="store_true", help="keep a separate dense LM head (counted in full)")
    c.add_argument("--time-budget", type=float, help="permutation search seconds per layer (preset only)")
    c.add_argument("--quiet", action="store_true")
    c.set_defaults(run=_compress)

    e = commands.add_parser("eval", help="perplexity / LAMBADA of a model")
    e.add_argument("model", help="compressed directory, HF directory or HF name")
    e.add_argument("--dataset", required=True, help=f"{' | '.join(DATASETS)} | a text file or folder")
    e.add_argument("--max-tokens", type=int)
    e.add_argument("--max-length", type=int, help="window length (default: the model's context)")
    e.add_argument("--stride", type=int)
    e.add_argument("--json", help="also write the result to this file")
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(run=_eval)

    i = commands.add_parser("inspect", help="per-layer report and sizes of a compressed directory")
    i.add_argument("directory")
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
