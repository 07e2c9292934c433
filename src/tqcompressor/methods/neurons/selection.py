"""Which inner units of an MLP to keep: greedy forward selection on the output error a least-squares
refit of the output projection leaves.

With h the inner activations (C = Σ h hᵀ, n x n) and W (n x out) the output projection, keeping the
units K and refitting W on them, W' = C_KK⁻¹ C_K: W, leaves the output error tr(Wᵀ S W M), where
S = C − C_:K C_KK⁻¹ C_K: is the Schur complement of the kept block and M the metric of the outputs (I,
or the Fisher's output second moment). Adding unit j to K subtracts s sᵀ / s_jj from S (s = S[:, j]),
which lowers the error by sᵀ P s / s_jj, P = W M Wᵀ: the step takes the unit that lowers it most. A
unit that is a linear combination of kept ones has s = 0 and never adds anything, which is why the
order beats ranking units alone (E[h_j²] ‖W_j‖², blind to what the others already carry): 5.7% lower
block error than that score on SmolLM2's MLPs, where the score was 4.8% below low-rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Selection:
    order: torch.Tensor  # unit indices, in the order greedy selection keeps them
    # After keeping the first k units (k = 0..len(order)): tr(Wᵀ S W) / tr(Wᵀ C W), the relative squared
    # output error, and tr(Wᵀ S W M), the error under the output metric (equal to the first's numerator
    # without one).
    relative: torch.Tensor
    weighted: torch.Tensor


def forward_selection(
    second_moment: torch.Tensor,
    weight: torch.Tensor,
    count: int,
    output_metric: torch.Tensor | None = None,
    block: int = 1,
) -> Selection:
    """The first ``count`` units greedy selection keeps, chosen on the error under ``output_metric`` (M,
    out x out; None: the identity). ``second_moment``: C of the units (n x n); ``weight``: W (n x out).

    ``block`` > 1 takes that many units a step, the best by their gains at its start, kept one after the
    other (a unit the ones before it in the step carry adds nothing): a step costs one pass over S and
    two rank-``block`` products instead of ``block`` passes (the passes are most of the time on a 5632-wide
    MLP). The errors stay exact for the order taken."""
    n = second_moment.shape[0]
    if not 0 <= count <= n:
        raise ValueError(f"cannot keep {count} of {n} units")
    if block < 1:
        raise ValueError(f"a step takes at least one unit, got {block}")
    s = second_moment.detach().double().clone()
    w = weight.detach().double()
    plain = w @ w.T
    p = plain if output_metric is None else w @ output_metric.double() @ w.T
    r = s @ p  # S P, kept in step with S
    # A unit whose variance left is below this carries nothing new: never worth a division by it.
    floor = 1e-12 * float(s.diagonal().abs().max().clamp_min(torch.finfo(torch.float64).tiny))
    live = torch.arange(n)  # the units not kept yet: S is zero on the kept ones' rows and columns
    kept = torch.zeros(n, dtype=torch.bool)
    order = torch.empty(count, dtype=torch.long)
    weighted = torch.empty(count + 1, dtype=torch.float64)
    unweighted = torch.empty(count + 1, dtype=torch.float64)
    weighted[0], unweighted[0] = r.diagonal().sum(), (s * plain).sum()
    step, since = 0, 0
    while step < count:
        if since >= max(32, len(live) // 16):  # work on what is left alone: steps get cheaper as units are kept
            rest = (~kept[live]).nonzero().squeeze(1)
            live, s, r, p, plain = (m[rest][:, rest] if m.dim() == 2 else m[rest] for m in (live, s, r, p, plain))
            since = 0
        taken = min(block, count - step)
        pivot = s.diagonal()
        gain = (r * s).sum(1) / pivot.clamp_min(floor)
        gain[pivot <= floor] = -1.0  # a carried unit only once every informative one is kept
        gain[kept[live]] = -2.0
        picks = gain.topk(taken).indices
        # The Cholesky columns of S's panel at the picks, each after the ones before it: S loses L Lᵀ.
        panel = s[:, picks]
        factor = torch.zeros_like(panel)
        for i, j in enumerate(picks.tolist()):
            column = panel[:, i] - factor[:, :i] @ factor[j, :i]
            if column[j] > floor:
                factor[:, i] = column / column[j].sqrt()
        metric_factor = p @ factor
        weighted[step + 1 : step + taken + 1] = weighted[step] - (factor * metric_factor).sum(0).cumsum(0)
        plain_factor = metric_factor if p is plain else plain @ factor
        unweighted[step + 1 : step + taken + 1] = unweighted[step] - (factor * plain_factor).sum(0).cumsum(0)
        r -= factor @ metric_factor.T
        s -= factor @ factor.T
        order[step : step + taken] = live[picks]
        kept[live[picks]] = True
        step, since = step + taken, since + taken
    reference = float(unweighted[0])
    relative = unweighted.clamp_min(0) / reference if reference > 0 else torch.zeros_like(unweighted)
    return Selection(order, relative, weighted.clamp_min(0))


def refit(second_moment: torch.Tensor, weight: torch.Tensor, kept: torch.Tensor, ridge: float = 1e-9) -> torch.Tensor:
    """The output projection's rows for the ``kept`` units, C_KK⁻¹ C_K: W: the least-squares fit of the
    full output on them (``ridge``: of the mean diagonal, against units that are exact combinations)."""
    c = second_moment.double()
    block = c[kept][:, kept]
    block = block + ridge * float(block.diagonal().mean().clamp_min(0)) * torch.eye(len(kept), dtype=c.dtype)
    return torch.linalg.solve(block, c[kept] @ weight.double())
