"""What the benchmark scripts share: the local assets beside this checkout and the models they load."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import torch

from tqcompressor.evaluation import read_text
from tqcompressor.loading import load_model

# $TQCOMPRESSOR_ASSETS, where set, holds a copy (a machine without ../shared beside the checkout).
ASSETS = Path(os.environ.get("TQCOMPRESSOR_ASSETS", Path(__file__).resolve().parents[2] / "shared" / "assets"))
RESULTS = Path(__file__).resolve().parent / "results"
# Issue 11's target: at equal parameters, auto at least this much lower held-out ppl than the best uniform plan.
TARGET_LOWER = 0.2
os.environ["TQCOMPRESSOR_ASSETS"] = str(ASSETS)  # named eval sets read their local copies


def load_smollm2():
    """(SmolLM2-135M as a plain float32 LlamaForCausalLM, tokenizer), fetched by the assets' script."""
    fetched = subprocess.run(["bash", str(ASSETS / "smollm2/fetch.sh")], capture_output=True, text=True, check=True)
    return load_model(fetched.stdout.split()[-1])


def heldout_ids(tokenizer, max_tokens: int | None = None) -> list[int]:
    """The held-out Gutenberg books as token ids, the first ``max_tokens + 1`` when capped."""
    ids = tokenizer(read_text(ASSETS / "corpus/gutenberg/heldout"), verbose=False)["input_ids"]
    return ids if max_tokens is None else ids[: max_tokens + 1]


def command_history(meta: dict, command: str) -> list[str]:
    """The commands that made a results file so far, ``command`` last (older files kept one "command")."""
    earlier = meta.get("commands", [meta["command"]] if "command" in meta else [])
    return [*earlier, command]


def command_line(script: str, args, left_out: tuple[str, ...] = ()) -> str:
    """The command that ran ``script`` with the parsed ``args``: every flag given a value, switches only
    when on, ``left_out`` (dest names) omitted."""

    def flag(key: str, value) -> str:
        shown = "" if value is True else f" {' '.join(map(str, value)) if isinstance(value, list) else value}"
        return f"--{key.replace('_', '-')}{shown}"

    flags = (flag(k, v) for k, v in vars(args).items() if k not in left_out and v is not False)
    return " ".join([f"python benchmarks/{script}", *flags])


def machine() -> str:
    """What made a benchmark's numbers: CPU architecture and model, torch threads and version."""
    accelerator = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    cpu = f"{platform.machine()} {cpu_model()}".strip()
    return f"{cpu}, {torch.get_num_threads()} threads{accelerator}, torch {torch.__version__}"


def cpu_model() -> str:
    """The CPU's model name where Linux tells it: the same pipeline ran 2.1-2.4x slower on a 2-core AMD
    EPYC than on an Intel CPU with AMX, and "x86_64" alone cannot tell the two apart."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor()


def machine_labels(records: list[dict]) -> tuple[dict[str, str], str]:
    """Short labels ("m1", "m2", ...) for the machines that made ``records`` (their ``machine`` field), and
    the sentence that spells them out for a report: a results file filled by ``--resume`` over several
    sessions mixes machines, and its timings only compare between rows of one machine."""
    labels: dict[str, str] = {}
    for r in records:
        labels.setdefault(r["machine"], f"m{len(labels) + 1}")
    named = "; ".join(f"{label}: {name}" for name, label in labels.items())
    return labels, f"Machines (column machine; timings compare only within one): {named}."
