"""Group-normalised advantages (GRPO and its variants). Pure tensor math.

Rewards come grouped by prompt: the `group_size` responses of prompt 0 first, then prompt 1, ...
  GRPO:       A_i = (R_i - mean(R_group)) / (std(R_group) + eps)   torch's unbiased std
  Dr. GRPO:   A_i = R_i - mean(R_group)                            (norm_std=False)
  batch_norm: the group-centred advantages divided by their batch std (+ eps) instead of, or on
              top of, the group std; their batch mean is already 0, so zero stays zero.
A group whose rewards are all equal gets A = 0 exactly (it carries no learning signal).
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
                     batch_norm: bool = False, eps: float = EPS) -> torch.Tensor:
    """Per-response advantages, shape [N] (float32), same order as `rewards`."""
    grouped = _grouped(rewards, group_size)                          # [P, G]
    centred = grouped - grouped.mean(dim=1, keepdim=True)           # [P, G]
    equal = (grouped == grouped[:, :1]).all(dim=1, keepdim=True)    # [P, 1] no signal
    centred = torch.where(equal, torch.zeros_like(centred), centred)
    if norm_std and group_size > 1:
        std = grouped.std(dim=1, unbiased=True, keepdim=True)       # [P, 1]
        centred = centred / (std + eps)
    advantages = centred.flatten()                                  # [N]
    if batch_norm and advantages.numel() > 1:
        advantages = advantages / (advantages.std(unbiased=True) + eps)
    return advantages


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
