"""Factor shapes of Kronecker approximations: valid factorisations and a proposal from a target ratio.

Conventions used across the package: a weight matrix is W with shape (in_features, out_features),
approximated by ``sum_i A_i ⊗ B_i`` with A_i of shape (m1, n1) and B_i of shape (m2, n2), so that
in_features = m1 * m2 and out_features = n1 * n2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class KroneckerShape:
    m1: int
    n1: int
    m2: int
    n2: int
    rank: int = 1

    def __post_init__(self) -> None:
        for name in ("m1", "n1", "m2", "n2", "rank"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Kronecker shape field {name} must be a positive integer, got {value!r}")
        if self.rank > self.max_rank:
            raise ValueError(
                f"rank {self.rank} exceeds the largest possible rank {self.max_rank} for factors "
                f"{self.m1}x{self.n1} and {self.m2}x{self.n2}"
            )

    @property
    def in_features(self) -> int:
        return self.m1 * self.m2

    @property
    def out_features(self) -> int:
        return self.n1 * self.n2

    @property
    def max_rank(self) -> int:
        # The rearranged matrix is (m1*n1) x (m2*n2); its rank bounds the number of useful terms.
        return min(self.m1 * self.n1, self.m2 * self.n2)

    @property
    def num_params(self) -> int:
        return self.rank * (self.m1 * self.n1 + self.m2 * self.n2)

    def transpose(self) -> KroneckerShape:
        """Shape of the factors of W.T (A.T ⊗ B.T = (A ⊗ B).T)."""
        return KroneckerShape(self.n1, self.m1, self.n2, self.m2, self.rank)

    def check_matrix(self, rows: int, cols: int) -> None:
        if (rows, cols) != (self.in_features, self.out_features):
            raise ValueError(
                f"factor shapes A {self.m1}x{self.n1}, B {self.m2}x{self.n2} give a "
                f"{self.in_features}x{self.out_features} matrix, but the weight is {rows}x{cols}"
            )

    def describe(self) -> str:
        return f"r={self.rank} A {self.m1}x{self.n1} B {self.m2}x{self.n2}"


def divisors(n: int) -> list[int]:
    if n < 1:
        raise ValueError(f"cannot factor a dimension of size {n}")
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def valid_factorizations(in_features: int, out_features: int) -> list[tuple[int, int, int, int]]:
    """All (m1, n1, m2, n2) with m1*m2 = in_features and n1*n2 = out_features."""
    return [
        (in_features // m2, out_features // n2, m2, n2) for m2 in divisors(in_features) for n2 in divisors(out_features)
    ]


def propose_kronecker_shape(
    in_features: int, out_features: int, ratio: float, max_rank: int = 4, tolerance: float = 0.1
) -> KroneckerShape:
    """Propose factor shapes whose parameter count is closest to ``ratio`` of the dense matrix.

    The rule, in the paper's spirit (a large A, a small B, a few terms): take the highest rank
    up to ``max_rank`` for which some (m2, n2) lands within ``tolerance`` of the budget; among equally
    close candidates prefer a B whose aspect follows the matrix's (in/out), then the squarer B.
    """
    if not 0 < ratio <= 1:
        raise ValueError(f"compression ratio must be in (0, 1], got {ratio}")
    target = ratio * in_features * out_features
    aspect = math.log(in_features / out_features)
    for rank in range(max_rank, 0, -1):
        best: tuple[float, float, float, KroneckerShape] | None = None
        for m1, n1, m2, n2 in valid_factorizations(in_features, out_features):
            if rank > min(m1 * n1, m2 * n2):
                continue
            shape = KroneckerShape(m1, n1, m2, n2, rank)
            key = (
                round(abs(math.log(shape.num_params / target)), 6),
                round(abs(math.log(m2 / n2) - aspect), 6),
                round(abs(math.log(m2 / n2)), 6),
                shape,
            )
            if best is None or key[:3] < best[:3]:
                best = key
        if best is not None and best[0] <= math.log1p(tolerance):
            return best[3]
    raise ValueError(
        f"no Kronecker factorisation of a {in_features}x{out_features} matrix with rank <= {max_rank} "
        f"comes within {tolerance:.0%} of ratio {ratio}"
    )
