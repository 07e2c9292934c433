"""Calibration: run the original model once over real text and keep, for every module a plan targets,
what its inputs look like (``statistics``): Σ x xᵀ in float64 for linear layers, token counts for
embeddings (and Σ h hᵀ of the inputs of an output head tied to one); with ``fisher``, a second pass
takes Σ g gᵀ of each linear layer's output gradients too. Activations are never stored;
modules that receive the very same input tensor (GPT-2's q/k/v inside ``c_attn`` are one module;
LLaMA's ``q/k/v_proj`` and ``gate/up_proj`` are not) share one accumulator. Statistics save to
safetensors + JSON metadata and are checked against the model on load.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from .loading import check_runs_on_token_ids
from .methods import is_embedding
from .methods.targets import dense_weight, is_linear
from .statistics import InputStats, TokenStats

try:
    import fcntl
except ImportError:  # Windows: spilled folders are not locked, and none is taken for abandoned
    fcntl = None

FORMAT = "tqcompressor-calibration-1"
# The share of the memory free that statistics may take at once, in one pass or in each of several: the
# rest holds the passes' activations, and the Fisher's backward pass keeps a whole model's (a 1.1B LLaMA
# of TinyLlama's shape: about 9 GiB beyond its statistics on 4 x 512 tokens; with half of 18 GiB free
# for the statistics, a pass reached 22 GiB of a 23 GiB machine). Less where the Fisher's pass is
# estimated to need more (``fisher_pass_bytes``).
STATISTICS_SHARE = 1 / 3
# What a Fisher batch holds beyond the tensors its forward saves for the backward pass: the gradients
# flowing back, their float64 copies, what the allocator keeps (measured 1.9x on TinyLlama-1.1B's shape,
# 1.7x on Llama-3.2-1B's).
FISHER_PASS_OVERHEAD = 2.0
SPILL_PREFIX = "tqcompressor-statistics-"
SPILL_LOCK = "owner.lock"
_spilled_here: set[str] = set()  # where a file system's locks are per process (NFS), ours look free to us


class SpillFolder(tempfile.TemporaryDirectory):
    """The temporary folder of statistics kept on disk, locked for as long as it lives: a run killed before
    it could remove it (SIGKILL, the out-of-memory killer, SIGTERM) leaves it unlocked, and the next
    ``collect`` removes it (``remove_abandoned_statistics``); a 1B model's take 20-30 GiB."""

    def __init__(self):
        super().__init__(prefix=SPILL_PREFIX)
        _spilled_here.add(self.name)
        if fcntl is not None:
            # Locked before it has its name, so that no other run finds the lock file unlocked.
            pending = Path(self.name) / f".{SPILL_LOCK}"
            self.lock = open(pending, "w")  # noqa: SIM115 - held, and so locked, as long as the folder
            fcntl.flock(self.lock, fcntl.LOCK_EX)
            pending.rename(Path(self.name) / SPILL_LOCK)


def remove_abandoned_statistics() -> list[tuple[Path, int]]:
    """Remove the folders of statistics in the temporary folder that no living run holds (the lock of
    ``SpillFolder`` released by the kernel when its process died); (folder, bytes) of each removed. Folders
    without a lock file (being created, or older than it) are left alone."""
    if fcntl is None:
        return []
    removed = []
    for folder in Path(tempfile.gettempdir()).glob(f"{SPILL_PREFIX}*"):
        if str(folder) in _spilled_here:
            continue
        try:
            with open(folder / SPILL_LOCK) as lock:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                size = sum(path.stat().st_size for path in folder.iterdir())
                shutil.rmtree(folder, ignore_errors=True)
        except OSError:  # held by a living run, removed meanwhile, or not ours to remove
            continue
        removed.append((folder, size))
    return removed


def weight_digest(module: nn.Module) -> list[float]:
    """Sum and norm of a module's weight: tells statistics of another model (or of compressed weights)."""
    weight = module.weight.detach().double()
    return [float(weight.sum()), float(weight.norm())]


class OnDisk(Mapping):
    """Statistics too large for memory (``collect`` with ``spill``): each tensor in a safetensors file of a
    temporary folder, read at every access; the folder goes when the last mapping holding it does."""

    def __init__(self, files: dict[str, Path], shapes: dict[str, tuple[int, ...]], folder: SpillFolder):
        self.files, self.shapes, self.folder = files, shapes, folder

    def __getitem__(self, key: str) -> torch.Tensor:
        with safe_open(str(self.files[key]), "pt") as handle:
            return handle.get_tensor(key)

    def __contains__(self, key: object) -> bool:
        return key in self.files  # without reading the tensor, as Mapping's default would

    def __iter__(self) -> Iterator[str]:
        return iter(self.files)

    def __len__(self) -> int:
        return len(self.files)


