"""Kronecker factors fitted to what a layer computes on real inputs: minimise ‖X (W − Σ Aᵢ ⊗ Bᵢ)‖_F over
calibration inputs X, known through C = XᵀX (in x in), after the permutations are applied; with a
Fisher output metric G (out x out), tr(Δᵀ C Δ G) instead, as the low-rank fit does.

Start in closed form: approximate C by its nearest Kronecker product C₁ ⊗ C₂ (split like the factors'
rows) and whiten by S₁ ⊗ S₂, which keeps the Kronecker structure, so plain Van Loan applies (G likewise,
by T₁ ⊗ T₂ on the columns). Then refine by alternating least squares: with every Bᵢ fixed the Aᵢ solve
one linear system shared by all columns of A, and vice versa. Each half-step is an exact minimiser, and
a step that would raise the objective (round-off) is not taken. The refinement is exact in C and takes
G as G₁ ⊗ G₂: then G₁ cancels from the A-step's normal equations and G₂ only weighs the inner products
of the Bᵢ, while a full G would make the A-step one system of rank·m1·n1 unknowns.

``row_scaled_factors`` is the other case: one term with B a single row (an embedding's kron(E', b)),
the metric C on W's columns and weights on its rows; there b alone is searched, in closed form for the
rest.
"""

from __future__ import annotations

import torch

from ...linalg import relative, whitening_factor
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


def objective(
    w: torch.Tensor, c: torch.Tensor, a: torch.Tensor, b: torch.Tensor, g: torch.Tensor | None = None
) -> float:
    """tr(Δᵀ C Δ) with Δ = W − Σ aᵢ ⊗ bᵢ (everything in the permuted order); tr(Δᵀ C Δ G) with ``g``."""
    m1, n1, m2, n2 = a.shape[1], a.shape[2], b.shape[1], b.shape[2]
    delta = w - torch.einsum("rac,rbd->abcd", a, b).reshape(m1 * m2, n1 * n2)
    weighted = delta if g is None else delta @ g
    return float((weighted * (c @ delta)).sum())


def _kronecker_right(w: torch.Tensor, right1: torch.Tensor, right2: torch.Tensor) -> torch.Tensor:
    """W (R₁ ⊗ R₂) without forming the Kronecker product."""
    n1, n2 = len(right1), len(right2)
    return torch.einsum("xab,ac,bd->xcd", w.reshape(-1, n1, n2), right1, right2).reshape(w.shape)


def _times(factors: torch.Tensor, metric: torch.Tensor | None) -> torch.Tensor:
    """Each factor times ``metric`` on its columns; None: the identity."""
    return factors if metric is None else factors @ metric


def _objective(
    norm: float,
    c4: torch.Tensor,
    cw4: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    g1: torch.Tensor | None = None,
    g2: torch.Tensor | None = None,
) -> float:
    """``objective`` (with G = G₁ ⊗ G₂) from tr(WᵀCWG), C and CW alone: tr(KᵀCKG) − 2 tr(KᵀCWG) +
    tr(WᵀCWG) for K = Σ aᵢ ⊗ bᵢ, without forming the residual, whose product with C costs in² x out per
    call; K G = Σ aᵢG₁ ⊗ bᵢG₂."""
    ag, bg = _times(a, g1), _times(b, g2)
    aa = torch.einsum("iac,jxc->ijax", ag, a)
    bb = torch.einsum("ibd,jed->ijbe", bg, b)
    quadratic = (torch.einsum("abxe,ijax->ijbe", c4, aa) * bb).sum()
    cross = (torch.einsum("ibd,abcd->iac", bg, cw4) * ag).sum()
    return float(norm - 2 * cross + quadratic)


