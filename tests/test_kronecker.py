import pytest
import torch
from conftest import planted_matrix

from tqcompressor import (
    KroneckerShape,
    fit_factors,
    nearest_kronecker,
    propose_kronecker_shape,
    truncated_svd,
    valid_factorizations,
)
from tqcompressor.methods.kronecker import rearrange
from tqcompressor.methods.lowrank import rank_for_params


def test_rearrangement_maps_a_kronecker_product_to_a_rank_one_matrix():
    a, b = torch.randn(3, 4, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64)
    r = rearrange(torch.kron(a, b), KroneckerShape(3, 4, 2, 5))
    torch.testing.assert_close(r, torch.outer(a.reshape(-1), b.reshape(-1)))


@pytest.mark.parametrize("rank", [1, 3])
def test_unpermuted_sum_of_kroneckers_is_recovered_exactly(rank):
    shape = KroneckerShape(6, 4, 3, 5, rank)
    w, _ = planted_matrix(shape, seed=rank, rows=False, cols=False)
    factors = nearest_kronecker(w, shape)
    assert factors.relative_error(w) < 1e-12
    assert factors.a.shape == (rank, 6, 4) and factors.b.shape == (rank, 3, 5)


def test_truncation_error_matches_discarded_singular_values():
    w = torch.randn(12, 20, dtype=torch.float64)
    shape = KroneckerShape(4, 5, 3, 4, rank=2)
    s = torch.linalg.svdvals(rearrange(w, shape))
    expected = float((s[2:] ** 2).sum().sqrt() / torch.linalg.norm(w))
    assert abs(nearest_kronecker(w, shape).relative_error(w) - expected) < 1e-12


def test_tall_rearrangement_uses_the_same_optimum_as_full_svd():
    w = torch.randn(256, 64, dtype=torch.float64)
    shape = KroneckerShape(128, 16, 2, 4, rank=4)  # rearranged: 2048 x 8, takes the Gram path
    s = torch.linalg.svdvals(rearrange(w, shape))
    expected = float((s[4:] ** 2).sum().sqrt() / torch.linalg.norm(w))
    assert abs(nearest_kronecker(w, shape).relative_error(w) - expected) < 1e-10


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_input_returns_input_dtype(dtype):
    w = torch.randn(8, 8).to(dtype)
    factors = nearest_kronecker(w, KroneckerShape(4, 4, 2, 2, 2))
    assert factors.a.dtype == dtype and factors.b.dtype == dtype
    assert factors.relative_error(w) < 1.0


def test_truncated_svd_matches_eckart_young():
    w = torch.randn(30, 20, dtype=torch.float64)
    s = torch.linalg.svdvals(w)
    factors = truncated_svd(w, 5)
    assert factors.num_params == 5 * 50
    assert abs(factors.relative_error(w) - float((s[5:] ** 2).sum().sqrt() / s.norm())) < 1e-12


def test_valid_factorizations_cover_all_divisor_pairs():
    shapes = valid_factorizations(6, 4)
    assert len(shapes) == 4 * 3
    assert all(m1 * m2 == 6 and n1 * n2 == 4 for m1, n1, m2, n2 in shapes)


def test_proposed_shape_follows_the_papers_gpt2_mlp_choice():
    shape = propose_kronecker_shape(768, 3072, ratio=0.5, max_rank=4)
    assert (shape.m2, shape.n2, shape.rank) == (2, 4, 4)
    assert abs(shape.num_params / (768 * 3072) - 0.5) < 0.01
    assert (propose_kronecker_shape(3072, 768, 0.5).m2, propose_kronecker_shape(3072, 768, 0.5).n2) == (4, 2)


@pytest.mark.parametrize("ratio", [0.5, 0.25, 0.125])
def test_proposed_shape_lands_near_the_budget(ratio):
    shape = propose_kronecker_shape(768, 768, ratio)
    assert abs(shape.num_params / (768 * 768) - ratio) / ratio < 0.1
    rank = rank_for_params(768, 768, shape.num_params)
    assert abs(rank * 1536 - shape.num_params) <= 768


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="768x768"):
        fit_factors(torch.randn(768, 768), KroneckerShape(5, 5, 2, 2))
    with pytest.raises(ValueError, match="largest possible rank"):
        KroneckerShape(2, 2, 1, 1, rank=2)
    bad = torch.randn(4, 4)
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        nearest_kronecker(bad, KroneckerShape(2, 2, 2, 2))
    with pytest.raises(ValueError, match="ratio"):
        propose_kronecker_shape(8, 8, 1.5)
    with pytest.raises(ValueError, match="no Kronecker factorisation"):
        propose_kronecker_shape(7, 11, 0.3, max_rank=1, tolerance=0.01)
    with pytest.raises(ValueError, match="rank must be between"):
        truncated_svd(torch.randn(4, 6), 5)
