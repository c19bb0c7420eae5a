"""Off-policy correction: the one layer between the behaviour policy and the loss. Pure tensor math.

The sampler's per-token log-probs are the behaviour policy mu (possibly several weight versions old
with `rollout.max_staleness` >= 1, and never bit-equal to the trainer's kernels even when fresh);
the trainer's recomputation before the update is pi_old. With log rho_t = log pi_old_t - log mu_t:

    level token      rho_t                         one weight per token
    level sequence   exp(sum_t log rho_t)          one weight per response (the true IS ratio)
    level geometric  exp(mean_t log rho_t)         one weight per response, length-neutral

    none   w = 1
    tis    w = min(rho, high)                      truncated IS: bounded variance, every token kept
    mis    w = rho where low <= rho <= high;       masked IS: tokens (token level) or whole
           outside, the token / response leaves    responses (sequence, geometric) outside the
           the loss mask                           bounds are dropped, not clipped

The contract with every loss, written here only: the loss receives the corrected advantages
A_t * w_t (detached, per token) and the loss mask without the masked tokens; its ratio stays
pi_theta / pi_old. Every loss in the zoo is linear in A per token and w >= 0, so scaling A by w is
the same as weighting each token's term by w (`tests/test_correction.py` checks it on every loss).
`train.tis_cap: C` is the setting `correction=tis, correction_level=token, correction_high=C`.

Logged every step (`correction_metrics`, `mismatch_kl`): `correction/weight_mean` (mean w over the
tokens kept), `correction/masked_frac` (response tokens masked), `mismatch/kl` = KL(mu || pi_old)
by k3 on the response tokens (samples come from mu).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from rlengine.losses import kl_k3

MODES = ("none", "tis", "mis")
LEVELS = ("token", "sequence", "geometric")
# exp() of a sequence's summed log-ratio overflows float32 past ~88; a ratio beyond e^60 is
# truncated (tis) or masked (mis) by any sane bound anyway
_LOG_CLAMP = 60.0


@dataclass(frozen=True)
class Correction:
    """The layer's settings (from `train.correction*`, validated at config load)."""

    mode: str = "none"
    level: str = "token"
    low: float | None = None         # mis only; None: 1 / high
    high: float = 2.0

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"train.correction={self.mode!r} is not one of {MODES}")
        if self.level not in LEVELS:
            raise ValueError(f"train.correction_level={self.level!r} is not one of {LEVELS}")
        if not self.high > 0:
            raise ValueError(f"train.correction_high must be > 0, got {self.high}")
        if self.low is not None and self.mode != "mis":
            raise ValueError(f"train.correction_low is used by correction=mis only (correction={self.mode})")
        if self.low is not None and not 0 <= self.low < self.high:
            raise ValueError(f"train.correction_low must be in [0, correction_high), got {self.low} with "
                             f"correction_high={self.high}")

    @property
    def low_bound(self) -> float:
        return 1.0 / self.high if self.low is None else self.low


def log_ratio(old_logp: torch.Tensor, behaviour_logp: torch.Tensor, mask: torch.Tensor, level: str) -> torch.Tensor:
    """log rho at `level`, broadcast to [B, T] (zero on padding)."""
    d = (old_logp - behaviour_logp) * mask                                   # [B, T]
    if level == "token":
        return d
    total = d.sum(1, keepdim=True)                                           # [B, 1]
    if level == "geometric":
        total = total / mask.sum(1, keepdim=True).clamp_min(1)
    return total.expand_as(d) * mask


def correct(old_logp: torch.Tensor, behaviour_logp: torch.Tensor, mask: torch.Tensor,
            c: Correction) -> tuple[torch.Tensor, torch.Tensor]:
    """(w [B, T], keep [B, T]): the weight the advantages are multiplied by, and the tokens that stay
    in the loss (a subset of `mask`). Both are zero on padding."""
    if c.mode == "none":
        return mask.clone(), mask.clone()
    rho = log_ratio(old_logp, behaviour_logp, mask, c.level).clamp(-_LOG_CLAMP, _LOG_CLAMP).exp()   # [B, T]
    if c.mode == "tis":
        return rho.clamp(max=c.high) * mask, mask.clone()
    keep = mask * ((rho >= c.low_bound) & (rho <= c.high)).to(mask.dtype)
    return rho * keep, keep


def mismatch_kl(old_logp: torch.Tensor, behaviour_logp: torch.Tensor, mask: torch.Tensor) -> float:
    """KL(mu || pi_old) by k3 with samples from mu, averaged over the response tokens."""
    tokens = mask.sum().clamp_min(1)
    return float((kl_k3(behaviour_logp, old_logp) * mask).sum() / tokens)


def correction_metrics(weight: torch.Tensor, keep: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    kept = keep.sum()
    return {"correction/weight_mean": float((weight * keep).sum() / kept.clamp_min(1)) if kept > 0 else 0.0,
            "correction/masked_frac": float((mask.sum() - kept) / mask.sum().clamp_min(1))}


def correction_of(train_cfg) -> Correction:
    """The layer's settings from the `train` config section (`tis_cap` is its shorthand)."""
    t = train_cfg
    if t.tis_cap is not None:
        if t.correction != "none":
            raise ValueError(f"train.tis_cap={t.tis_cap} is the shorthand for correction=tis; it cannot be combined "
                             f"with train.correction={t.correction} (set train.correction_high instead)")
        return Correction("tis", "token", None, t.tis_cap)
    return Correction(t.correction, t.correction_level, t.correction_low, t.correction_high)
