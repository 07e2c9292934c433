"""tqcompressor: permutation-enhanced Kronecker compression of transformer language models."""

from .kronecker import KroneckerFactors, fit_factors, nearest_kronecker
from .layers import KroneckerEmbedding, KroneckerLinear, LowRankEmbedding, LowRankLinear, TiedEmbeddingHead
from .lowrank import LowRankFactors, truncated_svd
from .params import count_parameters, tied_parameters
from .permutation_search import SearchResult, search_permutations
from .shapes import KroneckerShape, propose_kronecker_shape, svd_rank_for_params, valid_factorizations

__all__ = [
    "KroneckerEmbedding",
    "KroneckerFactors",
    "KroneckerLinear",
    "KroneckerShape",
    "LowRankEmbedding",
    "LowRankFactors",
    "LowRankLinear",
    "SearchResult",
    "TiedEmbeddingHead",
    "count_parameters",
    "fit_factors",
    "nearest_kronecker",
    "propose_kronecker_shape",
    "search_permutations",
    "svd_rank_for_params",
    "tied_parameters",
    "truncated_svd",
    "valid_factorizations",
]
__version__ = "0.1.0"
