"""Calibration: run the original model once over real text and keep, for every module a plan targets,
what its inputs look like (``statistics``): Σ x xᵀ in float64 for linear layers, token counts for
embeddings. Activations are never stored; modules that receive the very same input tensor (GPT-2's
q/k/v inside ``c_attn`` are one module; LLaMA's ``q/k/v_proj`` and ``gate/up_proj`` are not) share one
accumulator. Statistics save to safetensors + JSON metadata and are checked against the model on load.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from .methods import is_embedding
from .methods.targets import LINEAR_TYPES, dense_weight
from .params import count_parameters
from .statistics import InputStats, TokenStats

FORMAT = "tqcompressor-calibration-1"


def _weight_digest(module: nn.Module) -> list[float]:
    """Sum and norm of a module's weight: tells statistics of another model (or of compressed weights)."""
    weight = module.weight.detach().double()
    return [float(weight.sum()), float(weight.norm())]


@dataclass
class CalibrationStats:
    """``owner[module]`` names the accumulator a module reads; ``inputs``/``tokens`` hold them."""

    owner: dict[str, str]
    inputs: dict[str, InputStats] = field(default_factory=dict)
    tokens: dict[str, TokenStats] = field(default_factory=dict)
    digests: dict[str, list[float]] = field(default_factory=dict)
    model_type: str | None = None
    seconds: float = 0.0

    def for_module(self, name: str) -> InputStats | TokenStats | None:
        key = self.owner.get(name)
        if key is None:
            return None
        return self.inputs.get(key) or self.tokens.get(key)

    def summary(self) -> dict:
        widths = [s.second_moment.shape[0] for s in self.inputs.values()]
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
        meta = {
            "owner": self.owner,
            "input_tokens": {key: s.tokens for key, s in self.inputs.items()},
            "embeddings": list(self.tokens),
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
                tokens = {key: TokenStats(handle.get_tensor(f"{key}.counts")) for key in meta["embeddings"]}
        except ValueError:
            raise
        except Exception as err:  # safetensors raises its own types for truncated or garbled files
            raise ValueError(f"cannot read calibration statistics {path}: {err}") from err
        return cls(meta["owner"], inputs, tokens, meta["digests"], meta["model_type"], meta["seconds"])

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
                width = dense_weight(module)[0].shape[0]
                if stats.second_moment.shape != (width, width):
                    raise ValueError(
                        f"calibration statistics for {name} are {tuple(stats.second_moment.shape)}, "
                        f"its input is {width} wide: they come from another model"
                    )
            elif stats.counts.shape[0] != module.num_embeddings:
                raise ValueError(
                    f"calibration token counts for {name} cover {stats.counts.shape[0]} tokens, "
                    f"not {module.num_embeddings}: another vocabulary"
                )
            digest = self.digests.get(name)
            if digest is not None and not torch.allclose(
                torch.tensor(digest), torch.tensor(_weight_digest(module)), rtol=1e-6
            ):
                raise ValueError(
                    f"calibration statistics for {name} come from other weights (another model or checkpoint)"
                )


def calibration_targets(model: nn.Module, names: list[str]) -> tuple[list[str], list[str]]:
    """(linear layers, embeddings) among ``names``, each calibrated on the original module."""
    linear, embeddings = [], []
    for name in dict.fromkeys(names):
        module = model.get_submodule(name)
        if isinstance(module, LINEAR_TYPES):
            linear.append(name)
        elif isinstance(module, nn.Embedding):
            embeddings.append(name)
        elif is_embedding(module):
            raise ValueError(f"{name} is already compressed: calibrate the original model, not a compressed one")
    return linear, embeddings


@torch.no_grad()
def collect(
    model: nn.Module, names: list[str], blocks: torch.Tensor, batch_size: int = 4, progress: bool = True
) -> CalibrationStats:
    """Run ``model`` over ``blocks`` (sequences x tokens) and accumulate the statistics of ``names``."""
    device = next(model.parameters()).device
    batches = tqdm(blocks.split(batch_size), desc="calibrate", disable=not progress, unit="batch")
    return _accumulate(model, names, blocks.numel(), (lambda b=b: model(b.to(device)) for b in batches))


def _accumulate(model: nn.Module, names: list[str], tokens: int, steps) -> CalibrationStats:
    """Statistics of ``names`` while each of ``steps`` (callables, one per batch) runs part of ``model``."""
    linear, embeddings = calibration_targets(model, names)
    widths = {name: dense_weight(model.get_submodule(name))[0].shape[0] for name in linear}
    if widths and tokens < max(widths.values()):
        widest = max(widths, key=widths.get)
        raise ValueError(
            f"{tokens} calibration tokens cannot estimate the {widths[widest]}-wide input second moment of "
            f"{widest}: give at least {widths[widest]} (preferably 100x more)"
        )
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

    handles = [model.get_submodule(n).register_forward_pre_hook(linear_hook(n)) for n in linear]
    handles += [
        model.get_submodule(n).register_forward_pre_hook(embedding_hook(n, model.get_submodule(n).num_embeddings))
        for n in embeddings
    ]
    was_training = model.training
    model.eval()
    started = time.perf_counter()
    try:
        for step in steps:
            batch_inputs.clear()
            step()
        batch_inputs.clear()
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    stats = CalibrationStats(
        owner,
        inputs={key: InputStats(sums[key].cpu(), counts[key]) for key in counts},
        tokens={name: TokenStats(sums[name]) for name in embeddings},
        digests={name: _weight_digest(model.get_submodule(name)) for name in [*linear, *embeddings]},
        model_type=getattr(getattr(model, "config", None), "model_type", None),
        seconds=time.perf_counter() - started,
    )
    for key, accumulator in stats.inputs.items():
        if not torch.isfinite(accumulator.second_moment).all():
            raise ValueError(f"the inputs of {key} hold NaN or infinite values on the calibration text")
    missing = [name for name in [*linear, *embeddings] if name not in owner]
    if missing:
        raise ValueError(f"the calibration text never reached {missing[:3]}: they are not used in forward")
    return stats


def calibrate(
    model: nn.Module, plan, blocks: torch.Tensor, batch_size: int = 4, progress: bool = True
) -> CalibrationStats:
    """Statistics of every module ``plan`` (a ``CompressionPlan``) targets, from one pass over ``blocks``."""
    from .surgery import resolve  # surgery only needs these statistics by duck type

    return collect(model, [name for _, name in resolve(model, plan)], blocks, batch_size, progress)


def _forward_order(model: nn.Module, names: list[str], sample: torch.Tensor) -> list[str]:
    """``names`` in the order one forward pass first calls them."""
    order: list[str] = []
    handles = [
        model.get_submodule(name).register_forward_pre_hook(lambda m, a, name=name: order.append(name))
        for name in names
    ]
    try:
        with torch.no_grad():
            model(sample.to(next(model.parameters()).device))
    finally:
        for handle in handles:
            handle.remove()
    return list(dict.fromkeys(order))


def _block(name: str) -> str:
    """The repeated block a module belongs to (``model.layers.3.mlp.up_proj`` -> ``model.layers.3``)."""
    parts = name.split(".")
    index = next((i for i, part in enumerate(parts) if part.isdigit()), None)
    return name if index is None else ".".join(parts[: index + 1])


def compress_sequentially(model: nn.Module, plan, blocks: torch.Tensor, batch_size: int = 4, progress: bool = True):
    """Calibrate and compress one block at a time, in forward order: each block's statistics come from
    the model whose earlier blocks are already compressed (as SVD-LLM and GPTQ do), and only one block's
    accumulators are held at once. Where the blocks form a chain (each one's output is the next one's
    input), their inputs are kept and each block runs once over them, instead of the whole model once per
    block. Returns one report for the whole plan."""
    from .plan import CompressionPlan, Rule
    from .report import CompressionReport
    from .surgery import compress_, resolve

    steps = resolve(model, plan)  # the whole plan is checked before anything changes
    names = list(dict.fromkeys(name for _, name in steps))
    calibration_targets(model, names)
    order = _forward_order(model, names, blocks[:1])
    unreached = [name for name in names if name not in order]
    if unreached:
        raise ValueError(f"the calibration text never reached {unreached[:3]}: they are not used in forward")
    groups: dict[str, list[str]] = {}
    for name in order:
        groups.setdefault(_block(name), []).append(name)
    history = list(getattr(model, "tqcompressor_history", []))
    before, layers, head, seconds = None, [], "", 0.0
    replay: _StackReplay | None = None
    unchained: set[str] = set()
    replayed = 0
    for group, members in tqdm(groups.items(), desc="calibrate + compress", disable=not progress, unit="block"):
        stack, index = _stack_position(model, group)
        if stack is not None and stack not in unchained and (replay is None or replay.name != stack):
            started = time.perf_counter()
            replay = _StackReplay.capture(model, stack, index, blocks, batch_size)
            seconds += time.perf_counter() - started
            if replay is None:
                unchained.add(stack)
        if replay is not None and replay.name == stack:
            replay.advance_to(index)
            stats = _accumulate(model, members, blocks.numel(), replay.steps())
            replayed += 1
        else:
            stats = collect(model, members, blocks, batch_size, progress=False)
            replay = None  # compressing a module outside the stack may change what the stack receives
        seconds += stats.seconds
        rules = [Rule(re.escape(name), rule.config) for rule, name in steps if name in members]
        part = CompressionPlan(rules, name=plan.name, tie_head=plan.tie_head)
        report = compress_(model, part, calibration=stats, progress=False)
        before = report.params_before if before is None else before
        layers += report.layers
        head = report.head  # each part describes the head as the parts so far leave it
    final = CompressionReport(plan.name, layers, before, count_parameters(model), head)
    final.notes.append(
        f"calibrated sequentially, {len(groups)} groups ({replayed} on kept block inputs), "
        f"{seconds:.1f} s of calibration"
    )
    model.tqcompressor_history = [*history, {"plan": plan.to_dict(), "report": final.to_dict()}]
    return final


def _stack_position(model: nn.Module, group: str) -> tuple[str | None, int]:
    """(``model.layers``, 3) for the group ``model.layers.3`` when it is an entry of a module list."""
    parent, _, index = group.rpartition(".")
    if not index.isdigit() or not isinstance(model.get_submodule(parent), nn.ModuleList | nn.Sequential):
        return None, -1
    return parent, int(index)


def _is_same(a, b) -> bool:
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return False
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_is_same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


class _StackReplay:
    """The inputs one stack of repeated blocks (``model.layers``) receives, per calibration batch, kept on
    the model's device so each block can run alone over them. Only built where running the blocks alone
    is what the model does: every block takes the previous block's output as its hidden state and the
    same other arguments, and none carries state between calls (a KV cache)."""

    def __init__(self, name: str, stack: nn.Module, position: int, batches: list[tuple[tuple, dict]]):
        self.name, self.stack, self.position, self.batches = name, stack, position, batches

    @classmethod
    @torch.no_grad()
    def capture(
        cls, model: nn.Module, name: str, start: int, blocks: torch.Tensor, batch_size: int
    ) -> _StackReplay | None:
        """Run the whole model once, keep what ``stack[start]`` receives, and check the chain; ``None``
        where the blocks do not form one."""
        from transformers.cache_utils import Cache

        stack = model.get_submodule(name)
        kept: list[tuple[tuple, dict]] = []
        state = {"chained": True, "expected": start, "output": None, "others": None}

        def before(index: int):
            def hook(module, args, kwargs):
                hidden, others = _split_hidden(args, kwargs)
                values = [*others[0], *others[1].values()]
                flat = [v for value in values for v in (value if isinstance(value, tuple) else (value,))]
                if index == start:
                    kept.append((args, kwargs))
                    state["others"] = others
                elif (
                    index != state["expected"]
                    or hidden is not state["output"]
                    or not _is_same(others[0], state["others"][0])
                    or others[1].keys() != state["others"][1].keys()
                    or not all(_is_same(v, state["others"][1][k]) for k, v in others[1].items())
                ):
                    state["chained"] = False
                if hidden is None or any(isinstance(v, Cache) for v in flat):
                    state["chained"] = False
                state["expected"] = index + 1

            return hook

        def after(module, args, output):
            state["output"] = output[0] if isinstance(output, tuple) else output

        handles = []
        for index in range(start, len(stack)):
            handles.append(stack[index].register_forward_pre_hook(before(index), with_kwargs=True))
            handles.append(stack[index].register_forward_hook(after))
        use_cache = {"use_cache": False} if hasattr(getattr(model, "config", None), "use_cache") else {}
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        try:
            for batch in blocks.split(batch_size):
                state["expected"] = start
                model(batch.to(device), **use_cache)
        finally:
            for handle in handles:
                handle.remove()
            model.train(was_training)
        if not state["chained"] or len(kept) != len(blocks.split(batch_size)):
            return None
        return cls(name, stack, start, kept)

    def steps(self):
        """One callable per batch that runs the current block over its kept inputs."""
        block = self.stack[self.position]
        return (lambda args=args, kwargs=kwargs: block(*args, **kwargs) for args, kwargs in self.batches)

    @torch.no_grad()
    def advance_to(self, index: int) -> None:
        """Run blocks (as they are now, compressed or not) until the kept inputs are ``stack[index]``'s."""
        if index < self.position:
            raise RuntimeError(f"{self.name}.{index} comes before the kept inputs of block {self.position}")
        while self.position < index:
            block = self.stack[self.position]
            was_training = block.training
            block.eval()
            try:
                for i, (args, kwargs) in enumerate(self.batches):
                    output = block(*args, **kwargs)
                    self.batches[i] = _with_hidden(args, kwargs, output[0] if isinstance(output, tuple) else output)
            finally:
                block.train(was_training)
            self.position += 1


def _split_hidden(args: tuple, kwargs: dict) -> tuple[torch.Tensor | None, tuple[tuple, dict]]:
    """A block's hidden state (its first argument) and everything else it receives."""
    if args:
        return args[0], (args[1:], kwargs)
    rest = {key: value for key, value in kwargs.items() if key != "hidden_states"}
    return kwargs.get("hidden_states"), ((), rest)


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return (), {**kwargs, "hidden_states": hidden}
