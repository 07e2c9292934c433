"""Save, load and materialize compressed models: safetensors weights plus a JSON config, no pickles.

``config.json`` is the base model's config with a ``tqcompressor`` section that records, for every
replaced module, the structure needed to rebuild it (factor shapes, layout, stages), the plans
applied and their reports. ``load`` builds the base architecture from the config, swaps in empty
compressed modules of those shapes and loads the weights strictly.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors.torch import load_file, save_file
from torch import nn

from .experts import fuse_experts, is_fused_experts, unfuse, unfused_experts
from .methods import is_compressed, is_embedding, module_class
from .methods.targets import embedding_scale
from .surgery import guard_hub_saving, set_submodule, set_untied_config
from .tied_head import TiedEmbeddingHead

FORMAT_VERSION = 2  # 2: KroneckerLinear factors stored in the layout its matmuls read
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TIED_HEAD = "tied_embedding_head"


def compressed_modules(model: nn.Module) -> dict[str, dict[str, Any]]:
    """The ``type`` and structure of every replaced module, by name. A separate dense head needs no
    entry: the saved config has tie_word_embeddings off, so the base architecture has its own head."""
    names = {id(module): name for name, module in model.named_modules()}
    specs = {}
    for name, module in model.named_modules():
        if is_compressed(module):
            specs[name] = {"type": module.spec_type, **module.to_spec()}
        elif isinstance(module, TiedEmbeddingHead):
            specs[name] = {"type": TIED_HEAD, "embedding": names[id(module.embedding)], "bias": module.bias is not None}
    return specs


def _placeholder(spec: dict[str, Any], modules: dict[str, nn.Module]) -> nn.Module:
    if spec["type"] == TIED_HEAD:
        embedding = modules[spec["embedding"]]
        return TiedEmbeddingHead(embedding, torch.zeros(embedding.num_embeddings) if spec["bias"] else None)
    structure = {key: value for key, value in spec.items() if key != "type"}
    return module_class(spec["type"]).from_spec(structure)


def save(
    model: nn.Module,
    directory: str | Path,
    tokenizer=None,
    overwrite: bool = False,
    write_extra: Callable[[Path], None] | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write config.json, model.safetensors (and the tokenizer) atomically into ``directory``.
    ``write_extra(folder)`` adds files (a trainer's state) inside the same atomic write. ``dtype`` writes
    the floating tensors in that dtype (config.json's ``dtype`` says so; the model in memory is untouched)."""
    directory = Path(directory)
    refuse_to_clobber(directory, overwrite)
    config = model.config.to_dict()
    config["architectures"] = [type(model).__name__]
    config["tqcompressor"] = {
        "format_version": FORMAT_VERSION,
        "modules": compressed_modules(model),
        "unfused_experts": unfused_experts(model),
        "history": getattr(model, "tqcompressor_history", []),
    }
    state = {name: tensor.detach().contiguous().cpu() for name, tensor in model.state_dict().items()}
    # Shared tensors (tied heads, BERT's decoder bias) appear under several names; safetensors stores
    # each once and config.json records the other names, so that load can share them again.
    seen: dict[tuple[int, int], str] = {}
    aliases: dict[str, str] = {}
    for name in list(state):
        key = (state[name].data_ptr(), state[name].numel())
        if key in seen and state[name].numel():
            del state[name]
            aliases[name] = seen[key]
        else:
            seen[key] = name
    config["tqcompressor"]["shared"] = aliases
    if dtype is not None:  # after the aliases, which the tensors' storage identifies
        state = {name: t.to(dtype) if t.is_floating_point() else t for name, t in state.items()}
        config["dtype"] = str(dtype).removeprefix("torch.")

    def write(staging: Path) -> None:
        save_file(state, str(staging / WEIGHTS), metadata={"format": "pt", "tqcompressor": str(FORMAT_VERSION)})
        (staging / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True, default=str))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staging))
        if write_extra is not None:
            write_extra(staging)

    return write_atomically(directory, write)


def refuse_to_clobber(directory: Path, overwrite: bool) -> None:
    if directory.exists() and (not directory.is_dir() or (any(directory.iterdir()) and not overwrite)):
        raise FileExistsError(f"{directory} already exists and is not empty (pass overwrite=True / --overwrite)")


