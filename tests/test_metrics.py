"""Pass@k and Avg@k against exact combinatorics and brute-force enumeration."""
import itertools
import math

import pytest

from rlengine.metrics import avg_at_k, mean_pass_at_k, pass_at_k, summarize


@pytest.mark.parametrize("n, c, k", [(10, 3, 1), (10, 3, 5), (32, 1, 32), (32, 0, 8), (16, 15, 2), (64, 5, 32), (5, 5, 3)])
def test_pass_at_k_matches_binomials(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), rel=1e-12, abs=1e-12)


def test_pass_at_k_by_enumeration():
    samples = [1, 0, 0, 1, 0, 0]                                   # n = 6, c = 2
    for k in range(1, 7):
        subsets = list(itertools.combinations(samples, k))
        brute = sum(any(s) for s in subsets) / len(subsets)
        assert pass_at_k(6, 2, k) == pytest.approx(brute)


def test_pass_at_1_is_accuracy_and_edges():
    assert pass_at_k(8, 3, 1) == pytest.approx(3 / 8)
    assert pass_at_k(8, 0, 8) == 0.0 and pass_at_k(8, 1, 8) == 1.0
    assert pass_at_k(10_000, 1, 5_000) == pytest.approx(0.5)     # no overflow with big n
    for bad in [(4, 5, 1), (4, 1, 5), (4, 1, 0), (0, 0, 1)]:
        with pytest.raises(ValueError):
            pass_at_k(*bad)


def test_avg_and_mean_pass_at_k():
    per_problem = [[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0], [2.0, 0.25, 1.5, 0.0]]
    assert avg_at_k(per_problem) == pytest.approx((0.25 + 1 + 0 + 0.5) / 4)  # >= 1.0 counts as correct
    assert mean_pass_at_k(per_problem, 2) == pytest.approx(
        (pass_at_k(4, 1, 2) + 1.0 + 0.0 + pass_at_k(4, 2, 2)) / 4)
    s = summarize(per_problem, ks=(1, 2, 8))
    assert set(s) == {"avg@4", "pass@1", "pass@2"}
    assert s["pass@1"] == pytest.approx(s["avg@4"])
