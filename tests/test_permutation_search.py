import math
import time

import numpy as np
import pytest
import torch
from conftest import SlowClock, planted_matrix

from tqcompressor import KroneckerShape, nearest_kronecker, search_permutations
from tqcompressor.methods.kronecker import search as search_module
from tqcompressor.methods.kronecker.search import _Problem


@pytest.mark.parametrize(
    ("dims", "seed"),
    [((16, 16, 2, 2, 1), 0), ((16, 16, 2, 2, 1), 1), ((6, 4, 2, 3, 1), 3), ((8, 8, 2, 2, 1), 2)],
)
def test_planted_row_and_column_permutations_are_recovered(dims, seed):
    shape = KroneckerShape(*dims)
    w, _ = planted_matrix(shape, seed)
    plain = nearest_kronecker(w, shape).relative_error(w)
    result = search_permutations(w, shape, iterations=30, restarts=4, seed=seed)
    assert plain > 0.3, "the planted permutations must hide the structure from the plain fit"
    assert result.relative_error < 1e-5
    # The recovered permutations reproduce W itself from the stored factors.
    torch.testing.assert_close(result.factors.reconstruct(), w, atol=1e-8, rtol=0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_planted_row_permutation_with_two_terms_is_recovered(seed):
    shape = KroneckerShape(32, 32, 2, 4, rank=2)
    w, _ = planted_matrix(shape, seed, rows=True, cols=False)
    result = search_permutations(w, shape, cols=False, iterations=30, restarts=2, seed=seed)
    assert result.plain_relative_error > 0.3
    assert result.relative_error < 1e-5
    assert torch.equal(result.factors.col_perm, torch.arange(128))


def test_without_permutations_the_planted_matrix_is_not_recovered():
    shape = KroneckerShape(16, 16, 2, 2, 1)
    w, _ = planted_matrix(shape, seed=0)
    result = search_permutations(w, shape, rows=False, cols=False)
    assert result.relative_error > 0.3
    assert result.relative_error == pytest.approx(nearest_kronecker(w, shape).relative_error(w), abs=1e-9)
    assert len(result.trials) == 1 and result.trials[0].start == "identity"


def _structured(seed: int) -> torch.Tensor:
    # Low-rank plus noise plus a few large rows: closer to trained weights than pure noise.
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(48, 8, generator=g) @ torch.randn(8, 64, generator=g) + 0.3 * torch.randn(48, 64, generator=g)
    w[torch.randint(0, 48, (3,), generator=g)] *= 8
    return w


@pytest.mark.parametrize("matrix", ["random", "structured"])
@pytest.mark.parametrize("dims", [(24, 16, 2, 4, 2), (12, 32, 4, 2, 1), (48, 16, 1, 4, 1)])
def test_history_is_non_increasing_and_never_worse_than_plain(matrix, dims):
    shape = KroneckerShape(*dims)
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(1)) if matrix == "random" else _structured(2)
    result = search_permutations(w, shape, iterations=5, restarts=1, seed=0)
    for trial in result.trials:
        assert all(b <= a + 1e-12 for a, b in zip(trial.history, trial.history[1:], strict=False))
    assert all(b <= a for a, b in zip(result.history, result.history[1:], strict=False))
    assert result.relative_error <= result.plain_relative_error + 1e-6
    assert result.history[-1] == pytest.approx(result.relative_error, abs=1e-6)
    if shape.m2 == 1:  # a one-row block makes the row order irrelevant, so rows stay put
        assert torch.equal(result.factors.row_perm, torch.arange(48))


def test_rows_only_and_columns_only_leave_the_other_side_alone():
    w = _structured(3)
    shape = KroneckerShape(24, 16, 2, 4, 2)
    rows_only = search_permutations(w, shape, cols=False, iterations=3)
    cols_only = search_permutations(w, shape, rows=False, iterations=3)
    assert torch.equal(rows_only.factors.col_perm, torch.arange(64))
    assert torch.equal(cols_only.factors.row_perm, torch.arange(48))


def test_search_is_reproducible_for_a_seed_and_respects_the_time_budget():
    w = _structured(4)
    shape = KroneckerShape(24, 16, 2, 4, 2)
    first = search_permutations(w, shape, restarts=2, seed=7)
    second = search_permutations(w, shape, restarts=2, seed=7)
    assert torch.equal(first.factors.row_perm, second.factors.row_perm)
    assert first.history == second.history
    quick = search_permutations(w, shape, restarts=50, iterations=50, time_budget=0.0)
    assert len(quick.trials) == 1


def test_without_a_time_limit_the_search_does_not_depend_on_the_clock(monkeypatch):
    w = _structured(4)
    shape = KroneckerShape(24, 16, 2, 4, 2)
    steady = search_permutations(w, shape, restarts=1, seed=3, time_budget=math.inf)
    monkeypatch.setattr(search_module, "time", SlowClock())
    busy = search_permutations(w, shape, restarts=1, seed=3, time_budget=math.inf)
    assert torch.equal(busy.factors.row_perm, steady.factors.row_perm)
    assert torch.equal(busy.factors.col_perm, steady.factors.col_perm)
    assert busy.history == steady.history and len(busy.trials) == 4
    limited = search_permutations(w, shape, restarts=1, seed=3, time_budget=60.0)
    assert len(limited.trials) == 1 and len(limited.history) < len(steady.history)


def test_moves_stop_at_the_deadline_and_keep_the_order_valid():
    # One move on vocab-long rows once overran its budget by minutes: each move must check the clock.
    w = _structured(5)
    shape = KroneckerShape(24, 16, 2, 4, 2)
    scrambled = torch.randperm(48, generator=torch.Generator().manual_seed(0))
    identity = torch.arange(64)
    rng = np.random.default_rng(0)
    unlimited = _Problem(w, shape)
    expired = _Problem(w, shape, deadline=time.perf_counter() - 1.0)
    assert not torch.equal(unlimited.swap(scrambled, identity, rng), scrambled)
    assert torch.equal(expired.swap(scrambled, identity, rng), scrambled)
    # ``slot`` re-seats at most one slot before it notices the deadline.
    moved = expired.slot(scrambled, identity, rng).reshape(24, 2)
    unchanged_slots = (moved == scrambled.reshape(24, 2)).all(0)
    assert unchanged_slots.any()
    assert torch.equal(moved.flatten().sort().values, torch.arange(48))


def test_search_rejects_bad_options():
    w = torch.randn(8, 8)
    with pytest.raises(ValueError, match="unknown moves"):
        search_permutations(w, KroneckerShape(4, 4, 2, 2), moves=("teleport",))
    with pytest.raises(ValueError, match="unknown starting order"):
        search_permutations(w, KroneckerShape(4, 4, 2, 2), starts=("psychic",))
    with pytest.raises(ValueError, match="8x8"):
        search_permutations(w, KroneckerShape(4, 4, 3, 2))
