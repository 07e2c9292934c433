"""Map a compression plan onto any model: ``compress(model, plan)`` replaces modules in place."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from .kronecker import nearest_kronecker
from .layers import (
    KroneckerEmbedding,
    KroneckerLinear,
    LowRankEmbedding,
    LowRankLinear,
    TiedEmbeddingHead,
    dense_weight,
)
from .lowrank import truncated_svd
from .params import count_parameters
from .permutation_search import search_permutations
from .plan import CompressionPlan, Rule
from .shapes import KroneckerShape, propose_kronecker_shape, svd_rank_for_params

LINEAR_TYPES = (nn.Linear, Conv1D)
EMBEDDING_TYPES = (nn.Embedding, KroneckerEmbedding)


@dataclass
class LayerReport:
    name: str
    kind: str
    weight_shape: list[int]
    factors: str
    params_before: int
    params_after: int
    error_plain: float  # relative Frobenius error without permutations
    error: float  # relative Frobenius error of what was installed
    seconds: float
    best_start: str = ""


@dataclass
class CompressionReport:
    plan: str
    layers: list[LayerReport]
    params_before: int
    params_after: int
    head: str
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> CompressionReport:
        return cls(**{**data, "layers": [LayerReport(**layer) for layer in data["layers"]]})

    def table(self) -> str:
        lines = [
            f"plan: {self.plan}",
            f"{'module':42} {'kind':20} {'shape':>12} {'factors':24} {'before':>10} {'after':>10} "
            f"{'err plain':>9} {'err':>7} {'s':>6}",
        ]
        for r in self.layers:
            shape = "x".join(map(str, r.weight_shape))
            lines.append(
                f"{r.name:42} {r.kind:20} {shape:>12} {r.factors:24} {r.params_before:>10,} {r.params_after:>10,} "
                f"{r.error_plain:>9.4f} {r.error:>7.4f} {r.seconds:>6.1f}"
            )
        lines.append(
            f"parameters: {self.params_before:,} -> {self.params_after:,} "
            f"({self.params_after / max(self.params_before, 1):.1%}); LM head: {self.head}"
        )
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _embedding_width(module: nn.Module) -> int:
    return module.base.shape[1] if isinstance(module, KroneckerEmbedding) else module.embedding_dim


def resolve(model: nn.Module, plan: CompressionPlan) -> list[tuple[Rule, str]]:
    """Every (rule, module name) the plan touches, in order; raises before anything is modified."""
    modules = dict(model.named_modules())
    widths: dict[str, int] = {}  # embedding widths as earlier rules will leave them
    steps = []
    for rule in plan.rules:
        names = [name for name in modules if name and rule.matches(name)]
        if not names:
            sample = ", ".join(name for name in list(modules)[1:8])
            raise ValueError(f"plan rule {rule.pattern!r} matches no module (module names look like: {sample}, ...)")
        for name in names:
            module = modules[name]
            if rule.embedding_factor is not None:
                if not isinstance(module, EMBEDDING_TYPES):
                    raise ValueError(f"{name}: embedding_factor needs an embedding, got {type(module).__name__}")
                width = widths.get(name, _embedding_width(module))
                if width % rule.embedding_factor:
                    raise ValueError(f"{name}: width {width} is not divisible by {rule.embedding_factor}")
                widths[name] = width // rule.embedding_factor
            elif not (isinstance(module, LINEAR_TYPES) or (isinstance(module, nn.Embedding) and rule.method == "svd")):
                raise ValueError(
                    f"{name}: a {type(module).__name__} cannot be compressed by this rule "
                    "(supported: nn.Linear, Conv1D, nn.Embedding; embeddings need embedding_factor or method svd)"
                )
            elif rule.method == "svd":
                if rule.rank is None and rule.ratio is None:
                    raise ValueError(f"{name}: an svd rule needs rank or ratio")
            else:
                weight, _, _ = dense_weight(module)
                _linear_shape(rule, name, *weight.shape)  # raises if the shapes do not fit
            steps.append((rule, name))
    return steps


def _linear_shape(rule: Rule, name: str, rows: int, cols: int) -> KroneckerShape:
    if rule.shape is not None:
        shape = KroneckerShape(*rule.shape, rank=rule.rank or 1)
        try:
            shape.check_matrix(rows, cols)
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from err
        return shape
    if rule.ratio is None:
        raise ValueError(f"{name}: a kronecker rule needs shape or ratio")
    return propose_kronecker_shape(rows, cols, rule.ratio, max_rank=rule.rank or 4)


def _search(weight: torch.Tensor, shape: KroneckerShape, rule: Rule, rows: bool, cols: bool):
    return search_permutations(
        weight,
        shape,
        rows=rows,
        cols=cols,
        iterations=rule.iterations,
        restarts=rule.restarts,
        seed=rule.seed,
        time_budget=rule.time_budget,
    )


def _compress_linear(module: nn.Module, rule: Rule, name: str) -> tuple[nn.Module, LayerReport]:
    weight, bias, layout = dense_weight(module)
    rows, cols = weight.shape
    t0 = time.perf_counter()
    if rule.method == "svd":
        rank = rule.rank or svd_rank_for_params(rows, cols, round(rule.ratio * rows * cols))
        factors = truncated_svd(weight, rank)
        layer = LowRankLinear(factors, bias, layout)
        error = plain = factors.relative_error(weight)
        desc, start = f"rank {rank}", ""
    else:
        shape = _linear_shape(rule, name, rows, cols)
        result = _search(weight, shape, rule, rule.search_rows, rule.search_cols)
        layer = KroneckerLinear(result.factors, bias, layout)
        error, plain = result.relative_error, result.plain_relative_error
        desc, start = shape.describe(), result.best_trial.start
    report = LayerReport(
        name,
        type(layer).__name__,
        [rows, cols],
        desc,
        count_parameters(module),
        count_parameters(layer),
        plain,
        error,
        time.perf_counter() - t0,
        start,
    )
    return layer, report


def _relative_error(embedding: nn.Module, dense: torch.Tensor) -> float:
    reference = dense.double()
    return float(torch.linalg.norm(embedding.weight.detach().double() - reference) / torch.linalg.norm(reference))


def _compress_embedding(module: nn.Module, rule: Rule, name: str) -> tuple[nn.Module, LayerReport]:
    dense = module.weight.detach()
    t0 = time.perf_counter()
    if rule.embedding_factor is None:  # svd
        vocab, width = dense.shape
        rank = rule.rank or svd_rank_for_params(vocab, width, round(rule.ratio * vocab * width))
        layer = LowRankEmbedding(truncated_svd(dense, rank))
        desc, start = f"rank {rank}", ""
        plain = None
    else:
        inner = module if isinstance(module, KroneckerEmbedding) else None
        target = module.base.detach() if inner is not None else dense
        vocab, width = target.shape
        k = rule.embedding_factor
        shape = KroneckerShape(vocab, width // k, 1, k, 1)
        result = _search(target, shape, rule, False, rule.permute in (True, "cols"))
        layer = KroneckerEmbedding.from_factors(result.factors, inner_of=inner)
        desc, start = f"{vocab}x{width // k} ⊗ 1x{k}", result.best_trial.start
        # Both errors against the embedding being replaced, so a second ÷k is reported like the first.
        plain = _relative_error(
            KroneckerEmbedding.from_factors(nearest_kronecker(target, shape), inner_of=inner), dense
        )
    error = _relative_error(layer, dense)
    report = LayerReport(
        name,
        type(layer).__name__,
        list(dense.shape),
        desc,
        count_parameters(module),
        count_parameters(layer),
        error if plain is None else plain,
        error,
        time.perf_counter() - t0,
        start,
    )
    return layer.to(dense.device), report


def _output_head(model: nn.Module) -> tuple[str, nn.Module] | None:
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if getter is not None else None
    if head is None:
        return None
    name = next(name for name, module in model.named_modules() if module is head)
    return name, head


def _rewire_head(model: nn.Module, embedding_name: str, old: nn.Module, new: nn.Module, tie: bool) -> str | None:
    """Keep the LM head consistent with a replaced token embedding; returns what the head now is."""
    found = _output_head(model)
    if found is None:
        return None
    head_name, head = found
    if isinstance(head, TiedEmbeddingHead) and head.embedding is old:
        set_submodule(model, head_name, TiedEmbeddingHead(new, head.bias))
        return f"tied to the compressed {embedding_name}"
    weight = getattr(head, "weight", None)
    if weight is None or not isinstance(old, nn.Embedding) or weight.data_ptr() != old.weight.data_ptr():
        return None  # the head was never tied to this embedding: leave it alone
    if tie:
        set_submodule(model, head_name, TiedEmbeddingHead(new, getattr(head, "bias", None)))
        _set_untied_config(model)
        return f"tied to the compressed {embedding_name}"
    dense = nn.Linear(head.in_features, head.out_features, bias=getattr(head, "bias", None) is not None)
    dense.weight = nn.Parameter(weight.detach().clone())
    if dense.bias is not None:
        dense.bias = nn.Parameter(head.bias.detach().clone())
    set_submodule(model, head_name, dense.to(weight.device))
    _set_untied_config(model)
    return "separate dense head (untied, counted in full)"


def _set_untied_config(model: nn.Module) -> None:
    # Hugging Face re-ties lm_head.weight to the input embedding's .weight when this flag is set;
    # after compression the tie is carried by TiedEmbeddingHead (or deliberately dropped).
    config = getattr(model, "config", None)
    if config is not None:
        config.tie_word_embeddings = False
        if hasattr(config, "get_text_config"):
            config.get_text_config().tie_word_embeddings = False


def compress(model: nn.Module, plan: CompressionPlan, progress: bool = True) -> CompressionReport:
    """Replace the modules ``plan`` names with compressed ones, in place, and report per layer."""
    steps = resolve(model, plan)
    before = count_parameters(model)
    reports, head = [], "unchanged"
    for rule, name in tqdm(steps, desc=f"compress ({plan.name})", disable=not progress, unit="layer"):
        module = model.get_submodule(name)
        with torch.no_grad():
            if isinstance(module, EMBEDDING_TYPES):
                layer, report = _compress_embedding(module, rule, name)
            else:
                layer, report = _compress_linear(module, rule, name)
        set_submodule(model, name, layer)
        rewired = _rewire_head(model, name, module, layer, plan.tie_head)
        head = rewired or head
        reports.append(report)
    found = _output_head(model)
    if head == "unchanged" and found is not None:
        tied = getattr(found[1], "weight", None) is not None and any(
            getattr(m, "weight", None) is found[1].weight for m in model.modules() if isinstance(m, nn.Embedding)
        )
        head = "tied to the input embedding" if tied else "separate dense head"
    report = CompressionReport(plan.name, reports, before, count_parameters(model), head)
    history = getattr(model, "tqcompressor_history", [])
    model.tqcompressor_history = [*history, {"plan": plan.to_dict(), "report": report.to_dict()}]
    return report


def planned_parameters(model: nn.Module, plan: CompressionPlan) -> int:
    """Parameter count ``compress(model, plan)`` will produce, from shapes alone (works on meta models)."""
    total = count_parameters(model)
    current: dict[str, int] = {}
    widths: dict[str, int] = {}
    for rule, name in resolve(model, plan):
        module = model.get_submodule(name)
        before = current.get(name, count_parameters(module))
        if isinstance(module, EMBEDDING_TYPES):
            vocab, width = module.num_embeddings, widths.get(name, _embedding_width(module))
            if rule.embedding_factor is not None:
                k = rule.embedding_factor
                after = before - vocab * width + vocab * (width // k) + k  # outer stages' scales stay
                widths[name] = width // k
            else:
                dim = module.embedding_dim
                after = (rule.rank or svd_rank_for_params(vocab, dim, round(rule.ratio * vocab * dim))) * (vocab + dim)
        else:
            weight, bias, _ = dense_weight(module)
            rows, cols = weight.shape
            if rule.method == "svd":
                rank = rule.rank or svd_rank_for_params(rows, cols, round(rule.ratio * rows * cols))
                after = rank * (rows + cols)
            else:
                after = _linear_shape(rule, name, rows, cols).num_params
            after += 0 if bias is None else bias.numel()
        total += after - before
        current[name] = after
    found = _output_head(model)
    if not plan.tie_head and found is not None and getattr(found[1], "weight", None) is not None:
        compressed = {model.get_submodule(name) for name in current}
        if any(getattr(m, "weight", None) is found[1].weight for m in compressed):
            total += found[1].weight.numel()  # the head is kept as its own dense copy
    return total