class InputsOnDisk(OnDisk):
    """Input second moments kept on disk, read as ``InputStats``; ``passes``: over the text, to collect them."""

    def __init__(self, files, shapes, folder, tokens: dict[str, int], passes: int):
        super().__init__(files, shapes, folder)
        self.tokens, self.passes = tokens, passes

    def __getitem__(self, key: str) -> InputStats:
        return InputStats(super().__getitem__(key), self.tokens[key])


def _width(inputs: Mapping[str, InputStats], key: str) -> int:
    return inputs.shapes[key][0] if isinstance(inputs, OnDisk) else inputs[key].second_moment.shape[0]


def _input_tokens(inputs: Mapping[str, InputStats]) -> dict[str, int]:
    return inputs.tokens if isinstance(inputs, InputsOnDisk) else {key: s.tokens for key, s in inputs.items()}


@dataclass
class CalibrationStats:
    """``owner[module]`` names the accumulator a module reads; ``inputs``/``tokens`` hold them;
    ``outputs[module]``: Σ g gᵀ of a linear layer's output gradients, where the Fisher was collected.
    ``inputs`` and ``outputs`` are ``OnDisk`` where they did not fit in memory."""

    owner: dict[str, str]
    inputs: Mapping[str, InputStats] = field(default_factory=dict)
    tokens: dict[str, TokenStats] = field(default_factory=dict)
    outputs: Mapping[str, torch.Tensor] = field(default_factory=dict)
    digests: dict[str, list[float]] = field(default_factory=dict)
    model_type: str | None = None
    seconds: float = 0.0

    def for_module(self, name: str) -> InputStats | TokenStats | dict[str, InputStats] | None:
        """A module's statistics; for a module holding described linear layers (an MLP a method cuts
        whole), theirs by child name."""
        key = self.owner.get(name)
        if key is None:
            children = [owned for owned in self.owner if owned.rpartition(".")[0] == name]
            return {child.rpartition(".")[2]: self.for_module(child) for child in children} or None
        if key in self.inputs and name in self.outputs:
            return replace(self.inputs[key], output_second_moment=self.outputs[name])
        return self.inputs.get(key) or self.tokens.get(key)

    def fisher_of(self, names: set[str]) -> Mapping[str, torch.Tensor]:
        """The Fisher output moments of ``names`` alone, without reading those kept on disk."""
        if isinstance(self.outputs, OnDisk):
            kept = {name: self.outputs.files[name] for name in self.outputs.files if name in names}
            return OnDisk(kept, self.outputs.shapes, self.outputs.folder)
        return {name: g for name, g in self.outputs.items() if name in names}

    def summary(self) -> dict:
        widths = [_width(self.inputs, key) for key in self.inputs]
        widths += [len(t.head_second_moment) for t in self.tokens.values() if t.head_second_moment is not None]
        summary = {
            "modules": len(self.owner),
            "accumulators": len(self.inputs) + len(self.tokens),
            "tokens": max([*_input_tokens(self.inputs).values()] + [int(t.counts.sum()) for t in self.tokens.values()]),
            "float64_bytes": sum(w * w * 8 for w in widths),
            "seconds": round(self.seconds, 2),
        }
        if isinstance(self.inputs, InputsOnDisk):
            summary.update(on_disk=self.inputs.folder.name, passes=self.inputs.passes)
        return summary

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        if isinstance(self.inputs, OnDisk) or isinstance(self.outputs, OnDisk):
            raise ValueError(
                "these statistics did not fit in memory and are kept on disk for this run only: one file cannot "
                "hold them (collect them with spill=False, without --save-calibration, where memory allows)"
            )
        tensors = {f"{key}.second_moment": s.second_moment.contiguous() for key, s in self.inputs.items()}
        tensors.update({f"{key}.counts": s.counts.contiguous() for key, s in self.tokens.items()})
        tied = [key for key, s in self.tokens.items() if s.head_second_moment is not None]
        tensors.update({f"{key}.head_second_moment": self.tokens[key].head_second_moment.contiguous() for key in tied})
        tensors.update({f"{name}.output_second_moment": g.contiguous() for name, g in self.outputs.items()})
        meta = {
            "owner": self.owner,
            "input_tokens": {key: s.tokens for key, s in self.inputs.items()},
            "embeddings": list(self.tokens),
            "tied_heads": tied,
            "fisher": list(self.outputs),
            "digests": self.digests,
            "model_type": self.model_type,
            "seconds": self.seconds,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata={"format": FORMAT, "meta": json.dumps(meta)})
        return path

    @classmethod
    def load(cls, path: str | Path) -> CalibrationStats:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"calibration statistics {path} do not exist")
        try:
            with safe_open(str(path), "pt") as handle:
                metadata = handle.metadata() or {}
                if metadata.get("format") != FORMAT:
                    raise ValueError(f"{path} is not a tqcompressor calibration file")
                meta = json.loads(metadata["meta"])
                inputs = {
                    key: InputStats(handle.get_tensor(f"{key}.second_moment"), tokens)
                    for key, tokens in meta["input_tokens"].items()
                }
                tied = meta.get("tied_heads", [])
                tokens = {
                    key: TokenStats(
                        handle.get_tensor(f"{key}.counts"),
                        handle.get_tensor(f"{key}.head_second_moment") if key in tied else None,
                    )
                    for key in meta["embeddings"]
                }
                outputs = {name: handle.get_tensor(f"{name}.output_second_moment") for name in meta.get("fisher", [])}
        except ValueError:
            raise
        except Exception as err:  # safetensors raises its own types for truncated or garbled files
            raise ValueError(f"cannot read calibration statistics {path}: {err}") from err
        return cls(meta["owner"], inputs, tokens, outputs, meta["digests"], meta["model_type"], meta["seconds"])

    def check(self, model: nn.Module, names: list[str]) -> None:
        """Raise before any module changes if these statistics do not describe ``model``'s ``names``."""
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if self.model_type != model_type:
            raise ValueError(f"calibration statistics are of a {self.model_type!r} model, not {model_type!r}")
        for name in expand_containers(model, names):
            if name not in self.owner:
                raise ValueError(f"calibration statistics have nothing for {name}: collect them with this plan")
            module = model.get_submodule(name)
            stats = self.for_module(name)
            if isinstance(stats, InputStats):
                width, outputs = dense_weight(module)[0].shape
                if stats.second_moment.shape != (width, width):
                    raise ValueError(
                        f"calibration statistics for {name} are {tuple(stats.second_moment.shape)}, "
                        f"its input is {width} wide: they come from another model"
                    )
                g = stats.output_second_moment
                if g is not None and g.shape != (outputs, outputs):
                    raise ValueError(
                        f"the Fisher statistics for {name} are {tuple(g.shape)}, its output is {outputs} wide: "
                        "they come from another model"
                    )
            elif stats.counts.shape[0] != module.num_embeddings:
                raise ValueError(
                    f"calibration token counts for {name} cover {stats.counts.shape[0]} tokens, "
                    f"not {module.num_embeddings}: another vocabulary"
                )
            elif stats.head_second_moment is not None and stats.head_second_moment.shape[0] != module.embedding_dim:
                raise ValueError(
                    f"calibration statistics for the head tied to {name} are {stats.head_second_moment.shape[0]} "
                    f"wide, the embedding {module.embedding_dim}: they come from another model"
                )
            digest = self.digests.get(name)
            if digest is not None and not torch.allclose(
                torch.tensor(digest), torch.tensor(weight_digest(module)), rtol=1e-6
            ):
                raise ValueError(
                    f"calibration statistics for {name} come from other weights (another model or checkpoint)"
                )