def _solve(gram: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    jitter = 1e-12 * float(gram.detach().diagonal().mean().abs()) + 1e-300
    eye = torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
    return torch.linalg.solve(gram + jitter * eye, rhs)


def _a_step(c4: torch.Tensor, cw4: torch.Tensor, b: torch.Tensor, g2: torch.Tensor | None = None) -> torch.Tensor:
    """argmin over A with B fixed: L A = R with L[(i,a),(j,a')] = Σ C[a,b,a',b'] (Bᵢ G₂ Bⱼᵀ)[b,b'] and
    R[(i,a),c] = Σ (BᵢG₂)[b,d] (CW)[a,b,c,d] (both sides carry G₁ on the right, which cancels)."""
    r = b.shape[0]
    m1 = c4.shape[0]
    bg = _times(b, g2)
    bb = torch.einsum("ibd,jed->ijbe", bg, b)
    gram = torch.einsum("abxe,ijbe->iajx", c4, bb).reshape(r * m1, r * m1)
    rhs = torch.einsum("ibd,abcd->iac", bg, cw4).reshape(r * m1, -1)
    return _solve(gram, rhs).reshape(r, m1, -1)


def _b_step(c4: torch.Tensor, cw4: torch.Tensor, a: torch.Tensor, g1: torch.Tensor | None = None) -> torch.Tensor:
    """argmin over B with A fixed: H B = R with H[(i,b),(j,b')] = Σ C[a,b,a',b'] (Aᵢ G₁ Aⱼᵀ)[a,a'] and
    R[(i,b),d] = Σ (AᵢG₁)[a,c] (CW)[a,b,c,d]."""
    r = a.shape[0]
    m2 = c4.shape[1]
    ag = _times(a, g1)
    aa = torch.einsum("iac,jxc->ijax", ag, a)
    gram = torch.einsum("abxe,ijax->ibje", c4, aa).reshape(r * m2, r * m2)
    rhs = torch.einsum("iac,abcd->ibd", ag, cw4).reshape(r * m2, -1)
    return _solve(gram, rhs).reshape(r, m2, -1)


def calibrated_factors(
    weight: torch.Tensor,
    shape: KroneckerShape,
    second_moment: torch.Tensor,
    row_perm: torch.Tensor | None = None,
    col_perm: torch.Tensor | None = None,
    iterations: int = 20,
    tolerance: float = 1e-4,
    output_metric: torch.Tensor | None = None,
) -> tuple[KroneckerFactors, list[float]]:
    """Factors of W[row_perm][:, col_perm] fitted to the calibration objective, and the relative
    calibrated error after the closed-form start and after each refinement sweep. ``output_metric``: G
    (out x out, positive definite, e.g. a ridged Fisher), weighing the outputs; the errors are then
    relative in that metric, with G as the refinement takes it (G₁ ⊗ G₂)."""
    row_perm, col_perm = checked_orders(weight, shape, row_perm, col_perm)
    device = weight.device
    m1, n1, m2, n2 = shape.m1, shape.n1, shape.m2, shape.n2
    w = weight.double()[row_perm][:, col_perm]
    c = second_moment.double().to(device)[row_perm][:, row_perm]
    cw = c @ w
    g1 = g2 = None
    if output_metric is not None:
        g = output_metric.double().to(device)[col_perm][:, col_perm]
        g1, g2 = nearest_kronecker_product(g, n1, n2)
    wg = w if g1 is None else _kronecker_right(w, g1, g2)
    norm = float((wg * cw).sum())
    c4, cw4 = c.reshape(m1, m2, m1, m2), cw.reshape(m1, m2, n1, n2)

    whitened, s1, s2 = kronecker_whitened(w, c, m1, m2)
    if g1 is not None:
        t1, t2 = whitening_factor(g1), whitening_factor(g2)
        whitened = _kronecker_right(whitened, t1, t2)
    start = fit_factors(whitened, shape)
    a = torch.linalg.solve_triangular(s1.T.expand(shape.rank, m1, m1), start.a.double(), upper=True)
    b = torch.linalg.solve_triangular(s2.T.expand(shape.rank, m2, m2), start.b.double(), upper=True)
    if g1 is not None:  # ã = S₁ᵀ a T₁: undo T₁ on the right
        a = torch.linalg.solve_triangular(t1.expand(shape.rank, n1, n1), a, upper=False, left=False)
        b = torch.linalg.solve_triangular(t2.expand(shape.rank, n2, n2), b, upper=False, left=False)
    best = _objective(norm, c4, cw4, a, b, g1, g2)
    history = [relative(best, norm)]
    for _ in range(iterations):
        before = best
        for step in ("a", "b"):
            candidate_a = _a_step(c4, cw4, b, g2) if step == "a" else a
            candidate_b = _b_step(c4, cw4, a, g1) if step == "b" else b
            value = _objective(norm, c4, cw4, candidate_a, candidate_b, g1, g2)
            if value < best:
                a, b, best = candidate_a, candidate_b, value
        history.append(relative(best, norm))
        if before - best <= tolerance * before:
            break
    factors = KroneckerFactors(a.to(weight.dtype), b.to(weight.dtype), row_perm, col_perm)
    return factors, history


def _scale_trace_ratio(a4: torch.Tensor, b4: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """tr((M A Mᵀ)⁻¹ M B Mᵀ) for M = I ⊗ bᵀ with b = scale/‖scale‖ (A, B as (n, k, n, k) blocks)."""
    b = scale / scale.norm()
    ga = torch.einsum("jlmq,l,q->jm", a4, b, b)
    gb = torch.einsum("jlmq,l,q->jm", b4, b, b)
    return _solve(ga, gb).trace()


def _maximise_trace_ratio(
    a4: torch.Tensor, b4: torch.Tensor, initial: torch.Tensor, steps: int
) -> tuple[torch.Tensor, float]:
    """(b, the trace ratio there), climbing from ``initial``; b has ``factor`` numbers, so this is cheap."""
    scale = initial.to(a4).clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS([scale], max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = -_scale_trace_ratio(a4, b4, scale)
        loss.backward()
        return loss

    with torch.enable_grad():  # fits may run under no_grad
        optimizer.step(closure)
    with torch.no_grad():
        return scale.detach() / scale.norm(), float(_scale_trace_ratio(a4, b4, scale))


def _best_scale(a4: torch.Tensor, b4: torch.Tensor, start: torch.Tensor, steps: int) -> torch.Tensor:
    """The b maximising the trace ratio, climbing from ``start`` and from the generalized eigenvectors
    of the diagonal blocks' sums (the answer for a block-diagonal C)."""
    diagonal_a, diagonal_b = a4.diagonal(dim1=0, dim2=2).sum(-1), b4.diagonal(dim1=0, dim2=2).sum(-1)
    whitening = whitening_factor(diagonal_a)
    inverse = torch.linalg.inv(whitening)
    _, vectors = torch.linalg.eigh(inverse @ diagonal_b @ inverse.T)
    vectors = torch.linalg.solve_triangular(whitening.T, vectors, upper=True).T
    found = [_maximise_trace_ratio(a4, b4, initial, steps) for initial in (start.double().reshape(-1), *vectors)]
    return max(found, key=lambda pair: pair[1])[0]


def row_scaled_factors(
    weight: torch.Tensor,
    factor: int,
    column_moment: torch.Tensor,
    row_weights: torch.Tensor,
    starts: dict[str, KroneckerFactors],
    steps: int = 50,
) -> dict[str, KroneckerFactors]:
    """For each column order in ``starts`` (its b a start), W[:, col_perm] ≈ A ⊗ b, b one row of
    ``factor``, minimising Σ_v f_v Δ_v C Δ_vᵀ: C weighs W's columns (e.g. a tied head's inputs reading
    an embedding), f its rows (token frequencies).

    With b fixed, each row of A is its own least-squares fit, A = W C Mᵀ (M C Mᵀ)⁻¹ for M = I ⊗ bᵀ, and
    what is left to minimise is tr(C W_fᵀW) − tr((M C Mᵀ)⁻¹ M C W_fᵀW C Mᵀ) with W_fᵀW = Σ_v f_v W_vᵀW_v:
    a trace ratio of width x width matrices in b's ``factor`` numbers, maximised by L-BFGS. Those
    matrices are formed once and permuted for each order; W is touched once more per order, to solve A.
    Alternating least squares stalls here when C is far from isotropic."""
    rows, width = weight.shape
    n = width // factor
    w = weight.double()
    c = column_moment.double().to(w.device)
    moment = c @ (w.T @ (row_weights.double().to(w.device)[:, None] * w)) @ c
    fitted = {}
    for name, start in starts.items():
        perm = start.col_perm
        c_perm = c[perm][:, perm]
        a4 = c_perm.reshape(n, factor, n, factor)
        b4 = moment[perm][:, perm].reshape(n, factor, n, factor)
        best = _best_scale(a4, b4, start.b, steps)
        m = torch.kron(torch.eye(n, dtype=w.dtype, device=w.device), best[None])
        cm = c_perm @ m.T
        unpermuted = torch.empty_like(cm)
        unpermuted[perm] = cm  # W[:, perm] @ cm without copying W
        a = _solve(m @ cm, (w @ unpermuted).T).T
        fitted[name] = KroneckerFactors(
            a[None].to(weight.dtype),
            best.reshape(1, 1, factor).to(weight.dtype),
            torch.arange(rows, device=weight.device),
            perm,
        )
    return fitted
