"""Evaluation metrics over k samples per problem: Avg@k and the unbiased Pass@k estimator.

  pass_at_k(n, c, k) = 1 - C(n-c, k) / C(n, k)   (n samples, c correct, k <= n; Chen et al. 2021)
  Avg@k              = mean over problems of the fraction of correct samples
Computed as a product (no huge binomials): C(n-c, k)/C(n, k) = prod_{i=n-c+1}^{n} (1 - k/i).
"""
from __future__ import annotations

from typing import Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples (drawn without replacement from n, c correct) is correct."""
    if not (isinstance(n, int) and isinstance(c, int) and isinstance(k, int)):
        raise TypeError(f"n, c, k must be integers, got {n!r}, {c!r}, {k!r}")
    if n < 1 or not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need n >= 1, 0 <= c <= n, 1 <= k <= n; got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def _correct_counts(per_problem: Sequence[Sequence[float]], threshold: float) -> list[tuple[int, int]]:
    out = []
    for i, scores in enumerate(per_problem):
        if len(scores) == 0:
            raise ValueError(f"problem {i} has no samples")
        out.append((len(scores), sum(1 for s in scores if float(s) >= threshold)))
    return out


def avg_at_k(per_problem: Sequence[Sequence[float]], threshold: float = 1.0) -> float:
    """Mean over problems of the share of samples scoring >= threshold (1.0: a correct answer)."""
    counts = _correct_counts(per_problem, threshold)
    if not counts:
        raise ValueError("no problems")
    return sum(c / n for n, c in counts) / len(counts)


def mean_pass_at_k(per_problem: Sequence[Sequence[float]], k: int, threshold: float = 1.0) -> float:
    """Pass@k averaged over problems (each problem needs at least k samples)."""
    counts = _correct_counts(per_problem, threshold)
    if not counts:
        raise ValueError("no problems")
    return sum(pass_at_k(n, c, k) for n, c in counts) / len(counts)


def summarize(per_problem: Sequence[Sequence[float]], ks: Sequence[int] = (1,), threshold: float = 1.0) -> dict[str, float]:
    """{"avg@n": ..., "pass@k": ... for each k <= the fewest samples of any problem}."""
    n_min = min(len(s) for s in per_problem)
    out = {f"avg@{n_min}": avg_at_k(per_problem, threshold)}
    for k in ks:
        if k <= n_min:
            out[f"pass@{k}"] = mean_pass_at_k(per_problem, k, threshold)
    return out
