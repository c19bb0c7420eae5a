"""Group advantages checked against a hand-written per-group formula (statistics module)."""
import statistics

import pytest
import torch

from rlengine.advantages import group_advantages, group_stats


def reference(rewards, g, norm_std=True, eps=1e-6):
    out = []
    for i in range(0, len(rewards), g):
        group = rewards[i:i + g]
        mean = sum(group) / g
        if len(set(group)) == 1:
            out += [0.0] * g
            continue
        scale = statistics.stdev(group) + eps if norm_std else 1.0
        out += [(r - mean) / scale for r in group]
    return out


def test_grpo_matches_hand_formula():
    rewards = [1.0, 0.0, 0.0, 1.0, 2.0, 0.25, 0.5, 1.25, 0.0, 0.0, 0.0, 1.0]
    got = group_advantages(torch.tensor(rewards), 4)
    assert got.shape == (12,) and got.dtype == torch.float32
    assert torch.allclose(got, torch.tensor(reference(rewards, 4)), atol=1e-6)
    # a worked example: group [1, 0, 0, 1] has mean 0.5, unbiased std sqrt(1/3)
    assert got[0].item() == pytest.approx(0.5 / (3 ** -0.5 + 1e-6), rel=1e-6)


def test_equal_groups_get_zero():
    rewards = [0.7, 0.7, 0.7, 0.0, 2.0, 2.0, 1.0, 0.0]
    got = group_advantages(rewards, 2)
    assert got[:2].tolist() == [0.0, 0.0]                      # exactly zero, no 0/eps blow-up
    assert got[4:6].tolist() == [0.0, 0.0]
    assert torch.allclose(got, torch.tensor(reference(rewards, 2)), atol=1e-6)
    assert group_advantages([0.1] * 3, 3).tolist() == [0.0, 0.0, 0.0]   # float mean noise stays zero


def test_dr_grpo_has_no_std():
    rewards = [3.0, 1.0, 0.0, 0.0, 0.0, 2.0]
    got = group_advantages(rewards, 3, norm_std=False)
    assert got.tolist() == pytest.approx([5 / 3, -1 / 3, -4 / 3, -2 / 3, -2 / 3, 4 / 3])


def test_batch_normalisation():
    rewards = [1.0, 0.0, 0.0, 0.0, 5.0, 5.0, 0.0, 3.0]
    centred = torch.tensor(reference(rewards, 4, norm_std=False))
    got = group_advantages(rewards, 4, norm_std=False, batch_norm=True)
    assert torch.allclose(got, centred / (centred.std() + 1e-6), atol=1e-6)
    assert abs(float(got.mean())) < 1e-6 and float(got.std()) == pytest.approx(1.0, abs=1e-5)
    zeros = group_advantages([1.0, 1.0, 0.0, 1.0], 2, batch_norm=True)
    assert zeros[:2].tolist() == [0.0, 0.0]


def test_shape_errors_and_group_of_one():
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages([1.0, 2.0], 3)
    assert group_advantages([1.0, 0.0, 2.0], 1).tolist() == [0.0, 0.0, 0.0]


def test_group_stats():
    s = group_stats([1.0, 1.0, 0.0, 1.0, 0.0, 0.0], 2)
    assert s["reward_mean"] == pytest.approx(0.5)
    assert s["frac_equal_groups"] == pytest.approx(2 / 3)
    assert s["frac_groups_all_max"] == pytest.approx(1 / 3) and s["frac_groups_all_min"] == pytest.approx(1 / 3)
    assert s["reward_std_in_group"] == pytest.approx(statistics.stdev([0.0, 1.0]) / 3)
