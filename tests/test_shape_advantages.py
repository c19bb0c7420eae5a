"""`shape_advantages`: KL in the reward, group and batch normalisation, the DAPO filter and TIS, in
their written order, against plain float64 recomputations written here (no model)."""
from __future__ import annotations

import math

import pytest
import torch

from rlengine.advantages import shape_advantages
from rlengine.batch import RolloutBatch
from rlengine.config import TrainConfig
from rlengine.rollout.base import Generation

G = 4
# every tolerance below: float32 arithmetic on O(1) values over a handful of operations (a mean of
# 4, a std, a division, an exp): each step rounds by <= eps32/2 relative, so 16 eps32 bounds them all
TOL = 16 * torch.finfo(torch.float32).eps


def _batch(rewards, lengths=None, seed=0) -> RolloutBatch:
    n = len(rewards)
    lengths = lengths or [3] * n
    g = torch.Generator().manual_seed(seed)
    gen = Generation([i // G for i in range(n)], [[1, 2, 3]] * n, [[7] * k for k in lengths],
                     [(-torch.rand(k, generator=g)).tolist() for k in lengths], ["x"] * n, ["stop"] * n)
    batch = RolloutBatch.from_generation(gen, pad_id=0, group_size=G)
    batch.reward = torch.tensor(rewards, dtype=torch.float32)
    return batch


def _group_norm(r: list[float], std: bool = True) -> list[float]:
    out = []
    for k in range(0, len(r), G):
        g = r[k:k + G]
        mean = sum(g) / G
        if all(x == g[0] for x in g):
            out += [0.0] * G
            continue
        sd = math.sqrt(sum((x - mean) ** 2 for x in g) / (G - 1))
        out += [(x - mean) / (sd + 1e-6) if std else x - mean for x in g]
    return out


def test_group_normalisation_alone_keeps_the_mask():
    batch = _batch([1, 0, 0, 1, 1, 1, 1, 1])
    stats = shape_advantages(batch, TrainConfig())
    assert batch.advantages.tolist() == pytest.approx(_group_norm([1, 0, 0, 1, 1, 1, 1, 1]), abs=TOL)
    assert torch.equal(batch.loss_mask, batch.resp_mask) and stats == {}
    assert batch.loss_mask is not batch.resp_mask


def test_dr_grpo_and_batch_norm():
    r = [3.0, 1.0, 0.0, 0.0, 0.0, 2.0, 5.0, 1.0]
    batch = _batch(r)
    shape_advantages(batch, TrainConfig(adv_norm_std=False, adv_batch_norm=True))
    centred = _group_norm(r, std=False)
    rms = math.sqrt(sum(x * x for x in centred) / len(centred))
    assert batch.advantages.tolist() == pytest.approx([x / (rms + 1e-6) for x in centred], abs=TOL)


def test_dapo_filter_drops_equal_groups_by_the_task_reward_even_with_kl_in_the_reward():
    r = [1, 1, 1, 1, 0, 1, 0, 0]
    batch = _batch(r)
    batch.ref_logp = batch.sampler_logp - 0.3 * torch.arange(8.0).unsqueeze(1) * batch.resp_mask   # KL differs per sample
    stats = shape_advantages(batch, TrainConfig(dynamic_filter=True, kl_coef=0.1, kl_in_reward=True))
    # group 0 has equal task rewards: out of the loss, although its KL-shaped rewards differ
    assert batch.loss_mask[:4].sum() == 0 and torch.equal(batch.loss_mask[4:], batch.resp_mask[4:])
    assert batch.resp_mask.sum() == 8 * 3                     # what was generated is unchanged
    assert stats["dapo_kept_groups"] == 0.5
    assert batch.advantages[:4].abs().sum() > 0                # KL in the reward still shapes them


def test_kl_in_the_reward_uses_pi_old_and_the_configured_estimator():
    r = [1.0, 0.0, 0.0, 1.0]
    batch = _batch(r[:4])
    batch.old_logp = batch.sampler_logp - 0.05 * batch.resp_mask
    batch.ref_logp = batch.sampler_logp - 0.2 * torch.arange(4.0).unsqueeze(1) * batch.resp_mask
    stats = shape_advantages(batch, TrainConfig(kl_coef=0.5, kl_in_reward=True, kl_estimator="k1"))
    # k1 = log pi_old - log pi_ref, summed over each response's 3 tokens
    seq_kl = [3 * (0.2 * i - 0.05) for i in range(4)]
    shaped = [x - 0.5 * k for x, k in zip(r, seq_kl)]
    assert batch.advantages.tolist() == pytest.approx(_group_norm(shaped), abs=TOL)
    assert stats["kl_in_reward"] == pytest.approx(sum(seq_kl) / 4, abs=TOL)


def test_tis_weights_each_token_by_the_capped_ratio_and_respects_the_filter():
    r = [1, 0, 0, 0, 1, 1, 1, 1]
    batch = _batch(r, lengths=[3, 2, 1, 3, 3, 3, 3, 3])
    batch.old_logp = batch.sampler_logp + torch.linspace(-1, 1, 3).expand(8, 3) * batch.resp_mask
    shape_advantages(batch, TrainConfig(tis_cap=2.0, dynamic_filter=True))
    group = _group_norm(r)
    for i in range(8):
        for t in range(3):
            if batch.loss_mask[i, t] == 0:
                assert batch.advantages[i, t] == 0
                continue
            ratio = math.exp(float(batch.old_logp[i, t] - batch.sampler_logp[i, t]))
            assert float(batch.advantages[i, t]) == pytest.approx(group[i] * min(ratio, 2.0), abs=TOL)
    assert batch.advantages.shape == (8, 3) and batch.loss_mask[4:].sum() == 0
