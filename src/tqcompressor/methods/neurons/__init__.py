"""Whole MLP units kept or dropped: maths (``selection``), layers (``modules``), the method (``method``)."""

from .method import NeuronsConfig, NeuronsMethod, mlp_parts
from .modules import KeptUnitsLinear
from .selection import Selection, forward_selection, refit

__all__ = ["KeptUnitsLinear", "NeuronsConfig", "NeuronsMethod", "Selection", "forward_selection", "mlp_parts", "refit"]
