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
import time
from collections.abc import Callable
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

FORMAT = "tqcompressor-calibration-1"


def weight_digest(module: nn.Module) -> list[float]:
    """Sum and norm of a module's weight: tells statistics of another model (or of compressed weights)."""
    weight = module.weight.detach().double()
    return [float(weight.sum()), float(weight.norm())]


@dataclass
class CalibrationStats:
    """``owner[module]`` names the accumulator a module reads; ``inputs``/``tokens`` hold them;
    ``outputs[module]``: Σ g gᵀ of a linear layer's output gradients, where the Fisher was collected."""

    owner: dict[str, str]
    inputs: dict[str, InputStats] = field(default_factory=dict)
    tokens: dict[str, TokenStats] = field(default_factory=dict)
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)
    digests: dict[str, list[float]] = field(default_factory=dict)
    model_type: str | None = None
    seconds: float = 0.0

    def for_module(self, name: str) -> InputStats | TokenStats | None:
        key = self.owner.get(name)
        if key is None:
            return None
        if key in self.inputs and name in self.outputs:
            return replace(self.inputs[key], output_second_moment=self.outputs[name])
        return self.inputs.get(key) or self.tokens.get(key)

    def summary(self) -> dict:
        widths = [s.second_moment.shape[0] for s in self.inputs.values()]
        widths += [len(t.head_second_moment) for t in self.tokens.values() if t.head_second_moment is not None]
        return {
            "modules": len(self.owner),
            "accumulators": len(self.inputs) + len(self.tokens),
            "tokens": max(
                [s.tokens for s in self.inputs.values()] + [int(t.counts.sum()) for t in self.tokens.values()]
            ),
            "float64_bytes": sum(w * w * 8 for w in widths),
            "seconds": round(self.seconds, 2),
        }

    def save(self, path: str | Path) -> Path:
        path = Path(path)
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
        for name in names:
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


def calibration_targets(model: nn.Module, names: list[str]) -> tuple[list[str], list[str]]:
    """(linear layers, embeddings) among ``names``, each calibrated on the original module."""
    check_runs_on_token_ids(model, "calibration", "compress it with a plan and no calibration")
    linear, embeddings = [], []
    for name in dict.fromkeys(names):
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


def statistics_bytes(
    model: nn.Module, linear: list[str], embeddings: list[str], sample: torch.Tensor, fisher: bool
) -> tuple[int, int]:
    """(bytes of the input statistics, bytes of the Fisher's) that ``collect`` will accumulate, float64:
    Σ x xᵀ once per distinct input (one forward pass over ``sample`` tells which layers share one), token
    counts and a tied head's Σ h hᵀ, and with ``fisher`` Σ g gᵀ of every linear layer's output."""
    seen: list[torch.Tensor] = []  # held, so that identity within the pass is reliable

    def record(name: str, args: tuple) -> None:
        if not any(args[0] is x for x in seen):
            seen.append(args[0])

    _each_call(model, linear, sample, record)
    inputs = sum(x.shape[-1] ** 2 for x in seen)
    for name in embeddings:
        inputs += model.get_submodule(name).num_embeddings
    inputs += sum(head.weight.shape[-1] ** 2 for head in tied_heads(model, embeddings).values())
    outputs = sum(dense_weight(model.get_submodule(name))[0].shape[1] ** 2 for name in linear) if fisher else 0
    return 8 * inputs, 8 * outputs


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


def check_memory(
    model: nn.Module, linear: list[str], embeddings: list[str], sample: torch.Tensor, fisher: bool
) -> None:
    """Refuses, before any pass over the text, statistics that would not fit in memory: on a 24 GB machine a
    1.1B-parameter LLaMA's (9.5 GiB of input moments, 17.6 GiB of Fisher) were killed after nine minutes.
    Accumulated on the model's device, so that is where they must fit."""
    device = next(model.parameters()).device
    free = free_memory(device)
    if free is None:
        return
    inputs, outputs = statistics_bytes(model, linear, embeddings, sample, fisher)
    if inputs + outputs <= free:
        return
    gib = 2**30
    parts = f"{inputs / gib:.1f} GiB of input second moments" + (
        f" and {outputs / gib:.1f} GiB of the Fisher's output moments" if fisher else ""
    )
    raise ValueError(
        f"the calibration statistics of {len(linear) + len(embeddings)} modules would take {parts} "
        f"(float64), and {free / gib:.1f} GiB of {device.type} memory is free: "
        + ("collect them without the Fisher (--no-fisher; fisher=False in Python), " if fisher else "")
        + "for fewer modules, or on a machine with more memory"
    )


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


@torch.no_grad()
def collect(
    model: nn.Module,
    names: list[str],
    blocks: torch.Tensor,
    batch_size: int = 4,
    progress: bool = True,
    token_counts: torch.Tensor | None = None,
    fisher: bool = False,
) -> CalibrationStats:
    """Run ``model`` over ``blocks`` (sequences x tokens) and accumulate the statistics of ``names``.
    ``token_counts`` (``data.token_counts``): the embeddings' token counts taken on more of the
    calibration text than ``blocks`` hold, since counting needs no forward pass (house teacher, its
    embedding alone at rank 190: held-out ppl 135.7 weighted by the counts of its 10.4M training
    tokens, 141.6 by those of 32k calibration tokens; dense 132.0). ``fisher``: also the output
    gradients' second moments of the linear layers (``fisher_moments``; a backward pass per batch)."""
    linear, embeddings = calibration_targets(model, names)
    check_token_count(model, linear, blocks.numel())
    check_memory(model, linear, embeddings, blocks[:1, :8], fisher and bool(linear))
    for name in embeddings if token_counts is not None else []:
        vocab = model.get_submodule(name).num_embeddings
        if token_counts.shape != (vocab,):
            raise ValueError(f"token_counts cover {tuple(token_counts.shape)} ids; {name} has {vocab} rows")
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

    def track(module, args, output):
        return output.detach().requires_grad_(True)  # gradients flow from the embeddings onward, not into weights

    handles = [model.get_submodule(name).register_forward_hook(output_hook(name)) for name in names]
    handles.append(model.get_input_embeddings().register_forward_hook(track))
    trainable = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    model.eval()
    try:
        for p in trainable:
            p.requires_grad_(False)
        with torch.enable_grad():
            for batch in tqdm(blocks.split(batch_size), desc="Fisher", disable=not progress, unit="batch"):
                log_probs = model(batch.to(device)).logits.float().log_softmax(-1)
                flat = log_probs.reshape(-1, log_probs.shape[-1])
                drawn = torch.multinomial(flat.detach().exp(), 1, generator=generator)
                (-flat.gather(1, drawn).sum() / blocks.numel()).backward()
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in trainable.items():
            p.requires_grad_(flag)
        model.train(was_training)
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
) -> CalibrationStats:
    """Statistics of every module ``plan`` (a ``CompressionPlan``) targets, from one pass over ``blocks``
    (``token_counts``, ``fisher``: as in ``collect``)."""
    from .surgery import resolve  # surgery only needs these statistics by duck type

    names = [name for _, name in resolve(model, plan)]
    return collect(model, names, blocks, batch_size, progress, token_counts, fisher)
