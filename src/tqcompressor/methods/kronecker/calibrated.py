"""Kronecker factors fitted to what a layer computes on real inputs: minimise ‖X (W − Σ Aᵢ ⊗ Bᵢ)‖_F over
calibration inputs X, known through C = XᵀX (in x in), after the permutations are applied.

Start in closed form: approximate C by its nearest Kronecker product C₁ ⊗ C₂ (split like the factors'
rows) and whiten by S₁ ⊗ S₂, which keeps the Kronecker structure, so plain Van Loan applies. Then
refine on the exact objective by alternating least squares: with every Bᵢ fixed the Aᵢ solve one
linear system shared by all columns of A, and vice versa. Each half-step is an exact minimiser, and a
step that would raise the objective (round-off) is not taken.
"""

from __future__ import annotations

import torch

from ...linalg import whitening_factor
from .factors import KroneckerFactors, checked_orders, fit_factors
from .shapes import KroneckerShape


def nearest_kronecker_product(c: torch.Tensor, m1: int, m2: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(C₁, C₂), m1 x m1 and m2 x m2, symmetric with positive trace, minimising ‖C − C₁ ⊗ C₂‖_F."""
    factors = fit_factors(c.double(), KroneckerShape(m1, m1, m2, m2, 1))
    c1, c2 = factors.a[0], factors.b[0]
    if c1.trace() < 0:
        c1, c2 = -c1, -c2
    return (c1 + c1.T) / 2, (c2 + c2.T) / 2


def kronecker_whitened(
    weight: torch.Tensor, second_moment: torch.Tensor, m1: int, m2: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """((S₁ ⊗ S₂)ᵀ W, S₁, S₂) with S₁S₁ᵀ ⊗ S₂S₂ᵀ the nearest Kronecker product of C: a whitening that
    keeps Kronecker structure (its columns are W's, so a column order searched on it applies to W)."""
    rows, cols = weight.shape
    c1, c2 = nearest_kronecker_product(second_moment, m1, m2)
    s1, s2 = whitening_factor(c1), whitening_factor(c2)
    whitened = torch.einsum("xa,yb,xyk->abk", s1, s2, weight.double().reshape(m1, m2, cols)).reshape(rows, cols)
    return whitened, s1, s2


def objective(w: torch.Tensor, c: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> float:
    """tr(Δᵀ C Δ) with Δ = W − Σ aᵢ ⊗ bᵢ (everything in the permuted order)."""
    m1, n1, m2, n2 = a.shape[1], a.shape[2], b.shape[1], b.shape[2]
    delta = w - torch.einsum("rac,rbd->abcd", a, b).reshape(m1 * m2, n1 * n2)
    return float((delta * (c @ delta)).sum())


def _solve(gram: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    jitter = 1e-12 * float(gram.diagonal().mean().abs()) + 1e-300
    eye = torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
    return torch.linalg.solve(gram + jitter * eye, rhs)


def _a_step(c4: torch.Tensor, cw4: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """argmin over A with B fixed: G[(i,a),(j,a')] = Σ C[a,b,a',b'] (Bᵢ Bⱼᵀ)[b,b'], rhs = Σ Bᵢ[b,d] (CW)[a,b,c,d]."""
    r = b.shape[0]
    m1 = c4.shape[0]
    bb = torch.einsum("ibd,jed->ijbe", b, b)
    gram = torch.einsum("abxe,ijbe->iajx", c4, bb).reshape(r * m1, r * m1)
    rhs = torch.einsum("ibd,abcd->iac", b, cw4).reshape(r * m1, -1)
    return _solve(gram, rhs).reshape(r, m1, -1)


def _b_step(c4: torch.Tensor, cw4: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """argmin over B with A fixed: H[(i,b),(j,b')] = Σ C[a,b,a',b'] (Aᵢ Aⱼᵀ)[a,a'], rhs = Σ Aᵢ[a,c] (CW)[a,b,c,d]."""
    r = a.shape[0]
    m2 = c4.shape[1]
    aa = torch.einsum("iac,jxc->ijax", a, a)
    gram = torch.einsum("abxe,ijax->ibje", c4, aa).reshape(r * m2, r * m2)
    rhs = torch.einsum("iac,abcd->ibd", a, cw4).reshape(r * m2, -1)
    return _solve(gram, rhs).reshape(r, m2, -1)


def calibrated_factors(
    weight: torch.Tensor,
    shape: KroneckerShape,
    second_moment: torch.Tensor,
    row_perm: torch.Tensor | None = None,
    col_perm: torch.Tensor | None = None,
    iterations: int = 20,
    tolerance: float = 1e-4,
) -> tuple[KroneckerFactors, list[float]]:
    """Factors of W[row_perm][:, col_perm] fitted to the calibration objective, and the relative
    calibrated error after the closed-form start and after each refinement sweep."""
    row_perm, col_perm = checked_orders(weight, shape, row_perm, col_perm)
    device = weight.device
    m1, n1, m2, n2 = shape.m1, shape.n1, shape.m2, shape.n2
    w = weight.double()[row_perm][:, col_perm]
    c = second_moment.double().to(device)[row_perm][:, row_perm]
    cw = c @ w
    norm = float((w * cw).sum())
    c4, cw4 = c.reshape(m1, m2, m1, m2), cw.reshape(m1, m2, n1, n2)

    whitened, s1, s2 = kronecker_whitened(w, c, m1, m2)
    start = fit_factors(whitened, shape)
    a = torch.linalg.solve_triangular(s1.T.expand(shape.rank, m1, m1), start.a.double(), upper=True)
    b = torch.linalg.solve_triangular(s2.T.expand(shape.rank, m2, m2), start.b.double(), upper=True)
    best = objective(w, c, a, b)
    history = [max(best, 0.0) ** 0.5 / norm**0.5]
    for _ in range(iterations):
        before = best
        for step in ("a", "b"):
            candidate_a = _a_step(c4, cw4, b) if step == "a" else a
            candidate_b = _b_step(c4, cw4, a) if step == "b" else b
            value = objective(w, c, candidate_a, candidate_b)
            if value < best:
                a, b, best = candidate_a, candidate_b, value
        history.append(max(best, 0.0) ** 0.5 / norm**0.5)
        if before - best <= tolerance * before:
            break
    factors = KroneckerFactors(a.to(weight.dtype), b.to(weight.dtype), row_perm, col_perm)
    return factors, history
