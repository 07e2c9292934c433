"""Budget-driven compression: choose, per linear layer, dense, low-rank at some rank, or a Kronecker
shape, so that the total estimated loss is smallest within a parameter budget.

A candidate's loss is its relative squared output error, tr(Δᵀ C Δ) / tr(Wᵀ C W), estimated from the
statistics without fitting: exact for whitened low-rank (the tail of the singular values of SᵀW), and
for Kronecker the closed-form Kronecker-whitened fit, an upper bound that the installed fit (ALS
refinement) only lowers. Relative, because absolute errors are in each layer's own units: summed raw,
the layers with the largest outputs (SmolLM2's down_proj) stayed dense while the small-output q/k
projections were cut to the bone, and the model broke. The allocation is a greedy walk down each
layer's lower convex hull of (parameters, loss), always taking the step that frees parameters at the
least loss per parameter.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass

import torch
from torch import nn

from .calibration import CalibrationStats
from .linalg import whitening_factor
from .methods import MethodConfig
from .methods.kronecker import KroneckerConfig, propose_kronecker_shape
from .methods.kronecker.calibrated import calibrated_factors
from .methods.lowrank import LowRankConfig
from .methods.targets import LINEAR_TYPES, dense_weight
from .params import count_parameters
from .plan import CompressionPlan, Rule
from .statistics import InputStats

RANK_FRACTIONS = (0.75, 0.5, 0.375, 0.25, 0.125, 0.0625)  # of the rank that keeps the dense count
KRONECKER_RATIOS = (0.5, 0.25, 0.125)


@dataclass
class Candidate:
    module: str
    config: MethodConfig | None  # None: keep the dense weight
    params: int  # the weight's parameters after (a bias is kept as it is)
    loss: float  # estimated relative squared output error on the calibration inputs

    @property
    def method(self) -> str:
        return "dense" if self.config is None else self.config.method


def candidates(name: str, module: nn.Module, stats: InputStats) -> list[Candidate]:
    """Every candidate for one linear layer, cheapest estimate first."""
    weight, _, _ = dense_weight(module)
    w = weight.detach().double()
    rows, cols = w.shape
    c = stats.second_moment.double()
    whitened = whitening_factor(c).T @ w
    energy = torch.linalg.svdvals(whitened) ** 2
    total = float(energy.sum()) or 1.0  # ‖Sᵀ W‖² = tr(Wᵀ C W), the layer's output energy
    tail = energy.flip(0).cumsum(0).flip(0) / total  # tail[k] = Σ_{i >= k} σ_i², relative
    found = [Candidate(name, None, rows * cols, 0.0)]
    full = rows * cols // (rows + cols)
    for fraction in RANK_FRACTIONS:
        rank = max(1, int(full * fraction))
        if rank < min(rows, cols):
            found.append(Candidate(name, LowRankConfig(rank=rank), rank * (rows + cols), float(tail[rank])))
    for ratio in KRONECKER_RATIOS:
        try:
            shape = propose_kronecker_shape(rows, cols, ratio)
        except ValueError:
            continue
        _, history = calibrated_factors(weight.detach(), shape, c, iterations=0)
        config = KroneckerConfig(shape=(shape.m1, shape.n1, shape.m2, shape.n2), rank=shape.rank, permute=False)
        found.append(Candidate(name, config, shape.num_params, history[0] ** 2))
    return found


def lower_hull(options: list[Candidate]) -> list[Candidate]:
    """The candidates on the lower convex hull of (params, loss), from the most parameters down: the only
    ones a marginal-loss greedy (or the Lagrangian optimum) ever picks."""
    pareto: list[Candidate] = []
    for candidate in sorted(options, key=lambda c: (-c.params, c.loss)):
        if pareto and candidate.params == pareto[-1].params:
            continue  # as many parameters, no less loss
        while pareto and pareto[-1].loss >= candidate.loss:
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
    return (fewer.loss - more.loss) / max(more.params - fewer.params, 1)


def allocate(options: dict[str, list[Candidate]], saving: int) -> dict[str, Candidate]:
    """Per module, the candidate that frees at least ``saving`` parameters in total at the least summed
    loss a greedy walk down the hulls finds (each step the cheapest loss per parameter freed)."""
    hulls = {name: lower_hull(found) for name, found in options.items()}
    position = dict.fromkeys(hulls, 0)
    freed = 0
    while freed < saving:
        steps = [
            (name, _slope(h[position[name]], h[position[name] + 1]))
            for name, h in hulls.items()
            if position[name] + 1 < len(h)
        ]
        if not steps:
            raise ValueError("the budget cannot be reached with these candidates")
        name, _ = min(steps, key=lambda step: step[1])
        hull = hulls[name]
        freed += hull[position[name]].params - hull[position[name] + 1].params
        position[name] += 1
    return {name: hull[position[name]] for name, hull in hulls.items()}


@dataclass
class Allocation:
    plan: CompressionPlan
    chosen: dict[str, Candidate]
    params: int  # the model's parameter count after compression
    seconds: float

    def table(self) -> str:
        lines = [f"{'module':48} {'method':10} {'structure':30} {'params':>10} {'rel. error':>10}"]
        for name, candidate in self.chosen.items():
            fields = {} if candidate.config is None else candidate.config.to_dict()
            structure = ", ".join(f"{k}={v}" for k, v in fields.items() if k != "permute")
            error = math.sqrt(candidate.loss)
            lines.append(f"{name:48} {candidate.method:10} {structure:30} {candidate.params:>10,} {error:>10.4g}")
        lines.append(f"parameters after: {self.params:,}; search {self.seconds:.1f} s")
        return "\n".join(lines)


def linear_layers(model: nn.Module) -> list[str]:
    """Every linear layer of the model but its output head."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if getter is not None else None
    return [name for name, module in model.named_modules() if isinstance(module, LINEAR_TYPES) and module is not head]


def allocation_plan(model: nn.Module, stats: CalibrationStats, target_params: int) -> Allocation:
    """The plan whose fit leaves ``model`` with at most ``target_params`` parameters at the least
    estimated loss; ``stats`` must cover ``linear_layers(model)``."""
    started = time.perf_counter()
    names = linear_layers(model)
    stats.check(model, names)
    options = {name: candidates(name, model.get_submodule(name), stats.for_module(name)) for name in names}
    total = count_parameters(model)
    smallest = total - sum(max(c.params for c in found) - min(c.params for c in found) for found in options.values())
    if not smallest <= target_params <= total:
        raise ValueError(
            f"a budget of {target_params:,} parameters is out of reach: choose between {smallest:,} and {total:,}"
        )
    chosen = allocate(options, total - target_params)
    rules = [Rule(re.escape(name), c.config) for name, c in chosen.items() if c.config is not None]
    if not rules:
        raise ValueError(f"a budget of {target_params:,} parameters needs no compression (the model has {total:,})")
    after = total - sum(options[name][0].params - c.params for name, c in chosen.items())
    plan = CompressionPlan(rules, name=f"auto-{target_params}", description="chosen by the budget allocation")
    return Allocation(plan, chosen, after, time.perf_counter() - started)
