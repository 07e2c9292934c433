"""tqcompressor: permutation-enhanced Kronecker compression of transformer language models.

import tqcompressor as tq
report = tq.compress_(model, "tqcompressedgpt2")        # or a CompressionPlan, or Path("plan.yaml")
tq.save(model, "out", tokenizer); model = tq.load("out")
"""

from .calibration import CalibrationStats, calibrate
from .depth import keep_layers_
from .experts import fuse_experts, unfuse_experts
from .folding import fold_permutations
from .methods import CompressedModule, CompressionMethod, FitReport, MethodConfig, get_method, method_names, register
from .methods.kronecker import (
    KroneckerConfig,
    KroneckerEmbedding,
    KroneckerFactors,
    KroneckerLinear,
    KroneckerShape,
    SearchResult,
    fit_factors,
    nearest_kronecker,
    propose_kronecker_shape,
    search_permutations,
    valid_factorizations,
)
from .methods.lowrank import LowRankConfig, LowRankEmbedding, LowRankFactors, LowRankLinear, truncated_svd
from .methods.neurons import KeptUnitsLinear, NeuronsConfig
from .params import count_parameters, tied_parameters
from .plan import CompressionPlan, Rule
from .presets import preset
from .report import CompressionReport, LayerReport
from .serialization import load, materialize, save
from .surgery import compress_, planned_parameters
from .tied_head import TiedEmbeddingHead

__all__ = [
    "CalibrationStats",
    "CompressedModule",
    "CompressionMethod",
    "CompressionPlan",
    "CompressionReport",
    "FitReport",
    "KeptUnitsLinear",
    "KroneckerConfig",
    "KroneckerEmbedding",
    "KroneckerFactors",
    "KroneckerLinear",
    "KroneckerShape",
    "LayerReport",
    "LowRankConfig",
    "LowRankEmbedding",
    "LowRankFactors",
    "LowRankLinear",
    "MethodConfig",
    "NeuronsConfig",
    "Rule",
    "SearchResult",
    "TiedEmbeddingHead",
    "calibrate",
    "compress_",
    "count_parameters",
    "fit_factors",
    "fold_permutations",
    "fuse_experts",
    "get_method",
    "keep_layers_",
    "load",
    "materialize",
    "method_names",
    "nearest_kronecker",
    "planned_parameters",
    "preset",
    "propose_kronecker_shape",
    "register",
    "save",
    "search_permutations",
    "tied_parameters",
    "truncated_svd",
    "unfuse_experts",
    "valid_factorizations",
]
__version__ = "0.1.0"