def write_atomically(directory: Path, write: Callable[[Path], None]) -> Path:
    """``write(folder)`` into a staging folder beside ``directory``, then swap it in: a reader (or a
    crash) sees the old directory or the complete new one, never a half-written one."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    recover_interrupted_write(directory)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.staging-", dir=directory.parent))
    try:
        write(staging)
        if directory.exists():
            backup = _backup(directory)
            os.replace(directory, backup)
            os.replace(staging, directory)
            shutil.rmtree(backup)
        else:
            os.replace(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def write_file_atomically(path: str | Path, write: Callable[[Path], None]) -> Path:
    """``write(file)`` to a staging file beside ``path`` (same suffix, so writers that read it still
    work), then rename it into place: a killed run leaves the old file or the new one, never half."""
    path = Path(path)
    staging = path.with_name(f".{path.stem}.staging{path.suffix}")
    write(staging)
    os.replace(staging, path)
    return path


def _backup(directory: Path) -> Path:
    return directory.with_name(f".{directory.name}.old")


def recover_interrupted_write(directory: str | Path) -> None:
    """Undo what a process killed inside ``write_atomically`` leaves: staging folders (incomplete, so
    removed) and, if it died between its two renames, the previous directory under its backup name."""
    directory = Path(directory)
    backup = _backup(directory)
    if backup.exists():
        if directory.exists():
            shutil.rmtree(backup)  # died after the swap: the new directory is complete
        else:
            os.replace(backup, directory)  # died between the renames: the old one is complete
    for stale in directory.parent.glob(f".{directory.name}.staging-*"):
        shutil.rmtree(stale, ignore_errors=True)


def read_config(directory: str | Path) -> dict[str, Any]:
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a directory")
    path = directory / CONFIG
    if not path.is_file():
        # A distillation run writes its models one or two levels down (OUT/model, OUT/03-step3/model).
        inside = sorted(str(p.parent) for p in [*directory.glob(f"*/{CONFIG}"), *directory.glob(f"*/*/{CONFIG}")])
        more = f" and {len(inside) - 1} more" if len(inside) > 1 else ""
        held = f"; it holds {inside[-1]}{more}" if inside else ""
        raise ValueError(f"{directory} is not a model directory (no {CONFIG}){held}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); the directory is corrupted") from err


def load(directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> nn.Module:
    """Rebuild a compressed model saved by ``save``; no network access, no pickles."""
    directory = Path(directory)
    raw = read_config(directory)
    section = raw.pop("tqcompressor", None)
    if section is None:
        raise ValueError(f"{directory} is not a tqcompressor model (config.json has no 'tqcompressor' section)")
    if section.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{directory} holds tqcompressor format {section.get('format_version')}, this version reads format "
            f"{FORMAT_VERSION}: load and export it (tqcompressor export) with the version that saved it"
        )
    if not (directory / WEIGHTS).is_file():
        raise ValueError(f"{directory} has no {WEIGHTS}: the save is incomplete")
    architectures = raw.get("architectures") or []
    model_class = getattr(transformers, architectures[0], None) if architectures else None
    if model_class is None:
        raise ValueError(f"{directory}/config.json names no known architecture ({architectures})")
    config = transformers.AutoConfig.for_model(**raw)
    model = model_class(config)
    modules = dict(model.named_modules())
    for name in section.get("unfused_experts", []):
        if name not in modules or not is_fused_experts(modules[name]):
            raise ValueError(f"{directory}/config.json unfuses experts at {name}; the architecture has none there")
        unfuse(modules[name])
    modules = dict(model.named_modules())
    # Embeddings first, so that tied heads can reference their rebuilt embedding.
    for name, spec in sorted(section["modules"].items(), key=lambda kv: kv[1]["type"] == TIED_HEAD):
        replacement = _placeholder(spec, modules)
        if is_embedding(replacement):  # a compressed one: no placeholder is a dense table
            replacement.embed_scale = embedding_scale(modules[name])  # as the rebuilt architecture scales
        set_submodule(model, name, replacement)
        modules[name] = replacement
    if any(spec["type"] == TIED_HEAD for spec in section["modules"].values()):
        # As compress_ left it; a dense head tied to a dense embedding stays tied, so that export writes a
        # config that ties it again rather than one that leaves the head to be initialised at random.
        set_untied_config(model)
    try:
        state = load_file(str(directory / WEIGHTS))
    except Exception as err:  # safetensors raises its own error types for truncated or garbled files
        raise ValueError(f"cannot read {directory / WEIGHTS}: {err}") from err
    _load_state(model, state, section.get("shared", {}), directory)
    model.tqcompressor_history = section.get("history", [])
    if section["modules"]:
        guard_hub_saving(model)
    model.eval()
    return model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], aliases: dict[str, str], directory: Path) -> None:
    expected = model.state_dict()
    # Shared tensors were stored once; their other names come from the saved alias table.
    for alias, original in aliases.items():
        if original in state:
            state.setdefault(alias, state[original])
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{directory / WEIGHTS} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise ValueError(
                f"{directory / WEIGHTS}: {name} has shape {tuple(tensor.shape)}, "
                f"config expects {tuple(expected[name].shape)}"
            )
    model.load_state_dict(state, strict=True)
    _share_again(model, aliases)


def _share_again(model: nn.Module, aliases: dict[str, str]) -> None:
    """Make every alias the very Parameter it was saved as a copy of (so training keeps them tied)."""
    parameters = dict(model.named_parameters(remove_duplicate=False))
    for alias, original in aliases.items():
        if alias in parameters and original in parameters and parameters[alias] is not parameters[original]:
            module_name, _, attribute = alias.rpartition(".")
            setattr(model.get_submodule(module_name), attribute, parameters[original])


def _tie_config_to_shared_head(model: nn.Module) -> None:
    """Say the head is tied where it is the input embedding's own weight: Hugging Face stores a shared
    weight once and, told the head is untied, initialises it at random on load (runs saved before load
    kept such a tie in the config were written that way)."""
    inputs, outputs = (getattr(model, f"get_{kind}_embeddings", lambda: None)() for kind in ("input", "output"))
    weight = getattr(outputs, "weight", None)
    if weight is not None and weight is getattr(inputs, "weight", None) and hasattr(model, "config"):
        model.config.tie_word_embeddings = True


def materialize(model: nn.Module, pattern: str | None = None) -> nn.Module:
    """Replace compressed modules by their dense equivalents, in place: all of them (the original
    architecture), or those whose name fully matches the regex ``pattern`` (e.g. layers whose
    factorised form runs slower than dense; ``benchmarks/results/speed.md`` says which). A tied head
    follows its embedding; MoE experts left all dense go back into the stock tensors (``fuse_experts``)."""
    modules = list(model.named_modules())
    chosen = [
        (name, module)
        for name, module in modules
        if is_compressed(module)
        and not isinstance(module, TiedEmbeddingHead)
        and (pattern is None or re.fullmatch(pattern, name))
    ]
    if pattern is not None and not chosen:
        compressed = [name for name, module in modules if is_compressed(module)]
        raise ValueError(f"pattern {pattern!r} matches none of the compressed modules {compressed[:8]}")
    picked = {name for name, _ in chosen}
    for name, module in chosen:
        parent = name.rpartition(".")[0]
        left = [n for n, m in modules if n.rpartition(".")[0] == parent and is_compressed(m) and n not in picked]
        if module.cut_with_siblings and left:
            together = re.escape(parent) + r"\..*"
            raise ValueError(f"{name} is cut together with {', '.join(left)}: materialize them together ({together!r})")
    dense_of: dict[int, nn.Module] = {}
    for name, module in chosen:
        dense_of[id(module)] = module.to_dense()
        set_submodule(model, name, dense_of[id(module)])
    for name, head in modules:
        if not isinstance(head, TiedEmbeddingHead) or id(head.embedding) not in dense_of:
            continue
        embedding = dense_of[id(head.embedding)]
        linear = nn.Linear(head.in_features, head.out_features, bias=head.bias is not None)
        linear.weight = embedding.weight  # keep the tie, as the original architecture has it
        if head.bias is not None:
            linear.bias = head.bias
        set_submodule(model, name, linear.to(embedding.weight.device))
    _tie_config_to_shared_head(model)
    fuse_experts(model)  # the stock 3-D tensors again, wherever every expert is dense
    if any(is_compressed(module) for module in model.modules()):
        return model
    model.tqcompressor_history = []
    guard_hub_saving(model, guard=False)
    return model
