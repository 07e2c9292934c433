import os
from pathlib import Path

import torch

from tqcompressor.methods.kronecker import KroneckerShape

# Tests read the local copies of models and data the way users point the tool at theirs.
os.environ.setdefault("TQCOMPRESSOR_ASSETS", str(Path(__file__).resolve().parents[2] / "shared" / "assets"))


def planted_matrix(shape: KroneckerShape, seed: int, rows: bool = True, cols: bool = True):
    """W = P (sum_i A_i ⊗ B_i) Q with random permutations; returns (W, exact Kronecker sum)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(shape.rank, shape.m1, shape.n1, generator=g, dtype=torch.float64)
    b = torch.randn(shape.rank, shape.m2, shape.n2, generator=g, dtype=torch.float64)
    k = torch.einsum("rac,rbd->abcd", a, b).reshape(shape.in_features, shape.out_features)
    p = torch.randperm(shape.in_features, generator=g) if rows else torch.arange(shape.in_features)
    q = torch.randperm(shape.out_features, generator=g) if cols else torch.arange(shape.out_features)
    w = torch.empty_like(k)
    w[p.unsqueeze(1), q.unsqueeze(0)] = k
    return w, k
