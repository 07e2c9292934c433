"""The method registry: plans name methods, saved configs name module types; both are looked up here."""

from __future__ import annotations

from torch import nn

from .base import CompressedModule, CompressionMethod

_METHODS: dict[str, CompressionMethod] = {}
_ALIASES: dict[str, str] = {}
_MODULES: dict[str, type[CompressedModule]] = {}


def register(method: CompressionMethod, aliases: tuple[str, ...] = ()) -> CompressionMethod:
    """Make ``method`` available to plans (by its name and ``aliases``) and its modules to ``load``."""
    for name in (method.name, *aliases):
        if name in _METHODS or name in _ALIASES:
            raise ValueError(f"a compression method named {name!r} is already registered")
    for module_class in method.modules:
        if module_class.spec_type in _MODULES:
            raise ValueError(f"a compressed module type {module_class.spec_type!r} is already registered")
    _METHODS[method.name] = method
    _ALIASES.update(dict.fromkeys(aliases, method.name))
    _MODULES.update({module_class.spec_type: module_class for module_class in method.modules})
    return method


def unregister(name: str) -> None:
    method = _METHODS.pop(name)
    for alias in [alias for alias, target in _ALIASES.items() if target == name]:
        del _ALIASES[alias]
    for module_class in method.modules:
        _MODULES.pop(module_class.spec_type, None)


def get_method(name: str) -> CompressionMethod:
    name = _ALIASES.get(name, name)
    if name not in _METHODS:
        raise ValueError(f"unknown compression method {name!r}; registered: {', '.join(method_names())}")
    return _METHODS[name]


def method_names() -> list[str]:
    return sorted(_METHODS)


def module_class(spec_type: str) -> type[CompressedModule]:
    if spec_type not in _MODULES:
        raise ValueError(
            f"unknown compressed module type {spec_type!r} in config (is the method that wrote it registered?)"
        )
    return _MODULES[spec_type]


def is_compressed(module: nn.Module) -> bool:
    return isinstance(module, CompressedModule)


def is_embedding(module: nn.Module) -> bool:
    """A token embedding table, dense or compressed."""
    return isinstance(module, nn.Embedding) or (is_compressed(module) and module.kind == "embedding")
