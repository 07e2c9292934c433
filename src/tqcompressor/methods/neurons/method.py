"""The ``neurons`` method: keep some of an MLP's inner units whole and drop the rest.

A rule names the MLP module (``model.layers.3.mlp``, ``transformer.h.3.mlp``). Its linear children are
told apart by their shapes: the producers (gate and up, GPT-2's c_fc) map the model width to the inner
width, the consumer (down, c_proj) maps it back. Each unit kept keeps its producers' weights for it as
they are; the consumer's rows are refitted by least squares on the units kept (``selection``), so the
MLP's output error is exactly what the selection's estimate says: for a budget the method is priced
with no fit at all. The MLP runs its own forward at the smaller width, which ``fit`` checks: a forward
that mixes its inner units (a norm over them) is refused.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from ...linalg import calibrated_error, fisher_loss
from ...statistics import InputStats
from ..base import CompressionMethod, Estimate, FitReport, MethodConfig
from ..registry import register
from ..targets import dense_weight, is_linear
from .modules import KeptUnitsLinear
from .selection import forward_selection, refit

# Offered to a budget, as shares of the inner units kept (the MLP's parameters shrink in proportion).
UNIT_FRACTIONS = (0.875, 0.75, 0.625, 0.5, 0.4375, 0.375, 0.3125, 0.25, 0.1875, 0.125, 0.0625)
# Units selection takes a step: inner / 256 (``selection.forward_selection``'s ``block``). Selecting 87.5% of
# 5632 units (TinyLlama's width, synthetic statistics) took about 6 min with 5 a step and 1.5 min with 22, one
# thread; on correlated 1536-wide activations 6 a step left 0.8% more error than one at 1/8 of the units kept.
UNITS_PER_STEP = 256


def selection_block(inner: int) -> int:
    return max(1, inner // UNITS_PER_STEP)


@dataclass
class NeuronsConfig(MethodConfig):
    """Keep ``units`` of the MLP's inner units, or the share ``ratio`` of them (rounded, at least one)."""

    method = "neurons"
    units: int | None = None
    ratio: float | None = None

    def check(self) -> None:
        if (self.units is None) == (self.ratio is None):
            raise ValueError("give exactly one of 'units' or 'ratio'")
        if self.units is not None and (not isinstance(self.units, int) or self.units < 1):
            raise ValueError(f"field 'units' must be a positive integer, got {self.units!r}")
        if self.ratio is not None and not 0 < self.ratio <= 1:
            raise ValueError(f"field 'ratio' must be in (0, 1], got {self.ratio}")

    def units_for(self, inner: int) -> int:
        units = self.units if self.units is not None else max(1, round(self.ratio * inner))
        if units > inner:
            raise ValueError(f"cannot keep {units} units of an MLP with {inner}")
        return units


@dataclass
class MLPParts:
    producers: list[str]
    consumer: str
    inner: int  # the units between them


def mlp_parts(module: nn.Module) -> MLPParts | None:
    """The producers and consumer among ``module``'s linear children, told apart by their shapes: the
    producers all read the width the consumer writes and write the width it reads. None when the
    children do not form an MLP so (attention: every projection reads the model width; a consumer must
    read a width no other child reads)."""
    shapes = {name: tuple(dense_weight(child)[0].shape) for name, child in module.named_children() if is_linear(child)}
    if len(shapes) < 2:
        return None
    widths = [rows for rows, _ in shapes.values()]
    # With one producer the shapes are symmetric (c_fc: width -> inner, c_proj: inner -> width): the consumer
    # is the one defined last, as MLPs define them in forward order (``fit`` checks the forward agrees).
    consumers = [name for name, (rows, _) in shapes.items() if widths.count(rows) == 1]
    if not consumers:
        return None
    inner, width = shapes[consumers[-1]]
    producers = [name for name in shapes if name != consumers[-1]]
    if inner == width or any(shapes[name] != (width, inner) for name in producers):
        return None
    return MLPParts(producers, consumers[-1], inner)


def _parts_or_refuse(module: nn.Module) -> MLPParts:
    parts = mlp_parts(module)
    if parts is None:
        raise ValueError(
            f"a {type(module).__name__} is not an MLP that method 'neurons' can cut: it takes a module whose "
            "linear children are producers (width -> inner) feeding one consumer (inner -> width)"
        )
    return parts


def _with_children(module: nn.Module, children: dict[str, nn.Module]) -> nn.Module:
    """A copy of ``module`` (same class, same forward) with ``children`` in place of its own."""
    twin = copy.copy(module)
    twin._modules = dict(module._modules)
    twin._parameters, twin._buffers = dict(module._parameters), dict(module._buffers)
    for name, child in children.items():
        setattr(twin, name, child)
    return twin


