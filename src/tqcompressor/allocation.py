"""Budget-driven compression: choose, per module, to keep it dense or one of the candidates the
registered methods offer, so that the total estimated loss is smallest within a parameter budget.

Every method prices its own candidates (``CompressionMethod.estimates``) from the statistics without
fitting them in full: low-rank exactly (the tail of the singular values of SᵀW), Kronecker by its
closed-form Kronecker-whitened fit with and without a short column search, which the installed fit
(longer search, ALS refinement) lowers. A candidate's loss is its relative squared output error,
tr(Δᵀ C Δ) / tr(Wᵀ C W). Relative, because absolute errors are in each layer's own units: summed raw,
the layers with the largest outputs (SmolLM2's down_proj) stayed dense while the small-output q/k
projections were cut to the bone, and the model broke. The allocation is a greedy walk down each
layer's lower convex hull of (parameters, loss), always taking the step that frees parameters at the
least loss per parameter.

The token embedding is a candidate too (its rows weighted by calibration token frequency and, with a
head tied to it, priced by that head's logit error as well; the head is counted once). Equal relative
error is not equal harm, though: with ``sensitivity`` blocks, every module is measured, ASVD-style: the
KL divergence of the model's next-token distribution from the original's, on those blocks, with only
that module replaced by its probe candidate (low-rank near half its parameters). A candidate's cost is
then the KL on the line through (0, 0) and that point. The choice made on those costs is measured too
(each module at the candidate chosen for it, alone) and made again on the curves through the points so
far: the line from the probe misjudged SmolLM2's tied embedding, whose KL near full rank is 2.4x what
the line says.

An MLP that a method cuts whole (``neurons``: whole inner units kept or dropped) is one choice standing
for its projections: its candidates are its own and its projections' candidates combined (each stepping
down its hull where that costs least per parameter), so the walk weighs cutting the MLP whole against
cutting its projections. Offered where everything is priced in KL (the Fisher, below): a relative error
on the MLP's output and one on each projection's are not comparable.

With the Fisher in the statistics (``collect(..., fisher=True)``) a linear layer's candidates come
priced in KL already, ½ tr(Δᵀ C Δ G) (``linalg.fisher_loss``), with no measurement: only the modules
whose candidates lack that price (the token embedding) are measured, so ``sensitivity`` blocks are
needed only for them. SmolLM2 at 70% (benchmarks/results/allocation.md): held-out ppl 75.7 chosen and
fitted with the Fisher, against 92.8 with every module measured (fitted without) and 7656 on relative
errors alone; search 364 s against 1164 s.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import nn
from tqdm.auto import tqdm

from .calibration import CalibrationStats
from .experts import PROJECTIONS
from .methods import MethodConfig, get_method, method_names
from .methods.targets import embedding_scale, is_linear
from .params import count_parameters, parameters_outside, shared_parameter_names
from .plan import CompressionPlan, Rule
from .statistics import InputStats, TokenStats


@dataclass
class Candidate:
    module: str
    config: MethodConfig | None  # None: keep the dense weight
    params: int  # the weight's parameters after (a bias is kept as it is)
    loss: float  # estimated relative squared output error on the calibration inputs
    sensitivity: float = 1.0  # measured harm per unit of that error (1 when not measured)
    kl: float | None = None  # the Fisher's estimate of the KL it costs, where the statistics hold one
    # For a module holding others (an MLP): the candidate each of them takes (``config`` None); the loss
    # and KL are their sums.
    parts: dict[str, Candidate] | None = None

    @property
    def cost(self) -> float:
        """What the allocation minimises the sum of."""
        return self.kl if self.kl is not None else self.loss * self.sensitivity

    @property
    def method(self) -> str:
        return "dense" if self.config is None else self.config.method


def check_min_kept(min_kept: float) -> None:
    """Raises unless ``min_kept`` is a share of its parameters that every module can keep."""
    if not 0 <= min_kept < 1:
        raise ValueError(f"the share of its parameters each module keeps must be in [0, 1), got {min_kept}")


def above_floor(found: list[Candidate], min_kept: float) -> list[Candidate]:
    """The candidates keeping at least ``min_kept`` of the parameters of the first (keeping it dense)."""
    return [c for c in found if c.params >= min_kept * found[0].params]


def offered_methods(methods: Sequence[str] | None = None) -> list[str]:
    """``methods`` checked against the registry; None: every registered method."""
    if methods is None:
        return method_names()
    if not methods or set(methods) - set(method_names()):
        raise ValueError(f"offer candidates of registered methods ({', '.join(method_names())}), got {list(methods)}")
    return list(methods)


def candidates(
    name: str, module: nn.Module, stats: InputStats | TokenStats, methods: Sequence[str] | None = None
) -> list[Candidate]:
    """Keeping ``module`` dense, then the estimates of ``methods`` (default: every registered one) for it;
    priced in KL (``Candidate.kl``) where every estimate is."""
    found = []
    for method in offered_methods(methods):
        estimates = get_method(method).estimates(module, stats)
        found += [Candidate(name, e.config, e.params, e.loss, kl=e.kl) for e in estimates]
    priced = bool(found) and all(c.kl is not None for c in found)
    if not priced:
        found = [replace(c, kl=None) for c in found]
    return [Candidate(name, None, module.weight.numel(), 0.0, kl=0.0 if priced else None), *found]


def group_candidates(
    name: str, module: nn.Module, stats: dict, children: dict[str, list[Candidate]], methods: Sequence[str]
) -> list[Candidate]:
    """For a module holding linear layers (an MLP): keeping them all dense, its own candidates (a method
    cutting it whole: ``neurons``), and its ``children``'s candidates combined, each child stepping down
    its hull where that costs least per parameter. Offered only where every candidate is priced in KL;
    empty where no method cuts the module whole."""
    own = [
        Candidate(name, e.config, e.params, e.loss, kl=e.kl)
        for method in methods
        for e in get_method(method).estimates(module, stats)
    ]
    # A child no method shrinks (only its dense candidate) costs nothing where it stays.
    lossy = [c for options in children.values() for c in options if c.config is not None]
    if not own or any(c.kl is None for c in own + lossy):
        return []
    hulls = {child: lower_hull(options) for child, options in children.items()}
    position = dict.fromkeys(hulls, 0)
    combined = []
    for _ in descend(hulls, position):
        parts = {child: hull[position[child]] for child, hull in hulls.items()}
        combined.append(
            Candidate(
                name,
                None,
                sum(c.params for c in parts.values()),
                sum(c.loss for c in parts.values()),
                kl=sum(c.cost for c in parts.values()),
                parts=parts,
            )
        )
    dense = Candidate(name, None, sum(options[0].params for options in children.values()), 0.0, kl=0.0)
    return [dense, *own, *combined]


def lower_hull(options: list[Candidate]) -> list[Candidate]:
    """The candidates on the lower convex hull of (params, loss), from the most parameters down: the only
    ones a marginal-loss greedy (or the Lagrangian optimum) ever picks."""
    pareto: list[Candidate] = []
    for candidate in sorted(options, key=lambda c: (-c.params, c.cost)):
        if pareto and candidate.params == pareto[-1].params:
            continue  # as many parameters, no less loss
        while pareto and pareto[-1].cost >= candidate.cost:
            pareto.pop()  # more parameters for no less loss: dominated
        pareto.append(candidate)
    hull: list[Candidate] = []
    for candidate in pareto:
        while len(hull) >= 2 and _slope(hull[-2], hull[-1]) > _slope(hull[-1], candidate):
            hull.pop()
        hull.append(candidate)
    return hull


def _slope(more: Candidate, fewer: Candidate) -> float:
    """Loss added per parameter freed going from ``more`` to ``fewer`` parameters."""
    return (fewer.cost - more.cost) / max(more.params - fewer.params, 1)


def descend(hulls: dict[str, list[Candidate]], position: dict[str, int]) -> Iterator[str]:
    """Step down the ``hulls`` from ``position`` (per module, its index on its hull; advanced in place),
    each step the one adding the least loss per parameter freed; yields the module that stepped."""
    while True:
        steps = [(n, _slope(h[position[n]], h[position[n] + 1])) for n, h in hulls.items() if position[n] + 1 < len(h)]
        if not steps:
            return
        name, _ = min(steps, key=lambda step: step[1])
        position[name] += 1
        yield name


def allocate(options: dict[str, list[Candidate]], saving: int) -> dict[str, Candidate]:
    """Per module, the candidate that frees at least ``saving`` parameters in total at the least summed
    loss a greedy walk down the hulls finds (each step the cheapest loss per parameter freed)."""
    hulls = {name: lower_hull(found) for name, found in options.items()}
    position = dict.fromkeys(hulls, 0)
    walk = descend(hulls, position)
    freed = 0
    while freed < saving:
        name = next(walk, None)
        if name is None:
            raise ValueError("the budget cannot be reached with these candidates")
        hull = hulls[name]
        freed += hull[position[name] - 1].params - hull[position[name]].params
    # The last steps may have freed more than needed (an embedding's rank steps are large): give back
    # the steps whose parameters the budget can spare, most loss regained per parameter first.
    while True:
        backs = [
            (
                name,
                h[position[name]].cost - h[position[name] - 1].cost,
                h[position[name] - 1].params - h[position[name]].params,
            )
            for name, h in hulls.items()
            if position[name] > 0
        ]
        backs = [(name, gain / added) for name, gain, added in backs if freed - added >= saving and gain > 0]
        if not backs:
            break
        name, _ = max(backs, key=lambda back: back[1])
        hull = hulls[name]
        freed -= hull[position[name] - 1].params - hull[position[name]].params
        position[name] -= 1
    chosen = {name: hull[position[name]] for name, hull in hulls.items()}
    # The hulls leave out candidates a convex walk never takes, some of which fit what the budget still
    # spares for less loss: on a model whose embedding is most of it, that is most of the spare budget.
    while True:
        ups = [
            (chosen[name].cost - candidate.cost, candidate)
            for name, found in options.items()
            for candidate in found
            if 0 < candidate.params - chosen[name].params <= freed - saving and candidate.cost < chosen[name].cost
        ]
        if not ups:
            return chosen
        _, candidate = max(ups, key=lambda up: up[0])
        freed -= candidate.params - chosen[candidate.module].params
        chosen[candidate.module] = candidate


@dataclass
class Allocation:
    plan: CompressionPlan
    chosen: dict[str, Candidate]
    params: int  # the model's parameter count after compression
    seconds: float
    measured: dict[str, dict[float, float]] | None = None  # per module, {estimated loss: KL} where measured
    outside: dict[str, int] = field(default_factory=dict)  # parameters in no module chosen for, by name

    def table(self) -> str:
        lines = [f"{'module':48} {'method':10} {'structure':30} {'params':>10} {'rel. error':>10} {'est. KL':>11}"]
        for name, candidate in self.chosen.items():
            fields = {} if candidate.config is None else candidate.config.to_dict()
            structure = ", ".join(f"{k}={v}" for k, v in fields.items())
            error = math.sqrt(candidate.loss)
            priced = candidate.kl is not None or (self.measured or {}).get(name) is not None
            measured = f"{candidate.cost:>11.4g}" if priced else f"{'-':>11}"
            lines.append(
                f"{name:48} {candidate.method:10} {structure:30} {candidate.params:>10,} {error:>10.4g} {measured}"
            )
        lines.append(f"parameters after: {self.params:,}; search {self.seconds:.1f} s")
        lines.append(left_as_is(self.outside))
        return "\n".join(lines)


def left_as_is(outside: dict[str, int]) -> str:
    """What a budget cannot touch, the largest tensors named: where a model's parameters mostly lie outside
    the linear layers and the token embedding (a Mixture-of-Experts' fused expert tensors, an untied head),
    no budget reaches far below its size."""
    largest = sorted(outside.items(), key=lambda item: -item[1])[:3]
    named = ", ".join(f"{name} {count:,}" for name, count in largest)
    text = f"{sum(outside.values()):,} parameters outside the modules chosen for stay as they are" + (
        f" (the most in {named})" if named else ""
    )
    if any(name.rpartition(".")[2] in PROJECTIONS for name in outside):
        text += "; tqcompressor.unfuse_experts(model) first makes the MoE experts linear layers a budget reaches"
    return text


def linear_layers(model: nn.Module) -> list[str]:
    """Every linear layer of the model but its output head, subclasses that compute more than the product
    (routers: ``targets.is_linear``) and layers whose weight another layer shares (Zamba2 calls one
    transformer block from several layers): compressing one use would leave the dense weight to the
    others, freeing nothing (a budget of 60% came out at 103%)."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if getter is not None else None
    shared = shared_parameter_names(model)
    return [
        name
        for name, module in model.named_modules()
        if is_linear(module) and module is not head and f"{name}.weight" not in shared
    ]


def compressible_modules(model: nn.Module) -> list[str]:
    """What the allocator chooses for: every linear layer but the head, and the token embedding unless its
    forward is more than a (scaled) table lookup."""
    getter = getattr(model, "get_input_embeddings", None)
    embedding = getter() if getter is not None else None
    names = [
        name
        for name, module in model.named_modules()
        if module is embedding and isinstance(module, nn.Embedding) and _is_table(module)
    ]
    return names + linear_layers(model)


def _is_table(embedding: nn.Embedding) -> bool:
    try:
        embedding_scale(embedding)
    except ValueError:
        return False
    return True


def probe(found: list[Candidate]) -> Candidate:
    """The candidate a sensitivity measurement applies: low-rank nearest half the dense parameters."""
    dense = found[0].params
    low_rank = [c for c in found if c.method == "lowrank" and c.loss > 0] or [c for c in found[1:] if c.loss > 0]
    return min(low_rank, key=lambda c: abs(c.params - dense / 2))


class Divergence:
    """KL(original ‖ model with some modules' weights replaced) on ``blocks`` (sequences x tokens), mean
    over next-token positions; the original's predictions are computed once, here."""

    def __init__(self, model: nn.Module, blocks: torch.Tensor, batch_size: int = 4):
        self.model, self.batches, self.tokens = model, blocks.split(batch_size), blocks.numel()
        self.reference = [self._log_probs(batch) for batch in self.batches]

    @torch.no_grad()
    def _log_probs(self, batch: torch.Tensor) -> torch.Tensor:
        return self.model(batch).logits.float().log_softmax(-1)

    @torch.no_grad()
    def __call__(self, weights: dict[str, torch.Tensor]) -> float:
        """The KL with each named module's weight set to ``weights[name]``, then put back."""
        originals = {name: self.model.get_submodule(name).weight.detach().clone() for name in weights}
        try:
            for name, weight in weights.items():
                # Same parameter, new values: a head tied to an embedding sees the new weight too.
                self.model.get_submodule(name).weight.copy_(weight.to(originals[name].dtype))
            total = sum(
                float((target.exp() * (target - self._log_probs(batch))).sum(-1).sum())
                for batch, target in zip(self.batches, self.reference, strict=True)
            )
        finally:
            for name, original in originals.items():
                self.model.get_submodule(name).weight.copy_(original)
        return max(total / self.tokens, 0.0)


@torch.no_grad()
def fitted_weight(module: nn.Module, config: MethodConfig, stats: InputStats | TokenStats) -> torch.Tensor:
    """The dense weight of ``module`` fitted as ``config`` asks."""
    layer, _ = get_method(config.method).fit(module, config, stats)
    return layer.to_dense().weight.detach()


@torch.no_grad()
def measure_divergence(
    model: nn.Module,
    chosen: dict[str, Candidate],
    stats: CalibrationStats,
    blocks: torch.Tensor,
    batch_size: int = 4,
    progress: bool = True,
) -> dict[str, float]:
    """Per module: KL(original ‖ model with only that module at its ``chosen`` candidate) on ``blocks``
    (sequences x tokens, mean over next-token positions)."""
    was_training = model.training
    model.eval()
    divergence = Divergence(model, blocks, batch_size)
    measured = {}
    for name, candidate in tqdm(chosen.items(), desc="sensitivity", disable=not progress):
        weight = fitted_weight(model.get_submodule(name), candidate.config, stats.for_module(name))
        measured[name] = divergence({name: weight})
    model.train(was_training)
    return measured


def harm(loss: float, measured: dict[float, float]) -> float:
    """The KL a module's candidate of estimated ``loss`` is taken to cost, from its ``measured``
    {loss: KL} points: linear between (0, 0) and the points, in proportion to the last one beyond it.
    With the probe alone that is the probe's KL per unit of loss times ``loss``."""
    below, above = (0.0, 0.0), None
    for point in sorted(measured.items()):
        if point[0] >= loss:
            above = point
            break
        below = point
    if above is None:
        return below[1] * loss / below[0] if below[0] > 0 else 0.0
    if above[0] == below[0]:
        return above[1]
    return below[1] + (above[1] - below[1]) * (loss - below[0]) / (above[0] - below[0])


def weighed(found: list[Candidate], measured: dict[float, float]) -> list[Candidate]:
    """``found`` with each candidate's sensitivity set so that its cost is its ``harm``."""
    nearest = min(loss for loss in measured if loss > 0)  # keeping it dense costs 0 anyway: the slope there
    return [
        replace(c, sensitivity=harm(c.loss, measured) / c.loss if c.loss > 0 else measured[nearest] / nearest)
        for c in found
    ]


def allocation_plan(
    model: nn.Module,
    stats: CalibrationStats,
    target_params: int,
    sensitivity_blocks: torch.Tensor | None = None,
    progress: bool = False,
    methods: Sequence[str] | None = None,
    refinements: int = 1,
    min_kept: float = 0.0,
) -> Allocation:
    """The plan whose fit leaves ``model`` with at most ``target_params`` parameters at the least
    estimated loss. It chooses for the ``compressible_modules(model)`` that ``stats`` describe (collect
    them for all, or leave out what must stay dense). With ``sensitivity_blocks`` (token ids, sequences x
    tokens) each module's losses are weighted by its measured sensitivity, and then ``refinements``
    times the KL of each candidate chosen is measured too and the choice made again on the curves
    through those points. ``methods``: the registered methods whose candidates are offered (default:
    all; pricing permuted Kronecker candidates is most of the search's time). ``min_kept``: no module
    is left with less than this share of its parameters, however cheap its estimates say deeper cuts
    are (the estimates price each module alone; a model's errors compound)."""
    started = time.perf_counter()
    check_min_kept(min_kept)
    methods = offered_methods(methods)
    names = [name for name in compressible_modules(model) if name in stats.owner]
    if not names:
        raise ValueError("the calibration statistics describe none of the model's linear layers or token embedding")
    stats.check(model, names)
    offered = {name: candidates(name, model.get_submodule(name), stats.for_module(name), methods) for name in names}
    # A module a method cuts whole (an MLP losing units) is one choice, standing for its linear layers.
    per_module = offered
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(name.rpartition(".")[0], []).append(name)
    for parent, children in groups.items():
        if not parent or len(children) < 2:
            continue
        floored = {n: above_floor(offered[n], min_kept) for n in children}
        found = group_candidates(parent, model.get_submodule(parent), stats.for_module(parent), floored, methods)
        if found:
            offered = {name: options for name, options in offered.items() if name not in children}
            offered[parent] = found
    grouped = {parent: children for parent, children in groups.items() if parent in offered}
    # What no method can shrink (Qwen2-MoE's gate to its shared expert: one output) stays out of the choice.
    offered = {name: found for name, found in offered.items() if len(found) > 1}
    names = list(offered)
    chosen_for = [n for n in per_module if n in offered or any(n in children for children in grouped.values())]
    # The floor leaves the candidates to choose from; a sensitivity probe may lie below it.
    options = {name: above_floor(found, min_kept) for name, found in offered.items()}
    total = count_parameters(model)
    smallest = total - sum(max(c.params for c in found) - min(c.params for c in found) for found in options.values())
    if not smallest <= target_params <= total:
        raise ValueError(
            f"a budget of {target_params:,} parameters is out of reach: choose between {smallest:,} and {total:,}"
            + (f" (each module keeping at least {min_kept:g} of its parameters)" if min_kept else "")
            + f"; {left_as_is(parameters_outside(model, chosen_for))}"
        )
    measured = None
    unpriced = [name for name in names if options[name][0].kl is None]
    if sensitivity_blocks is None and 0 < len(unpriced) < len(names):
        raise ValueError(
            f"{', '.join(unpriced[:3])} have no Fisher estimate to weigh against the other modules' KL: "
            "give sensitivity blocks to measure them"
        )
    # Where every candidate is lossless (a weight of zeros) there is nothing to measure: each costs 0.
    unpriced_lossy = [name for name in unpriced if any(c.loss > 0 for c in offered[name])]
    if sensitivity_blocks is not None and unpriced_lossy:
        probes = {name: probe(offered[name]) for name in unpriced_lossy}
        kl = measure_divergence(model, probes, stats, sensitivity_blocks, progress=progress)
        measured = {name: {probes[name].loss: kl[name]} for name in unpriced_lossy}

        def weighted_options() -> dict[str, list[Candidate]]:
            return {n: weighed(found, measured[n]) if n in measured else found for n, found in options.items()}

        # The probe's KL per unit of loss, carried to every size, misjudges the modules whose KL is far
        # from linear in the loss: SmolLM2's tied embedding at 87% of its parameters costs 2.4x what its
        # probe at 50% predicts. Measuring where the choice fell puts a point there.
        for _ in range(refinements):
            chosen = allocate(weighted_options(), total - target_params)
            new = {n: chosen[n] for n in measured if chosen[n].config is not None and chosen[n].loss not in measured[n]}
            if not new:
                break
            for name, value in measure_divergence(model, new, stats, sensitivity_blocks, progress=progress).items():
                measured[name][new[name].loss] = value
        options = weighted_options()
    chosen = allocate(options, total - target_params)
    after = total - sum(options[name][0].params - c.params for name, c in chosen.items())
    for parent, children in grouped.items():
        candidate = chosen.pop(parent)
        if candidate.config is not None:
            chosen[parent] = candidate
        else:
            chosen.update(candidate.parts or {child: per_module[child][0] for child in children})
    rules = [Rule(re.escape(name), c.config) for name, c in chosen.items() if c.config is not None]
    if not rules:
        raise ValueError(f"a budget of {target_params:,} parameters needs no compression (the model has {total:,})")
    plan = CompressionPlan(rules, name=f"auto-{target_params}", description="chosen by the budget allocation")
    seconds = time.perf_counter() - started
    return Allocation(plan, chosen, after, seconds, measured, parameters_outside(model, chosen_for))
