"""Group-normalised advantages (GRPO and its variants). Pure tensor math.

Rewards come grouped by prompt: the `group_size` responses of prompt 0 first, then prompt 1, ...
  GRPO:       A_i = (R_i - mean(R_group)) / (std(R_group) + eps)   torch's unbiased std
  Dr. GRPO:   A_i = R_i - mean(R_group)                            (norm_std=False)
  batch norm: the group-centred advantages divided by their root mean square over the whole
              batch of every trainer rank (+ eps), on top of the group std or instead of it; their
              batch mean is 0 by construction, so zero stays zero.
A group whose rewards are all equal gets A = 0 exactly (it carries no learning signal).

`shape_advantages` turns a scored `RolloutBatch` into what the loss sees, in one written order.
"""
from __future__ import annotations

from typing import Sequence

import torch

EPS = 1e-6


def _grouped(rewards: torch.Tensor | Sequence[float], group_size: int) -> torch.Tensor:
    r = torch.as_tensor(rewards, dtype=torch.float32).flatten()  # [N]
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if r.numel() % group_size:
        raise ValueError(f"{r.numel()} rewards do not split into groups of {group_size}")
    return r.view(-1, group_size)                                  # [N/G, G]


def group_advantages(rewards: torch.Tensor | Sequence[float], group_size: int, norm_std: bool = True,
                     eps: float = EPS) -> torch.Tensor:
    """Per-response advantages, shape [N] (float32), same order as `rewards`."""
    grouped = _grouped(rewards, group_size)                          # [P, G]
    centred = grouped - grouped.mean(dim=1, keepdim=True)           # [P, G]
    equal = (grouped == grouped[:, :1]).all(dim=1, keepdim=True)    # [P, 1] no signal
    centred = torch.where(equal, torch.zeros_like(centred), centred)
    if norm_std and group_size > 1:
        std = grouped.std(dim=1, unbiased=True, keepdim=True)       # [P, 1]
        centred = centred / (std + eps)
    return centred.flatten()                                        # [N]


def batch_normalise(advantages: torch.Tensor, group=None, eps: float = EPS) -> torch.Tensor:
    """Group-centred advantages divided by their root mean square over every trainer rank's batch
    (`group`; collective when it has more than one rank). Their global mean is 0 by construction,
    so the RMS is the batch std (population form) and a zero advantage stays exactly zero."""
    from rlengine.distributed import all_reduce

    square_sum, count = all_reduce([float((advantages.double() ** 2).sum()), float(advantages.numel())], group=group)
    return advantages / ((square_sum / max(count, 1.0)) ** 0.5 + eps)


def shape_advantages(batch, train_cfg, group=None) -> dict[str, float]:
    """Fill `batch.advantages` and `batch.loss_mask` from `batch.reward`, in this order:

    1. KL in the reward (`train.kl_in_reward`): R_i - kl_coef * sum_t KL_t(pi_old || pi_ref), with
       pi_old the trainer's recomputation (the training loop always computes it in this mode; the
       sampler's log-probs, after top-p, stand in only when a caller has none).
    2. group normalisation: group mean, and the group std unless `adv_norm_std` is off (Dr. GRPO).
    3. batch normalisation over all trainer ranks (`adv_batch_norm`; collective over `group`).
    4. DAPO filter (`dynamic_filter`): the tokens of groups whose *reward function values* are all
       equal leave `loss_mask`. It looks at the task reward, not at the KL-shaped one of step 1,
       which is almost never equal within a group and would keep every group.
    5. the off-policy correction (`train.correction`, rlengine/correction.py): A_t * w_t, advantages
       become [B, T], and the tokens it masks leave `loss_mask`. It needs `batch.old_logp`; without
       it (the on-policy single update) the correction is off and `Actor.update` measures the gap.
    Returns what it measured for the log (`kl_in_reward` mean, `dapo_kept_groups` fraction, and the
    correction's `mismatch/kl`, `correction/weight_mean`, `correction/masked_frac`)."""
    from rlengine.correction import correct, correction_metrics, correction_of, mismatch_kl
    from rlengine.losses import kl_penalty

    t, mask = train_cfg, batch.resp_mask.clone()                      # [B, T]
    reward, stats = batch.reward, {}
    if t.kl_in_reward and t.kl_coef > 0 and batch.ref_logp is not None:
        behaviour = batch.sampler_logp if batch.old_logp is None else batch.old_logp
        seq_kl = (kl_penalty(behaviour, batch.ref_logp, estimator=t.kl_estimator) * mask).sum(1)   # [B]
        reward = reward - t.kl_coef * seq_kl
        stats["kl_in_reward"] = float(seq_kl.mean())
    advantages = group_advantages(reward, batch.group_size, norm_std=t.adv_norm_std)    # [B]
    if t.adv_batch_norm:
        advantages = batch_normalise(advantages, group)
    if t.dynamic_filter:
        grouped = _grouped(batch.reward, batch.group_size)                             # [P, G]
        keep = grouped.max(1).values != grouped.min(1).values                          # [P]
        mask = mask * keep.repeat_interleave(batch.group_size).unsqueeze(1).float()
        stats["dapo_kept_groups"] = float(keep.float().mean())
    if batch.old_logp is not None:
        layer = correction_of(t)
        weight, keep = correct(batch.old_logp, batch.sampler_logp, mask, layer)            # [B, T] each
        stats.update(correction_metrics(weight, keep, mask))
        stats["mismatch/kl"] = mismatch_kl(batch.old_logp, batch.sampler_logp, batch.resp_mask)
        if layer.mode != "none":
            advantages, mask = advantages.unsqueeze(1) * weight, keep
    batch.advantages, batch.loss_mask = advantages, mask
    return stats


def group_stats(rewards: torch.Tensor | Sequence[float], group_size: int) -> dict[str, float]:
    """Logging helpers: mean reward, mean within-group std, and the share of groups whose rewards
    are all equal (`frac_equal_groups`, no signal), all at the maximum or all at the minimum."""
    grouped = _grouped(rewards, group_size)                          # [P, G]
    equal = (grouped == grouped[:, :1]).all(dim=1)                  # [P]
    top, bottom = grouped.max(), grouped.min()
    return {
        "reward_mean": float(grouped.mean()),
        "reward_std_in_group": float(grouped.std(dim=1, unbiased=True).mean()) if group_size > 1 else 0.0,
        "frac_equal_groups": float(equal.float().mean()),
        "frac_groups_all_max": float((grouped == top).all(dim=1).float().mean()),
        "frac_groups_all_min": float((grouped == bottom).all(dim=1).float().mean()),
    }