class NeuronsMethod(CompressionMethod):
    name = "neurons"
    config_class = NeuronsConfig
    modules = (KeptUnitsLinear,)

    def plan(self, module: nn.Module, config: NeuronsConfig) -> nn.Module:
        parts = _parts_or_refuse(module)
        units = config.units_for(parts.inner)
        children = {}
        for name in [*parts.producers, parts.consumer]:
            weight, bias, layout = dense_weight(module.get_submodule(name))
            rows, cols = weight.shape
            side = "inputs" if name == parts.consumer else "outputs"
            shape = {"in": units, "out": cols} if side == "inputs" else {"in": rows, "out": units}
            spec = {**shape, "side": side, "dense": parts.inner, "layout": layout, "bias": bias is not None}
            children[name] = KeptUnitsLinear.from_spec(spec)
        return _with_children(module, children)

    def estimates(self, module: nn.Module, stats: dict[str, InputStats]) -> list[Estimate]:
        """Exact: the output error the consumer's least-squares refit leaves on the units greedy selection
        keeps, tr(Wᵀ S W) relative, and ½ tr(Wᵀ S W G) with the Fisher's output metric G."""
        parts = mlp_parts(module) if isinstance(stats, dict) else None
        if parts is None or parts.consumer not in stats:
            return []
        consumer = stats[parts.consumer]
        weight = dense_weight(module.get_submodule(parts.consumer))[0]
        counts = sorted({max(1, int(parts.inner * f)) for f in UNIT_FRACTIONS}, reverse=True)
        selection = forward_selection(
            consumer.second_moment, weight, counts[0], consumer.output_second_moment, selection_block(parts.inner)
        )
        producers = [dense_weight(module.get_submodule(name)) for name in parts.producers]
        per_unit = sum(w.shape[0] for w, _, _ in producers) + weight.shape[1]
        # The producers' biases lose the dropped units too (a budget counts the rest of a bias as kept).
        biased = sum(b is not None for _, b, _ in producers)
        fisher = consumer.output_second_moment is not None
        return [
            Estimate(
                NeuronsConfig(units=units),
                units * per_unit - (parts.inner - units) * biased,
                float(selection.relative[units]),
                0.5 * float(selection.weighted[units]) if fisher else None,
            )
            for units in counts
        ]

    @torch.no_grad()
    def fit(self, module: nn.Module, config: NeuronsConfig, stats: dict[str, InputStats] | None = None):
        parts = _parts_or_refuse(module)
        units = config.units_for(parts.inner)
        weight, bias, layout = dense_weight(module.get_submodule(parts.consumer))
        consumer = None if stats is None else stats.get(parts.consumer)
        if stats is not None and consumer is None:
            raise ValueError(f"calibration statistics hold none for the MLP's {parts.consumer}")
        if consumer is None:  # data-free: every unit's activations taken as unit and independent
            second, metric = torch.eye(parts.inner, dtype=torch.float64, device=weight.device), None
        else:
            second, metric = consumer.second_moment, consumer.output_second_moment
        order = forward_selection(second, weight, units, metric, selection_block(parts.inner)).order
        index = order.sort().values.to(weight.device)
        rows = weight[index] if consumer is None else refit(second, weight, index)
        children = {parts.consumer: KeptUnitsLinear(rows.to(weight.dtype), index, "inputs", parts.inner, bias, layout)}
        for name in parts.producers:
            w, b, producer_layout = dense_weight(module.get_submodule(name))
            kept_bias = None if b is None else b[index]
            children[name] = KeptUnitsLinear(w[:, index], index, "outputs", parts.inner, kept_bias, producer_layout)
        fitted = _with_children(module, children)
        _check_units_independent(module, fitted, parts.consumer)
        approximation = children[parts.consumer].dense_weight()
        plain = weight.new_zeros(weight.shape).index_copy(0, index, weight[index])
        report = FitReport(
            list(weight.shape),
            f"{units} of {parts.inner} units",
            calibrated_error(weight, approximation, second),
            calibrated_error(weight, plain, second),
            objective="frobenius" if consumer is None else "calibrated",
        )
        if metric is not None:
            report.details["kl"] = fisher_loss(weight, approximation, second, metric)
        return fitted, report


def _check_units_independent(module: nn.Module, fitted: nn.Module, consumer: str) -> None:
    """Raise unless ``fitted`` computes what ``module`` does with the dropped units' rows of its consumer
    zero (the fitted rows in place of the kept ones): true of an MLP whose forward treats its inner units
    one by one, false where it mixes them (a norm over them)."""
    dense = _with_children(module, {consumer: fitted.get_submodule(consumer).to_dense()})
    reference = next(module.parameters())
    width = fitted.get_submodule(consumer).out_features
    x = torch.randn(3, width, generator=torch.Generator().manual_seed(0)).to(reference.device, reference.dtype)
    was = module.training
    try:
        fitted.eval(), dense.eval()
        expected = dense(x)
        same = torch.allclose(fitted(x), expected, rtol=1e-3, atol=1e-4 * float(expected.abs().max().clamp_min(1)))
    except RuntimeError as err:
        raise ValueError(f"{type(module).__name__}'s forward does not run with fewer inner units: {err}") from err
    finally:
        fitted.train(was), dense.train(was)
    if not same:
        raise ValueError(f"{type(module).__name__}'s forward mixes its inner units: they cannot be dropped one by one")


register(NeuronsMethod())
