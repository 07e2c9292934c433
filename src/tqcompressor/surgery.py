"""Map a compression plan onto any model: ``compress_(model, plan)`` replaces modules in place.

Nothing here knows a method by name: each rule's method plans (shapes only, on the meta device, so a
bad plan fails before any module changes) and fits through the registry.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm.auto import tqdm

from .experts import is_fused_experts
from .methods import is_embedding
from .methods.targets import embedding_scale
from .params import count_parameters, freed_parameters, tied_parameters
from .plan import CompressionPlan, Rule
from .report import CompressionReport, LayerReport
from .statistics import on_device
from .tied_head import TiedEmbeddingHead

if TYPE_CHECKING:
    from .calibration import CalibrationStats


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _plan_modules(model: nn.Module, plan: CompressionPlan) -> tuple[list[tuple[Rule, str]], dict[str, nn.Module]]:
    """(every (rule, module name) in order, the empty module each name will end as)."""
    modules = dict(model.named_modules())
    planned: dict[str, nn.Module] = {}
    steps = []
    matches = [[name for name in modules if name and rule.matches(name)] for rule in plan.rules]
    unmatched = [f"'{rule.pattern}'" for rule, names in zip(plan.rules, matches, strict=True) if not names]
    if unmatched:
        sample = ", ".join(name for name in list(modules)[1:8])
        experts = next((name for name, module in modules.items() if is_fused_experts(module)), None)
        hint = f"; its MoE experts become linear layers ({experts}.down_proj.0, ...) by unfuse_experts(model)"
        raise ValueError(
            f"plan rules that match no module of this {type(model).__name__}: {', '.join(unmatched)} "
            f"(its module names look like: {sample}, ...{hint if experts else ''})"
        )
    for rule, names in zip(plan.rules, matches, strict=True):
        for name in names:
            try:
                with torch.device("meta"):
                    planned[name] = rule.method.plan(planned.get(name, modules[name]), rule.config)
                if is_embedding(planned[name]):
                    embedding_scale(modules[name])  # refuses an embedding that is more than a table
            except (ValueError, TypeError) as err:
                raise ValueError(f"plan rule '{rule.pattern}' on {name}: {err}") from err
            steps.append((rule, name))
    for inner in planned:
        parts = inner.split(".")
        outer = next((".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) in planned), None)
        if outer is not None:
            raise ValueError(f"plan rules target both {outer} and {inner} inside it: give a module one rule's method")
    return steps, planned


def resolve(model: nn.Module, plan: CompressionPlan) -> list[tuple[Rule, str]]:
    """Every (rule, module name) the plan touches, in order; raises before anything is modified."""
    return _plan_modules(model, plan)[0]


def planned_parameters(model: nn.Module, plan: CompressionPlan) -> int:
    """Parameter count ``compress_(model, plan)`` will produce, from shapes alone (works on meta models).
    A weight that a replaced module shares with one the plan leaves stays dense (Zamba2's block called from
    several layers; a head tied to a replaced embedding, unless the plan ties it to the compressed one)."""
    _, planned = _plan_modules(model, plan)
    total = count_parameters(model) - freed_parameters(model, list(planned))
    total += sum(count_parameters(module) for module in planned.values())
    head = _output_head(model)
    weight = _dense_head_weight(head[1]) if head is not None and head[0] not in planned else None
    if plan.tie_head and weight is not None:
        replaced = [model.get_submodule(name) for name in planned]
        if any(isinstance(m, nn.Embedding) and m.weight is weight for m in replaced):
            total -= weight.numel()  # the head will read the compressed embedding
    return total


def _output_head(model: nn.Module) -> tuple[str, nn.Module] | None:
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if getter is not None else None
    if head is None:
        return None
    name = next(name for name, module in model.named_modules() if module is head)
    return name, head


def shared_weights_note(model: nn.Module, names: list[str]) -> str | None:
    """Why replacing ``names`` may add parameters: a weight they share with modules left as they are (Zamba2's
    block called from several layers) stays dense for those. A head tied to a replaced embedding is the
    head's rewiring's to describe."""
    prefixes = tuple(f"{name}." for name in names)
    found = _output_head(model)
    head = f"{found[0]}." if found is not None else None
    pairs = []
    for group in tied_parameters(model):
        inside = [name for name in group if name.startswith(prefixes)]
        outside = [name for name in group if not name.startswith(prefixes) and not (head and name.startswith(head))]
        if inside and outside:
            pairs.append(f"{inside[0]} with {outside[0]}")
    if not pairs:
        return None
    more = f" and {len(pairs) - 1} more" if len(pairs) > 1 else ""
    return (
        "weights shared with modules the plan leaves stay dense there, so replacing them adds parameters "
        f"instead of freeing them (name every use to replace each): {pairs[0]}{more}"
    )


def _dense_head_weight(head: nn.Module) -> nn.Parameter | None:
    """The weight Parameter a dense head holds, the only kind an embedding can share; None for a head that
    computes its weight from factors (tied to a compressed embedding, or compressed itself), which reading
    ``head.weight`` would compute in full."""
    return dict(head.named_parameters(recurse=False)).get("weight")


def _describe_head(model: nn.Module, head: nn.Module) -> str:
    if isinstance(head, TiedEmbeddingHead):
        name = next(name for name, module in model.named_modules() if module is head.embedding)
        return f"tied to the compressed {name}"
    tied = getattr(head, "weight", None) is not None and any(
        getattr(m, "weight", None) is head.weight for m in model.modules() if isinstance(m, nn.Embedding)
    )
    return "tied to the input embedding" if tied else "separate dense head"


def _rewire_head(model: nn.Module, embedding_name: str, old: nn.Module, new: nn.Module, tie: bool) -> str | None:
    """Keep the LM head consistent with a replaced token embedding; returns what the head now is."""
    found = _output_head(model)
    if found is None or not is_embedding(new):
        return None
    head_name, head = found
    if isinstance(head, TiedEmbeddingHead) and head.embedding is old:
        set_submodule(model, head_name, TiedEmbeddingHead(new, head.bias))
        return f"tied to the compressed {embedding_name}"
    weight = _dense_head_weight(head)
    if weight is None or not isinstance(old, nn.Embedding) or weight.data_ptr() != old.weight.data_ptr():
        return None  # the head was never tied to this embedding: leave it alone
    if tie:
        set_submodule(model, head_name, TiedEmbeddingHead(new, getattr(head, "bias", None)))
        set_untied_config(model)
        return f"tied to the compressed {embedding_name}"
    dense = nn.Linear(head.in_features, head.out_features, bias=getattr(head, "bias", None) is not None)
    dense.weight = nn.Parameter(weight.detach().clone())
    if dense.bias is not None:
        dense.bias = nn.Parameter(head.bias.detach().clone())
    set_submodule(model, head_name, dense.to(weight.device))
    set_untied_config(model)
    return "separate dense head (untied, counted in full)"


def _refuse_hub_saving(*args, **kwargs):
    raise ValueError(
        "this model holds compressed modules that save_pretrained / push_to_hub cannot write: use "
        "tqcompressor.save(model, directory), or tqcompressor.materialize(model) first for a dense model"
    )


def guard_hub_saving(model: nn.Module, guard: bool = True) -> None:
    """Make ``save_pretrained``/``push_to_hub`` refuse (never a silent dense or broken save), or restore them."""
    for name in ("save_pretrained", "push_to_hub"):
        if guard:
            setattr(model, name, _refuse_hub_saving)
        elif name in vars(model):
            delattr(model, name)


def set_untied_config(model: nn.Module) -> None:
    # Hugging Face re-ties lm_head.weight to the input embedding's .weight when this flag is set;
    # after compression the tie is carried by TiedEmbeddingHead (or deliberately dropped).
    config = getattr(model, "config", None)
    if config is not None:
        config.tie_word_embeddings = False
        if hasattr(config, "get_text_config"):
            config.get_text_config().tie_word_embeddings = False


def _fit(rule: Rule, name: str, module: nn.Module, stats) -> tuple[nn.Module, LayerReport]:
    started = time.perf_counter()
    with torch.no_grad():
        layer, fit = rule.method.fit(module, rule.config, stats)
    report = LayerReport(
        name=name,
        kind=type(layer).__name__,
        weight_shape=fit.shape,
        factors=fit.factors,
        params_before=count_parameters(module),
        params_after=count_parameters(layer),
        error_plain=fit.error if fit.error_plain is None else fit.error_plain,
        error=fit.error,
        seconds=time.perf_counter() - started,
        best_start=fit.best_start,
        method=rule.method.name,
        objective=fit.objective,
        details=fit.details,
    )
    return layer, report


def compress_(
    model: nn.Module,
    plan: CompressionPlan | str | Path | None = None,
    *,
    calibration: CalibrationStats | None = None,
    target_params: int | None = None,
    progress: bool = True,
    **preset_options,
) -> CompressionReport:
    """Replace the modules ``plan`` names with compressed ones, in place, and report per layer.

    ``plan``: a ``CompressionPlan``, a preset name (``preset_options`` such as ``tie_head`` or
    ``time_budget`` go to the preset), or the ``Path`` of a plan file. ``calibration``: statistics
    from ``calibrate(model, plan, blocks)``; every layer is then fitted to its real inputs.
    ``target_params`` instead of a plan: the allocation chooses the method and size of every module
    ``calibration`` describes (``collect(model, compressible_modules(model), blocks)``: the linear layers
    but the head, and the token embedding), by the estimated errors alone, or, with the Fisher collected
    (``fisher=True``) for the linear layers alone, by their estimated KL; for the sensitivity-weighted
    choice the CLI makes, pass ``allocation_plan(model, stats, N, sensitivity_blocks=blocks[:2]).plan``."""
    if target_params is not None:
        if plan is not None or preset_options:
            raise ValueError("target_params chooses the plan: give a plan (or preset) or a budget, not both")
        if calibration is None:
            raise ValueError("target_params needs calibration statistics of the modules to choose for (--calibration)")
        from .allocation import allocation_plan

        plan = allocation_plan(model, calibration, target_params).plan
    elif plan is None:
        raise ValueError("give a plan, a preset name, or target_params")
    if isinstance(plan, str):
        from .presets import preset  # presets plan with this module's resolve

        plan = preset(plan, model.config, **preset_options)
    elif preset_options:
        raise ValueError(f"{', '.join(sorted(preset_options))}: options for presets; a plan sets them in its rules")
    elif isinstance(plan, Path):
        plan = CompressionPlan.load(plan)
    steps = resolve(model, plan)
    if calibration is None:
        for rule, _ in steps:
            if rule.config.calibration_fields():
                raise ValueError(
                    f"plan rule '{rule.pattern}': field {rule.config.calibration_fields()[0]!r} needs calibration "
                    "statistics (--calibration)"
                )
    else:
        calibration.check(model, list(dict.fromkeys(name for _, name in steps)))
    before = count_parameters(model)
    note = shared_weights_note(model, [name for _, name in steps])
    reports, head = [], "unchanged"
    for rule, name in tqdm(steps, desc=f"compress ({plan.name})", disable=not progress, unit="layer"):
        module = model.get_submodule(name)
        device = next(module.parameters()).device
        stats = None if calibration is None else on_device(calibration.for_module(name), device)
        layer, report = _fit(rule, name, module, stats)
        if is_embedding(layer):
            layer.embed_scale = embedding_scale(module)
        set_submodule(model, name, layer)
        head = _rewire_head(model, name, module, layer, plan.tie_head) or head
        reports.append(report)
    found = _output_head(model)
    if head == "unchanged" and found is not None:
        head = _describe_head(model, found[1])
    report = CompressionReport(plan.name, reports, before, count_parameters(model), head)
    report.notes += [note] if note else []
    guard_hub_saving(model)
    history = getattr(model, "tqcompressor_history", [])
    model.tqcompressor_history = [*history, {"plan": plan.to_dict(), "report": report.to_dict()}]
    return report
