"""Search for row/column permutations that make W easier to approximate by a sum of Kronecker products.

Every move below is an exact minimisation of the approximation error over a restricted set of
permutations, followed by a refit of the factors, and a move is only kept when the refit error does
not rise, so each trial's error history is non-increasing.

Moves (described for rows; columns are the same moves applied to W.T):
- ``assign``: the plain alternation — with the current approximation K fixed, the optimal row order
  is a linear assignment problem (maximise sum_i <K_i, W_p(i)>). It is a fixed point almost at once,
  because K was just fitted to the current order.
- ``slot``: with only the factor *subspace* V fixed (A free to refit), the energy captured by V is
  sum over blocks of ||sum_b Y[row at slot b, b]||^2. Re-seating the rows of one slot b across all
  blocks while the other slots stay put is again a linear assignment problem; this escapes the
  ``assign`` fixed point because rows are judged by how well they fit a block, not a fixed row of K.
- ``swap``: random pairs of rows (any slots), accepted greedily when the captured energy rises.
Starting orders: identity, spectral (sort by the leading singular vectors), cluster (greedily put
the most similar rows into one block), and random restarts; the best trial wins.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from ...linalg import check_weight, working_dtype
from .factors import KroneckerFactors, _top_singular, fit_factors, rearrange
from .shapes import KroneckerShape

STRUCTURED_STARTS = ("identity", "spectral", "cluster")


@dataclass
class Trial:
    start: str
    history: list[float]
    seconds: float
    move_gains: dict[str, float] = field(default_factory=dict)

    @property
    def error(self) -> float:
        return self.history[-1]


@dataclass
class SearchResult:
    factors: KroneckerFactors
    relative_error: float
    plain_relative_error: float
    history: list[float]  # best error so far after every accepted step, over all trials in order
    trials: list[Trial]
    seconds: float

    @property
    def best_trial(self) -> Trial:
        return min(self.trials, key=lambda t: t.error)


class _Problem:
    """One orientation of the search: rows of ``weight`` are permuted by ``p``, columns by ``q``."""

    def __init__(self, weight: torch.Tensor, shape: KroneckerShape, deadline: float | None = None):
        self.weight = weight
        self.shape = shape
        self.total = float((weight.double() ** 2).sum())
        # Moves stop early at the deadline (keeping what they improved so far), so that one move on
        # vocab-long rows cannot overrun the caller's time budget by minutes.
        self.deadline = deadline

    def out_of_time(self) -> bool:
        return self.deadline is not None and time.perf_counter() > self.deadline

    def fit(self, p: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Factor subspace V (m2*n2 x r) and the relative error of the best fit."""
        r = rearrange(self.weight[p][:, q], self.shape)
        _, s, v = _top_singular(r, self.shape.rank, randomized=False)
        captured = float((s.double() ** 2).sum())
        return v, max(self.total - captured, 0.0) ** 0.5 / max(self.total, 1e-300) ** 0.5

    def slot_features(self, q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Y[i, b] = projection of original row i onto V when seated at slot b: (M, m2, n1*r)."""
        s = self.shape
        rows = self.weight[:, q].reshape(-1, s.n1, s.n2)
        vr = v.reshape(s.m2, s.n2, s.rank)
        return torch.einsum("icd,bdr->ibcr", rows, vr).reshape(rows.shape[0], s.m2, s.n1 * s.rank)

    def assign(self, p: torch.Tensor, q: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        factors = fit_factors(self.weight, self.shape, p, q)
        score = factors.kronecker_sum() @ self.weight[:, q].T
        _, chosen = linear_sum_assignment(score.cpu().numpy(), maximize=True)
        return torch.as_tensor(chosen, device=p.device)

    def slot(self, p: torch.Tensor, q: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        m1, m2 = self.shape.m1, self.shape.m2
        v, _ = self.fit(p, q)
        y = self.slot_features(q, v)
        p = p.clone()
        seats = p.reshape(m1, m2)
        sums = y[seats, torch.arange(m2)].sum(1)  # (m1, F)
        for b in rng.permutation(m2):
            candidates = seats[:, b].clone()
            yb = y[candidates, b]
            others = sums - yb
            gain = (yb * yb).sum(1)[None, :] + 2 * others @ yb.T
            _, chosen = linear_sum_assignment(gain.cpu().numpy(), maximize=True)
            chosen = torch.as_tensor(chosen, device=p.device)
            seats[:, b] = candidates[chosen]
            sums = others + yb[chosen]
            if self.out_of_time():
                break
        return seats.reshape(-1)

    def swap(
        self, p: torch.Tensor, q: torch.Tensor, rng: np.random.Generator, rounds: int = 64, batch: int = 4096
    ) -> torch.Tensor:
        m1, m2 = self.shape.m1, self.shape.m2
        v, _ = self.fit(p, q)
        # float32 halves the memory traffic of this (memory-bound) move; the refit afterwards is exact.
        y = self.slot_features(q, v).float()
        flat = y.reshape(-1, y.shape[-1])  # row i at slot b -> flat[i * m2 + b]
        slots = torch.arange(m2).repeat(m1)
        blocks = torch.arange(m1).repeat_interleave(m2)
        sums = y[p.reshape(m1, m2), torch.arange(m2)].sum(1)
        n = p.numel()
        # Wide rows (an embedding's columns are vocab-long) get fewer pairs per round to bound memory.
        batch = max(64, min(batch, (1 << 24) // flat.shape[1]))
        # Small sides get every pair each round; large ones a random sample of pairs.
        all_pairs = torch.triu_indices(n, n, 1) if n * (n - 1) // 2 <= batch else None
        for _ in range(rounds):
            if self.out_of_time():
                break
            if all_pairs is not None:
                i, j = all_pairs
            else:
                i = torch.as_tensor(rng.integers(0, n, batch))
                j = torch.as_tensor(rng.integers(0, n, batch))
                keep = i != j
                i, j = i[keep], j[keep]
            bi, bj, ai, aj = slots[i], slots[j], blocks[i], blocks[j]
            pi, pj = p[i] * m2, p[j] * m2
            same = ai == aj
            # Change of block a_i's sum, and of a_j's when the pair sits in two different blocks.
            d_j = flat.index_select(0, pi + bj) - flat.index_select(0, pj + bj)
            d_i = flat.index_select(0, pj + bi) - flat.index_select(0, pi + bi)
            d_i[same] += d_j[same]
            delta = (d_i * (d_i + 2 * sums.index_select(0, ai))).sum(1)
            cross = (d_j * (d_j + 2 * sums.index_select(0, aj))).sum(1)
            delta += cross.masked_fill_(same, 0)
            improving = torch.nonzero(delta > 1e-7 * self.total).squeeze(1)
            if improving.numel() == 0:
                break
            improving = improving[torch.argsort(delta[improving], descending=True)]
            used: set[int] = set()
            order = p.numpy().copy()
            for k_i, k_j, b_i, b_j in zip(
                i[improving].tolist(),
                j[improving].tolist(),
                ai[improving].tolist(),
                aj[improving].tolist(),
                strict=True,
            ):
                if b_i in used or b_j in used:
                    continue
                used.update((b_i, b_j))
                order[k_i], order[k_j] = order[k_j], order[k_i]
            p = torch.as_tensor(order)
            touched = torch.tensor(sorted(used))
            sums[touched] = y[p.reshape(m1, m2)[touched], torch.arange(m2)].sum(1)
        return p

    def spectral_order(self) -> torch.Tensor:
        """Rows sorted by the leading left singular vector (from the smaller Gram matrix: deterministic)."""
        w = self.weight
        if w.shape[0] <= w.shape[1]:
            leading = torch.linalg.eigh(w @ w.T).eigenvectors[:, -1]
        else:
            leading = w @ torch.linalg.eigh(w.T @ w).eigenvectors[:, -1]
        return torch.argsort(leading)

    def cluster_order(self) -> torch.Tensor:
        """Seed blocks with the largest rows and fill each with the seed's most similar free rows."""
        m2 = self.shape.m2
        norms = self.weight.norm(dim=1)
        unit = self.weight / norms.clamp_min(1e-30).unsqueeze(1)
        similarity = unit @ unit.T
        free = torch.ones(len(norms), dtype=torch.bool)
        order = []
        for seed in torch.argsort(norms, descending=True).tolist():
            if not free[seed]:
                continue
            free[seed] = False
            scores = similarity[seed].masked_fill(~free, -torch.inf)
            mates = torch.topk(scores, m2 - 1).indices.tolist() if m2 > 1 else []
            free[mates] = False
            order += [seed, *mates]
        return torch.as_tensor(order)


def _start(name: str, problem: _Problem, side: bool, size: int, rng: np.random.Generator) -> torch.Tensor:
    if not side or name == "identity":
        return torch.arange(size)
    if name == "spectral":
        return problem.spectral_order()
    if name == "cluster":
        return problem.cluster_order()
    if name == "random":
        return torch.as_tensor(rng.permutation(size))
    raise ValueError(f"unknown starting order {name!r}; use identity, spectral, cluster or random")


def search_permutations(
    weight: torch.Tensor,
    shape: KroneckerShape,
    *,
    rows: bool = True,
    cols: bool = True,
    iterations: int = 10,
    restarts: int = 0,
    starts: tuple[str, ...] = STRUCTURED_STARTS,
    moves: tuple[str, ...] = ("assign", "slot", "swap"),
    tolerance: float = 1e-4,
    seed: int = 0,
    time_budget: float | None = None,
) -> SearchResult:
    """Find permutations p, q minimising ||W[p][:, q] - sum_i A_i ⊗ B_i||_F, and the factors.

    ``rows``/``cols`` switch each side on or off (both off is the plain Kronecker fit). A side whose
    block size is 1 (m2 = 1 for rows, n2 = 1 for columns) is skipped because reordering it cannot
    change the error. Each starting order (plus ``restarts`` random ones) is improved by rounds of the
    ``moves`` until a round gains less than ``tolerance`` (relative) or ``time_budget`` seconds pass.
    """
    check_weight(weight)
    shape.check_matrix(*weight.shape)
    unknown = set(moves) - {"assign", "slot", "swap"}
    if unknown:
        raise ValueError(f"unknown moves {sorted(unknown)}; use assign, slot, swap")
    if iterations < 0 or restarts < 0:
        raise ValueError("iterations and restarts must be non-negative")
    began = time.perf_counter()
    deadline = None if time_budget is None else began + time_budget

    rng = np.random.default_rng(seed)
    work = weight.detach().to("cpu", working_dtype(weight))
    row_problem = _Problem(work, shape, deadline)
    col_problem = _Problem(work.T, shape.transpose(), deadline)
    rows = rows and shape.m2 > 1
    cols = cols and shape.n2 > 1
    M, N = work.shape

    identity = (torch.arange(M), torch.arange(N))
    _, plain_error = row_problem.fit(*identity)
    all_starts = list(dict.fromkeys(starts)) if (rows or cols) else ["identity"]
    all_starts += ["random"] * (restarts if (rows or cols) else 0)

    trials: list[Trial] = []
    best = (plain_error, *identity)
    history = [plain_error]
    for name in all_starts:
        if trials and row_problem.out_of_time():
            break
        t0 = time.perf_counter()
        p = _start(name, row_problem, rows, M, rng)
        q = _start(name, col_problem, cols, N, rng)
        _, error = row_problem.fit(p, q)
        trial = Trial(name, [error], 0.0)
        for _ in range(iterations):
            round_start = error
            for move in moves:
                for side, problem in (("rows", row_problem), ("cols", col_problem)):
                    if not (rows if side == "rows" else cols):
                        continue
                    if side == "rows":
                        p_new, q_new = getattr(problem, move)(p, q, rng), q
                    else:
                        q_new, p_new = getattr(problem, move)(q, p, rng), p
                    _, new_error = row_problem.fit(p_new, q_new)
                    if new_error <= error:
                        trial.move_gains[move] = trial.move_gains.get(move, 0.0) + error - new_error
                        p, q, error = p_new, q_new, new_error
                        trial.history.append(error)
                    if row_problem.out_of_time():
                        break
                if row_problem.out_of_time():
                    break
            if round_start - error <= tolerance * max(round_start, 1e-30) or row_problem.out_of_time():
                break
        trial.seconds = time.perf_counter() - t0
        trials.append(trial)
        if error < best[0]:
            best = (error, p, q)
        history += [min(history[-1], e) for e in trial.history]

    factors = fit_factors(weight.detach(), shape, best[1].to(weight.device), best[2].to(weight.device))
    return SearchResult(
        factors=factors,
        relative_error=factors.relative_error(weight),
        plain_relative_error=plain_error,
        history=history,
        trials=trials,
        seconds=time.perf_counter() - began,
    )
