"""Nearest sum of Kronecker products (Van Loan–Pitsianis), optionally after row/column permutations.

W (M x N) is approximated as W[row_perm][:, col_perm] ≈ sum_i A_i ⊗ B_i. For fixed permutations the
best factors come from the rank-r truncated SVD of the rearrangement R(W), whose rows are the
vectorised (m2 x n2) blocks of W: R(A ⊗ B) = vec(A) vec(B)^T.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...linalg import check_weight, relative, working_dtype
from .shapes import KroneckerShape


@dataclass
class KroneckerFactors:
    """W[row_perm][:, col_perm] ≈ sum_i a[i] ⊗ b[i]."""

    a: torch.Tensor  # (rank, m1, n1)
    b: torch.Tensor  # (rank, m2, n2)
    row_perm: torch.Tensor  # (M,) long: position -> original row
    col_perm: torch.Tensor  # (N,) long: position -> original column

    @property
    def shape(self) -> KroneckerShape:
        rank, m1, n1 = self.a.shape
        _, m2, n2 = self.b.shape
        return KroneckerShape(m1, n1, m2, n2, rank)

    @property
    def num_params(self) -> int:
        return self.a.numel() + self.b.numel()

    def kronecker_sum(self) -> torch.Tensor:
        """sum_i a[i] ⊗ b[i] in the permuted order."""
        _, m1, n1 = self.a.shape
        _, m2, n2 = self.b.shape
        blocks = torch.einsum("rac,rbd->abcd", self.a, self.b)
        return blocks.reshape(m1 * m2, n1 * n2)

    def reconstruct(self) -> torch.Tensor:
        """The approximation of W in its original row and column order."""
        permuted = self.kronecker_sum()
        dense = torch.empty_like(permuted)
        dense[self.row_perm.unsqueeze(1), self.col_perm.unsqueeze(0)] = permuted
        return dense

    def relative_error(self, weight: torch.Tensor) -> float:
        approx = self.reconstruct().to(torch.float64)
        target = weight.to(torch.float64)
        return relative((target - approx).square().sum(), target.square().sum())


def rearrange(weight: torch.Tensor, shape: KroneckerShape) -> torch.Tensor:
    """Van Loan–Pitsianis rearrangement: row (a, c) is the flattened (m2 x n2) block (a, c) of W."""
    m1, n1, m2, n2 = shape.m1, shape.n1, shape.m2, shape.n2
    return weight.reshape(m1, m2, n1, n2).permute(0, 2, 1, 3).reshape(m1 * n1, m2 * n2)


def _top_singular(matrix: torch.Tensor, rank: int, randomized: bool) -> tuple[torch.Tensor, ...]:
    if randomized and min(matrix.shape) > 4 * rank:
        u, s, v = torch.svd_lowrank(matrix, q=min(rank + 8, min(matrix.shape)), niter=4)
        return u[:, :rank], s[:rank], v[:, :rank]
    if matrix.shape[0] >= 8 * matrix.shape[1]:
        # Tall and skinny (GPT-2 MLP: 294912 x 8): the small Gram matrix is far cheaper than a full SVD.
        gram = matrix.T @ matrix
        eigvals, eigvecs = torch.linalg.eigh(gram)
        order = torch.argsort(eigvals, descending=True)[:rank]
        v = eigvecs[:, order]
        s = eigvals[order].clamp_min(0).sqrt()
        u = (matrix @ v) / s.clamp_min(torch.finfo(matrix.dtype).tiny)
        return u, s, v
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u[:, :rank], s[:rank], vh[:rank].T


def checked_orders(
    weight: torch.Tensor, shape: KroneckerShape, row_perm: torch.Tensor | None, col_perm: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Check that ``shape`` fits ``weight``; (row order, column order), identity where not given."""
    check_weight(weight)
    shape.check_matrix(*weight.shape)
    rows, cols = weight.shape
    device = weight.device
    row_perm = torch.arange(rows, device=device) if row_perm is None else row_perm.to(device)
    col_perm = torch.arange(cols, device=device) if col_perm is None else col_perm.to(device)
    return row_perm, col_perm


def fit_factors(
    weight: torch.Tensor,
    shape: KroneckerShape,
    row_perm: torch.Tensor | None = None,
    col_perm: torch.Tensor | None = None,
    randomized: bool = False,
) -> KroneckerFactors:
    """Best rank-r Kronecker factors of W[row_perm][:, col_perm], in W's dtype."""
    row_perm, col_perm = checked_orders(weight, shape, row_perm, col_perm)
    work = weight.to(working_dtype(weight))[row_perm][:, col_perm]
    u, s, v = _top_singular(rearrange(work, shape), shape.rank, randomized)
    root = s.sqrt()
    a = (u * root).T.reshape(shape.rank, shape.m1, shape.n1)
    b = (v * root).T.reshape(shape.rank, shape.m2, shape.n2)
    return KroneckerFactors(a.to(weight.dtype), b.to(weight.dtype), row_perm, col_perm)


def nearest_kronecker(weight: torch.Tensor, shape: KroneckerShape, randomized: bool = False) -> KroneckerFactors:
    """Plain nearest sum of Kronecker products, no permutations (the KnGPT-2 baseline)."""
    return fit_factors(weight, shape, randomized=randomized)
