"""Compression methods. Each lives in its own package and registers itself on import; everything
else finds methods through ``registry``."""

from . import kronecker, lowrank, neurons
from .base import CompressedModule, CompressionMethod, Estimate, FitReport, MethodConfig
from .registry import get_method, is_compressed, is_embedding, method_names, module_class, register, unregister

__all__ = [
    "CompressedModule",
    "CompressionMethod",
    "Estimate",
    "FitReport",
    "MethodConfig",
    "get_method",
    "is_compressed",
    "is_embedding",
    "kronecker",
    "lowrank",
    "method_names",
    "module_class",
    "neurons",
    "register",
    "unregister",
]
