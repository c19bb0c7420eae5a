"""KL-to-reference estimators and the entropy term, as separate pieces the trainer adds to the loss.

With d = ref_logp - logp (per sampled token, papers.md):
    k1 = -d                 unbiased, can be negative
    k2 = d^2 / 2            gradient -d, the usual "squared" estimator
    k3 = exp(d) - d - 1     unbiased, non-negative, low variance (Schulman's estimator)
Per-token functions return [B, T]; `kl_term` / `entropy_term` aggregate with the loss's own
`aggregate` so every term of the objective is normalised the same way. Math runs in float32
(float64 stays float64); d is clamped to [-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP] before exp.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from rlengine.losses.core import LOG_RATIO_CLAMP, aggregate


def _log_ratio(logp: Tensor, ref_logp: Tensor) -> Tensor:
    if logp.shape != ref_logp.shape:
        raise ValueError(f"KL: logp {tuple(logp.shape)} and ref_logp {tuple(ref_logp.shape)} differ in shape")
    dtype = torch.promote_types(torch.promote_types(logp.dtype, ref_logp.dtype), torch.float32)
    return ref_logp.detach().to(dtype) - logp.to(dtype)                   # d, [B, T]


def kl_k1(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k1 = -d = logp - ref_logp, per token."""
    return -_log_ratio(logp, ref_logp)


def kl_k2(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k2 = d^2 / 2, per token."""
    return 0.5 * _log_ratio(logp, ref_logp) ** 2


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k3 = exp(d) - d - 1 >= 0, per token (d clamped to +-LOG_RATIO_CLAMP)."""
    d = _log_ratio(logp, ref_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return torch.expm1(d) - d


KL_ESTIMATORS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def kl_penalty(logp: Tensor, ref_logp: Tensor, estimator: str = "k3") -> Tensor:
    """Per-token KL estimate [B, T] from the current to the reference policy."""
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; valid choices: {', '.join(KL_ESTIMATORS)}")
    return KL_ESTIMATORS[estimator](logp, ref_logp)


def kl_term(logp: Tensor, ref_logp: Tensor, mask: Tensor, estimator: str = "k3",
            agg: str = "token-mean", max_len: int | None = None) -> Tensor:
    """Aggregated KL to the reference (scalar): the trainer adds kl_coef * kl_term to the loss."""
    return aggregate(kl_penalty(logp, ref_logp, estimator), mask, agg, max_len)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of the softmax over the last dim: [..., V] -> [...] (float32 math)."""
    logits = logits.float() if logits.dtype in (torch.bfloat16, torch.float16) else logits
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def entropy_term(entropy: Tensor, mask: Tensor, agg: str = "token-mean", max_len: int | None = None) -> Tensor:
    """Aggregated per-token entropy [B, T] (scalar): the trainer subtracts entropy_coef * it."""
    return aggregate(entropy, mask, agg, max_len)
