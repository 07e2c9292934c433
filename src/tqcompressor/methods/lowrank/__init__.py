"""Truncated SVD: maths (``factors``), layers (``modules``) and the registered method (``method``)."""

from .factors import LowRankFactors, rank_for_params, truncated_svd
from .method import LowRankConfig, LowRankMethod
from .modules import LowRankEmbedding, LowRankLinear

__all__ = [
    "LowRankConfig",
    "LowRankEmbedding",
    "LowRankFactors",
    "LowRankLinear",
    "LowRankMethod",
    "rank_for_params",
    "truncated_svd",
]