def expand_containers(model: nn.Module, names: list[str]) -> list[str]:
    """``names`` with each module that is neither a linear layer nor an embedding (an MLP a method cuts
    whole) replaced by its linear children, whose statistics are its own."""
    expanded = []
    for name in names:
        module = model.get_submodule(name)
        if is_linear(module) or is_embedding(module):
            expanded.append(name)
        else:
            expanded += [f"{name}.{child}" for child, m in module.named_children() if is_linear(m)]
    return list(dict.fromkeys(expanded))


def calibration_targets(model: nn.Module, names: list[str]) -> tuple[list[str], list[str]]:
    """(linear layers, embeddings) among ``names`` (containers by their linear children), each calibrated
    on the original module."""
    check_runs_on_token_ids(model, "calibration", "compress it with a plan and no calibration")
    linear, embeddings = [], []
    for name in expand_containers(model, names):
        module = model.get_submodule(name)
        if is_linear(module):
            linear.append(name)
        elif isinstance(module, nn.Embedding):
            embeddings.append(name)
        elif is_embedding(module):
            raise ValueError(f"{name} is already compressed: calibrate the original model, not a compressed one")
    return linear, embeddings


def tied_heads(model: nn.Module, embeddings: list[str]) -> dict[str, nn.Module]:
    """The output head that shares its weight with each of ``embeddings``, where one does."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if getter is not None else None
    weight = getattr(head, "weight", None)
    return {name: head for name in embeddings if weight is not None and weight is model.get_submodule(name).weight}


def check_token_count(model: nn.Module, linear: list[str], tokens: int) -> None:
    widths = {name: dense_weight(model.get_submodule(name))[0].shape[0] for name in linear}
    if widths and tokens < max(widths.values()):
        widest = max(widths, key=widths.get)
        raise ValueError(
            f"{tokens} calibration tokens cannot estimate the {widths[widest]}-wide input second moment of "
            f"{widest}: give at least {widths[widest]} (preferably 100x more)"
        )


def _accumulators(model: nn.Module, linear: list[str], sample: torch.Tensor) -> dict[str, str]:
    """Each of ``linear`` -> the first of them, in the order a forward pass over ``sample`` calls them,
    that receives the very same input tensor (whose accumulator ``collect`` shares); those the pass does
    not call (an expert no token of ``sample`` is routed to) last, each its own."""
    seen: list[tuple[torch.Tensor, str]] = []  # held, so that identity within the pass is reliable
    key: dict[str, str] = {}

    def record(name: str, args: tuple) -> None:
        if name not in key:
            key[name] = next((k for x, k in seen if x is args[0]), name)
            seen.append((args[0], key[name]))

    _each_call(model, linear, sample, record)
    return key | {name: name for name in linear if name not in key}


def _bytes_of(module: nn.Module, fisher: bool, own_input: bool) -> int:
    width, outputs = dense_weight(module)[0].shape
    return 8 * ((width * width if own_input else 0) + (outputs * outputs if fisher else 0))


def _embedding_bytes(model: nn.Module, embeddings: list[str]) -> int:
    counts = sum(model.get_submodule(name).num_embeddings for name in embeddings)
    return 8 * (counts + sum(head.weight.shape[-1] ** 2 for head in tied_heads(model, embeddings).values()))


def statistics_bytes(
    model: nn.Module, linear: list[str], embeddings: list[str], sample: torch.Tensor, fisher: bool
) -> tuple[int, int]:
    """(bytes of the input statistics, bytes of the Fisher's) that ``collect`` will accumulate, float64:
    Σ x xᵀ once per distinct input (one forward pass over ``sample`` tells which layers share one), token
    counts and a tied head's Σ h hᵀ, and with ``fisher`` Σ g gᵀ of every linear layer's output."""
    return _sizes(model, _accumulators(model, linear, sample), embeddings, fisher)


def _sizes(model: nn.Module, keys: dict[str, str], embeddings: list[str], fisher: bool) -> tuple[int, int]:
    inputs = sum(_bytes_of(model.get_submodule(name), False, key == name) for name, key in keys.items())
    outputs = sum(_bytes_of(model.get_submodule(name), True, False) for name in keys) if fisher else 0
    return inputs + _embedding_bytes(model, embeddings), outputs


def free_memory(device: torch.device) -> int | None:
    """Bytes free for new tensors on ``device``: available host memory, or the accelerator's (what PyTorch
    holds cached but unused included); None where neither is known."""
    if device.type == "cpu":
        import psutil

        return psutil.virtual_memory().available
    if device.type == "cuda":
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return torch.cuda.mem_get_info(device)[0] + cached
    return None


def free_disk() -> int:
    """Bytes free where statistics spill to: the temporary folder (``TMPDIR``)."""
    return shutil.disk_usage(tempfile.gettempdir()).free


def _groups(model: nn.Module, keys: dict[str, str], embeddings: list[str], fisher: bool, limit: int) -> list[list[str]]:
    """The linear layers of ``keys`` (``_accumulators``) in their order, cut into groups whose statistics take
    at most ``limit`` bytes each (the embeddings' go with the first); layers that share an input in one group
    share its accumulator."""
    gib = 2**30
    groups: list[list[str]] = [[]]
    held: set[str] = set()
    used = _embedding_bytes(model, embeddings)
    for name, key in keys.items():
        module = model.get_submodule(name)
        cost = _bytes_of(module, fisher, key not in held)
        if groups[-1] and used + cost > limit:
            groups.append([])
            held, used = set(), 0
            cost = _bytes_of(module, fisher, True)
        if cost > limit:
            raise ValueError(
                f"the calibration statistics of {name} alone take {cost / gib:.1f} GiB (float64), more than the "
                f"{limit / gib:.1f} GiB one pass can hold beside its activations: "
                + ("collect them without the Fisher (--no-fisher; fisher=False in Python), " if fisher else "")
                + "or on a machine with more memory"
            )
        groups[-1].append(name)
        held.add(key)
        used += cost
    return [group for group in groups if group] or [[]]


@contextmanager
def _gradients_from_embeddings(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode with gradients enabled from its input embeddings' output onward and none into
    its weights (their ``requires_grad`` restored afterwards): the Fisher's pass, and its estimate."""

    def track(module, args, output):
        return output.detach().requires_grad_(True)

    handle = model.get_input_embeddings().register_forward_hook(track)
    trainable = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    model.eval()
    try:
        for p in trainable:
            p.requires_grad_(False)
        with torch.enable_grad():
            yield
    finally:
        handle.remove()
        for p, flag in trainable.items():
            p.requires_grad_(flag)
        model.train(was_training)


def fisher_pass_bytes(model: nn.Module, block: torch.Tensor, batch_size: int) -> int:
    """What one batch of ``batch_size`` sequences like ``block`` (1 x tokens) holds in the Fisher's pass
    (``fisher_moments``) beside the statistics: the tensors its forward saves for the backward pass (not
    the weights, which it does not copy) and the log-probabilities' copies, measured on ``block`` and
    scaled by ``FISHER_PASS_OVERHEAD``. On TinyLlama-1.1B's shape 4.8 GiB before scaling."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with _gradients_from_embeddings(model), torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        log_probs = model(block.to(next(model.parameters()).device)).logits.float().log_softmax(-1)
    copies = log_probs.nbytes  # the probabilities a draw reads, not saved
    return int(FISHER_PASS_OVERHEAD * batch_size * (sum(saved.values()) + copies))


def _passes(
    model: nn.Module,
    linear: list[str],
    embeddings: list[str],
    blocks: torch.Tensor,
    batch_size: int,
    fisher: bool,
    spill: bool,
    progress: bool,
) -> tuple[list[list[str]] | None, int]:
    """(None where the statistics fit in the memory free on the model's device (or it is not known); else,
    with ``spill``, the groups of ``linear`` to collect one pass each and keep on disk; the sequences per
    batch: ``batch_size``, or fewer where a Fisher's pass of that many would leave the statistics less than
    their share of the memory: their sums do not depend on how the text is cut into batches, and fewer
    passes take less time). Refuses, before any pass over the text, what can be held neither way: on a
    24 GB machine a 1.1B-parameter LLaMA's statistics (9.5 GiB of input moments, 17.6 GiB of Fisher)
    were killed after nine minutes."""
    device = next(model.parameters()).device
    free = free_memory(device)
    if free is None:
        return None, batch_size
    keys = _accumulators(model, linear, blocks[:1, :8])
    inputs, outputs = _sizes(model, keys, embeddings, fisher)
    per_sequence = fisher_pass_bytes(model, blocks[:1], 1) if fisher else 0
    fitting = int(free * (1 - STATISTICS_SHARE)) // per_sequence if per_sequence else batch_size
    batch = max(1, min(batch_size, fitting))
    working = batch * per_sequence
    limit = min(int(free * STATISTICS_SHARE), free - working)
    gib = 2**30
    if batch < batch_size and progress:
        print(
            f"calibration: {batch_size} sequences a batch would take about {batch_size * per_sequence / gib:.1f} "
            f"GiB in the Fisher's pass, of the {free / gib:.1f} GiB of {device.type} memory free: {batch} at a time",
            file=sys.stderr,
        )
    if inputs + outputs <= limit:
        return None, batch
    parts = f"{inputs / gib:.1f} GiB of input second moments" + (
        f" and {outputs / gib:.1f} GiB of the Fisher's output moments" if fisher else ""
    )
    rest = f"the Fisher's pass, about {working / gib:.1f} GiB for a batch of {batch}" if fisher else "the activations"
    room = f"{max(limit, 0) / gib:.1f} GiB of the {free / gib:.1f} GiB of {device.type} memory free (the rest: {rest})"
    if not spill or limit <= 0:
        raise ValueError(
            f"the calibration statistics of {len(linear) + len(embeddings)} modules would take {parts} "
            f"(float64), and they may take {room}: "
            + ("collect them without the Fisher (--no-fisher; fisher=False in Python), " if fisher else "")
            + (
                "for fewer modules, on a machine with more memory, or let them spill to disk (spill=True; in the "
                "CLI, without --save-calibration)"
                if limit > 0
                else f"on shorter sequences than {blocks.shape[1]} tokens (--calibration-length in the CLI), or on a "
                "machine with more memory"
            )
        )
    groups = _groups(model, keys, embeddings, fisher, limit)
    disk = free_disk()
    if inputs + outputs > disk:
        raise ValueError(
            f"the calibration statistics would take {parts} (float64): more than the {room}, and than the "
            f"{disk / gib:.1f} GiB free on disk in {tempfile.gettempdir()} where they would be kept: point TMPDIR "
            "to a larger disk, collect them without the Fisher, or for fewer modules"
        )
    if progress:
        print(
            f"calibration: {parts} exceed the {room}: {len(groups)} passes over the text, each keeping its "
            f"statistics on disk in {tempfile.gettempdir()}",
            file=sys.stderr,
        )
    return groups, batch


def check_finite(stats: CalibrationStats) -> None:
    for key, accumulator in stats.inputs.items():
        if not torch.isfinite(accumulator.second_moment).all():
            raise ValueError(f"the inputs of {key} hold NaN or infinite values on the calibration text")
    for key, accumulator in stats.tokens.items():
        if accumulator.head_second_moment is not None and not torch.isfinite(accumulator.head_second_moment).all():
            raise ValueError(f"the head tied to {key} receives NaN or infinite values on the calibration text")
    for name, g in stats.outputs.items():
        if not torch.isfinite(g).all():
            raise ValueError(f"the output gradients of {name} hold NaN or infinite values on the calibration text")


def forward_order(model: nn.Module, names: list[str], sample: torch.Tensor) -> list[str]:
    """``names`` in the order a forward pass over ``sample`` first calls them; those it never calls (a
    multimodal model's vision tower, on text) are left out."""
    order: list[str] = []
    _each_call(model, names, sample, lambda name, args: order.append(name))
    return list(dict.fromkeys(order))


def _each_call(model: nn.Module, names: list[str], sample: torch.Tensor, record: Callable[[str, tuple], None]) -> None:
    """``record(name, positional arguments)`` at every call of the modules ``names`` in one forward pass
    over ``sample``."""
    handles = [
        model.get_submodule(name).register_forward_pre_hook(lambda m, args, name=name: record(name, args))
        for name in names
    ]
    try:
        with torch.no_grad():
            model(sample.to(next(model.parameters()).device))
    finally:
        for handle in handles:
            handle.remove()


def collect(
    model: nn.Module,
    names: list[str],
    blocks: torch.Tensor,
    batch_size: int = 4,
    progress: bool = True,
    token_counts: torch.Tensor | None = None,
    fisher: bool = False,
    spill: bool = True,
) -> CalibrationStats:
    """Run ``model`` over ``blocks`` (sequences x tokens) and accumulate the statistics of ``names``.
    ``token_counts`` (``data.token_counts``): the embeddings' token counts taken on more of the
    calibration text than ``blocks`` hold, since counting needs no forward pass (house teacher, its
    embedding alone at rank 190: held-out ppl 135.7 weighted by the counts of its 10.4M training
    tokens, 141.6 by those of 32k calibration tokens; dense 132.0). ``fisher``: also the output
    gradients' second moments of the linear layers (``fisher_moments``; a backward pass per batch), with
    fewer than ``batch_size`` sequences a batch where that many would crowd the statistics (``_passes``).
    ``spill``: statistics larger than the memory free are collected in several passes over ``blocks``,
    a group of layers each, and kept on disk in the temporary folder (``OnDisk``) for as long as the
    returned statistics live; they cannot then be saved. Without it they are refused."""
    linear, embeddings = calibration_targets(model, names)
    check_token_count(model, linear, blocks.numel())
    for name in embeddings if token_counts is not None else []:
        vocab = model.get_submodule(name).num_embeddings
        if token_counts.shape != (vocab,):
            raise ValueError(f"token_counts cover {tuple(token_counts.shape)} ids; {name} has {vocab} rows")
    # On every collect: a run killed for memory may well be followed by one that does not spill.
    removed = remove_abandoned_statistics()
    if removed and progress:
        print(
            f"calibration: removed {len(removed)} folder{'s' * (len(removed) > 1)} of statistics that runs killed "
            f"before they finished left behind ({sum(size for _, size in removed) / 2**30:.1f} GiB): "
            + ", ".join(str(folder) for folder, _ in removed),
            file=sys.stderr,
        )
    fisher_linear = fisher and bool(linear)
    groups, batch_size = _passes(model, linear, embeddings, blocks, batch_size, fisher_linear, spill, progress)

    def one_pass(linear: list[str], embeddings: list[str]) -> CalibrationStats:
        return _collect_once(model, linear, embeddings, blocks, batch_size, progress, token_counts, fisher)

    if groups is None:
        return one_pass(linear, embeddings)
    return _kept_on_disk(groups, embeddings, one_pass, fisher)


def _kept_on_disk(
    groups: list[list[str]],
    embeddings: list[str],
    one_pass: Callable[[list[str], list[str]], CalibrationStats],
    fisher: bool,
) -> CalibrationStats:
    """The statistics of each group of linear layers from ``one_pass`` (of the ``embeddings`` too, with
    the first), written to a temporary folder before the next."""
    folder = SpillFolder()
    files: dict[str, dict[str, Path]] = {"inputs": {}, "outputs": {}}
    shapes: dict[str, dict[str, tuple[int, ...]]] = {"inputs": {}, "outputs": {}}
    stats = CalibrationStats({}, tokens={})
    tokens: dict[str, int] = {}
    for index, group in enumerate(groups):
        part = one_pass(group, embeddings if index == 0 else [])
        moments = {("inputs", key): s.second_moment for key, s in part.inputs.items()}
        moments.update({("outputs", name): g for name, g in part.outputs.items()})
        tokens.update({key: s.tokens for key, s in part.inputs.items()})
        stats.owner.update(part.owner)
        stats.tokens.update(part.tokens)
        stats.digests.update(part.digests)
        stats.model_type, stats.seconds = part.model_type, stats.seconds + part.seconds
        del part
        # One file per tensor, each freed once written: saving copies a file's tensors into bytes first.
        while moments:
            (kind, key), tensor = moments.popitem()
            files[kind][key] = Path(folder.name) / f"{kind}.{key}.safetensors"
            shapes[kind][key] = tuple(tensor.shape)
            save_file({key: tensor.contiguous()}, str(files[kind][key]))
            del tensor
    stats.inputs = InputsOnDisk(files["inputs"], shapes["inputs"], folder, tokens, len(groups))
    stats.outputs = OnDisk(files["outputs"], shapes["outputs"], folder) if fisher else {}
    return stats


@torch.no_grad()
def _collect_once(
    model: nn.Module,
    linear: list[str],
    embeddings: list[str],
    blocks: torch.Tensor,
    batch_size: int,
    progress: bool,
    token_counts: torch.Tensor | None,
    fisher: bool,
) -> CalibrationStats:
    device = next(model.parameters()).device
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    owner: dict[str, str] = {}
    batch_inputs: list[tuple[torch.Tensor, str]] = []  # this batch's inputs, held so identity is reliable

    def linear_hook(name: str):
        def hook(module, args):
            x = args[0]
            key = next((k for seen, k in batch_inputs if seen is x), None)
            if key is None:
                key = owner.setdefault(name, name)
                batch_inputs.append((x, key))
                flat = x.detach().reshape(-1, x.shape[-1]).double()
                sums[key] = sums.get(key, 0) + flat.T @ flat
                counts[key] = counts.get(key, 0) + flat.shape[0]
            elif owner.setdefault(name, key) != key:
                raise RuntimeError(f"{name} changed which input it shares between batches")

        return hook

    def embedding_hook(name: str, vocab: int):
        def hook(module, args):
            owner[name] = name
            ids = args[0].detach().reshape(-1).cpu()
            sums[name] = sums.get(name, 0) + torch.bincount(ids, minlength=vocab).double()

        return hook

    def head_hook(name: str):
        def hook(module, args):
            flat = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            head_sums[name] = head_sums.get(name, 0) + flat.T @ flat

        return hook

    head_sums: dict[str, torch.Tensor] = {}
    handles = [model.get_submodule(n).register_forward_pre_hook(linear_hook(n)) for n in linear]
    handles += [
        model.get_submodule(n).register_forward_pre_hook(embedding_hook(n, model.get_submodule(n).num_embeddings))
        for n in embeddings
    ]
    handles += [head.register_forward_pre_hook(head_hook(n)) for n, head in tied_heads(model, embeddings).items()]
    was_training = model.training
    model.eval()
    started = time.perf_counter()
    try:
        for batch in tqdm(blocks.split(batch_size), desc="calibrate", disable=not progress, unit="batch"):
            batch_inputs.clear()
            model(batch.to(device))
        batch_inputs.clear()
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    stats = CalibrationStats(
        owner,
        inputs={key: InputStats(sums[key].cpu(), counts[key]) for key in counts},
        tokens={
            name: TokenStats(
                sums[name] if token_counts is None else token_counts.double(),
                head_sums[name].cpu() if name in head_sums else None,
            )
            for name in embeddings
        },
        digests={name: weight_digest(model.get_submodule(name)) for name in [*linear, *embeddings]},
        model_type=getattr(getattr(model, "config", None), "model_type", None),
        seconds=time.perf_counter() - started,
    )
    missing = [name for name in [*linear, *embeddings] if name not in owner]
    if missing:
        raise ValueError(
            f"the calibration text never reached {missing[:3]}: they are not used in forward (leave them out; "
            "a budget chooses only among what the text reaches)"
        )
    if fisher and linear:
        started = time.perf_counter()
        stats.outputs = fisher_moments(model, linear, blocks, batch_size, progress)
        stats.seconds += time.perf_counter() - started
    check_finite(stats)
    return stats


def fisher_moments(
    model: nn.Module, names: list[str], blocks: torch.Tensor, batch_size: int = 4, progress: bool = True, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Σ g gᵀ (float64, out x out) for each linear layer in ``names``: g the gradient of the mean
    next-token loss over ``blocks`` w.r.t. the layer's output at each token, the next tokens drawn from
    the model's own predictions (``seed``). Drawn, not read from the text: then G is the Fisher of the
    model's predictive distribution, and ½ tr(Δᵀ C Δ G) estimates the KL a layer's error Δ causes
    (``linalg.fisher_loss``); the text's labels give the empirical Fisher, which measures something else.
    Weights get no gradients; activations are not kept beyond each batch's backward pass."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    sums: dict[str, torch.Tensor] = {}

    def output_hook(name: str):
        def hook(module, args, output):
            def accumulate(grad: torch.Tensor) -> None:
                flat = grad.detach().reshape(-1, grad.shape[-1]).double()
                sums[name] = sums.get(name, 0) + flat.T @ flat

            if output.requires_grad:
                output.register_hook(accumulate)

        return hook

    handles = [model.get_submodule(name).register_forward_hook(output_hook(name)) for name in names]
    try:
        with _gradients_from_embeddings(model):
            for batch in tqdm(blocks.split(batch_size), desc="Fisher", disable=not progress, unit="batch"):
                log_probs = model(batch.to(device)).logits.float().log_softmax(-1)
                flat = log_probs.reshape(-1, log_probs.shape[-1])
                drawn = torch.multinomial(flat.detach().exp(), 1, generator=generator)
                (-flat.gather(1, drawn).sum() / blocks.numel()).backward()
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name in names if name not in sums]
    if missing:
        raise ValueError(f"no gradient reached {missing[:3]}: they do not affect the model's predictions")
    return {name: sums[name].cpu() for name in names}


def calibrate(
    model: nn.Module,
    plan,
    blocks: torch.Tensor,
    batch_size: int = 4,
    progress: bool = True,
    token_counts: torch.Tensor | None = None,
    fisher: bool = False,
    spill: bool = True,
) -> CalibrationStats:
    """Statistics of every module ``plan`` (a ``CompressionPlan``) targets, from one pass over ``blocks``
    (``token_counts``, ``fisher``, ``spill``: as in ``collect``)."""
    from .surgery import resolve  # surgery only needs these statistics by duck type

    names = [name for _, name in resolve(model, plan)]
    return collect(model, names, blocks, batch_size, progress, token_counts, fisher, spill)
