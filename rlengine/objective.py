"""The objective one micro-batch contributes to an optimizer step. Pure tensor math.

    loss = policy_loss + kl_coef * agg(KL(pi_theta || pi_ref)) - entropy_coef * agg(entropy)

(the KL term only when `train.kl_in_reward` is off), every term aggregated with the loss's `agg`.
A mini-batch is split over ranks and micro-batches; its loss must be the aggregate over the *global*
mini-batch, so each micro-batch's loss is weighted by its share of the global units (`unit_count`):
tokens for token-mean, non-empty sequences for the seq-mean-* modes (what `aggregate` divides by).
DeepSpeed averages gradients over ranks and accumulation steps; `backward_scale` undoes that.
"""
from __future__ import annotations

import torch

from rlengine.losses import aggregate, kl_penalty


def unit_count(mask: torch.Tensor, agg: str) -> float:
    """What `aggregate(.., mask, agg)` divides by: response tokens, or sequences with a token."""
    if agg == "token-mean":
        return float(mask.sum())
    return float((mask.sum(-1) > 0).sum())


def regularised_loss(policy_loss: torch.Tensor, logp: torch.Tensor, entropy: torch.Tensor | None,
                     ref_logp: torch.Tensor | None, mask: torch.Tensor, train_cfg, agg: str,
                     max_len: int | None) -> torch.Tensor:
    """The policy loss plus the KL-to-reference term and minus the entropy bonus, as configured.
    logp, entropy, ref_logp, mask: [B, T]."""
    loss = policy_loss
    if train_cfg.kl_coef > 0 and not train_cfg.kl_in_reward:
        kl = kl_penalty(logp, ref_logp, estimator=train_cfg.kl_estimator)
        loss = loss + train_cfg.kl_coef * aggregate(kl, mask, agg, max_len=max_len)
    if train_cfg.entropy_coef > 0:
        loss = loss - train_cfg.entropy_coef * aggregate(entropy, mask, agg, max_len=max_len)
    return loss


def backward_scale(micro_units: float, global_units: float, grad_accum: int, world: int) -> float:
    """The factor on a micro-batch's loss so that DeepSpeed's averaged gradient is the gradient of
    the global mini-batch's aggregate: its share of the units, times what DeepSpeed divides by."""
    return micro_units / max(global_units, 1.0) * grad_accum * world
