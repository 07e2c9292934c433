"""Honest parameter counts: every tensor once, tied or shared tensors included a single time."""

from __future__ import annotations

from torch import nn


def _storage_key(tensor) -> tuple[int, int, tuple[int, ...]]:
    if tensor.device.type == "meta":  # no storage to compare: only the same object counts as shared
        return (id(tensor), -1, tuple(tensor.shape))
    return (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))


def count_parameters(module: nn.Module) -> int:
    """Number of distinct trainable-or-frozen parameter values in ``module``.

    ``nn.Module.parameters()`` already skips a Parameter registered twice; keying on storage also
    catches two Parameter objects that share memory (a head tied by assignment of ``.data``).
    """
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    total = 0
    for _, param in module.named_parameters(remove_duplicate=False):
        key = _storage_key(param)
        if key not in seen:
            seen.add(key)
            total += param.numel()
    return total


def tied_parameters(module: nn.Module) -> list[list[str]]:
    """Groups of parameter names that share one tensor (e.g. ``lm_head.weight`` and ``wte.weight``)."""
    groups: dict[tuple[int, int, tuple[int, ...]], list[str]] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        groups.setdefault(_storage_key(param), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def shared_parameter_names(module: nn.Module) -> set[str]:
    """The names of ``module``'s parameters whose tensor another name reaches too (``tied_parameters``)."""
    return {name for group in tied_parameters(module) for name in group}


def freed_parameters(module: nn.Module, names: list[str]) -> int:
    """How many parameter values replacing ``module``'s submodules ``names`` frees: the distinct tensors in
    them that no name outside them reaches (a weight that a layer left alone shares stays)."""
    prefixes = tuple(f"{name}." for name in names)
    kept = {
        _storage_key(param)
        for name, param in module.named_parameters(remove_duplicate=False)
        if not name.startswith(prefixes)
    }
    freed = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        key = _storage_key(param)
        if name.startswith(prefixes) and key not in kept:
            freed[key] = param.numel()
    return sum(freed.values())


def parameters_outside(module: nn.Module, names: list[str]) -> dict[str, int]:
    """The distinct parameters of ``module`` in none of its submodules ``names``, by name: what compressing
    those modules leaves as it is. A tensor shared with one of them (a tied head's weight) lies in it."""
    prefixes = tuple(f"{name}." for name in names)
    seen = {
        _storage_key(param)
        for name, param in module.named_parameters(remove_duplicate=False)
        if name.startswith(prefixes)
    }
    outside = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        key = _storage_key(param)
        if key not in seen:
            seen.add(key)
            outside[name] = param.numel()
    return outside
