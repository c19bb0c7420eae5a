"""Pass@k and Avg@k against exact combinatorics and brute-force enumeration.

Tolerances (float64): pass_at_k multiplies c factors (1 - k / i), two roundings each, so the miss
probability carries <= c ulps relative and, being <= 1, 1 - miss is off by <= (c + 1) eps64
absolute; a reference ratio of exact integers rounds once more. pass_abs(c) = 2 (c + 1) eps64. A
mean over p problems adds <= p + 1 roundings of values <= 1.
"""
import itertools
import math

import pytest
import torch

from rlengine.metrics import avg_at_k, mean_pass_at_k, pass_at_k, summarize

EPS64 = torch.finfo(torch.float64).eps


def pass_abs(c: int) -> float:
    return 2 * (c + 1) * EPS64


@pytest.mark.parametrize("n, c, k", [(10, 3, 1), (10, 3, 5), (32, 1, 32), (32, 0, 8), (16, 15, 2), (64, 5, 32), (5, 5, 3)])
def test_pass_at_k_matches_binomials(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), abs=pass_abs(c))


def test_pass_at_k_by_enumeration():
    samples = [1, 0, 0, 1, 0, 0]                                   # n = 6, c = 2
    for k in range(1, 7):
        subsets = list(itertools.combinations(samples, k))
        brute = sum(any(s) for s in subsets) / len(subsets)
        assert pass_at_k(6, 2, k) == pytest.approx(brute, abs=pass_abs(2))


def test_pass_at_1_is_accuracy_and_edges():
    assert pass_at_k(8, 3, 1) == pytest.approx(3 / 8, abs=pass_abs(3))
    assert pass_at_k(8, 0, 8) == 0.0 and pass_at_k(8, 1, 8) == 1.0
    assert pass_at_k(10_000, 1, 5_000) == pytest.approx(0.5, abs=pass_abs(1))     # no overflow with big n
    for bad in [(4, 5, 1), (4, 1, 5), (4, 1, 0), (0, 0, 1)]:
        with pytest.raises(ValueError):
            pass_at_k(*bad)


def test_avg_and_mean_pass_at_k():
    per_problem = [[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0], [2.0, 0.25, 1.5, 0.0]]
    p, c_max = len(per_problem), 4
    # means of p = 4 values <= 1: the per-problem roundings (PASS_ABS, or one division for avg@k) and
    # p + 1 more for the sum and the division
    assert avg_at_k(per_problem) == pytest.approx((0.25 + 1 + 0 + 0.5) / 4, abs=2 * (p + 1) * EPS64)  # >= 1.0 counts as correct
    assert mean_pass_at_k(per_problem, 2) == pytest.approx(
        (pass_at_k(4, 1, 2) + 1.0 + 0.0 + pass_at_k(4, 2, 2)) / 4, abs=2 * (p + 1) * EPS64)
    s = summarize(per_problem, ks=(1, 2, 8))
    assert set(s) == {"avg@4", "pass@1", "pass@2"}
    assert s["pass@1"] == pytest.approx(s["avg@4"], abs=pass_abs(c_max) + 2 * (p + 1) * EPS64)
