"""Permutation-enhanced Kronecker decomposition: maths (``factors``, ``shapes``, ``search``), layers
(``modules``) and the registered method (``method``)."""

from .factors import KroneckerFactors, fit_factors, nearest_kronecker, rearrange
from .method import KroneckerConfig, KroneckerMethod
from .modules import KroneckerEmbedding, KroneckerLinear
from .search import SearchResult, search_permutations
from .shapes import KroneckerShape, propose_kronecker_shape, valid_factorizations

__all__ = [
    "KroneckerConfig",
    "KroneckerEmbedding",
    "KroneckerFactors",
    "KroneckerLinear",
    "KroneckerMethod",
    "KroneckerShape",
    "SearchResult",
    "fit_factors",
    "nearest_kronecker",
    "propose_kronecker_shape",
    "rearrange",
    "search_permutations",
    "valid_factorizations",
]
