"""Group advantages checked against a hand-written per-group formula (statistics module)."""
import statistics

import pytest
import torch

from rlengine.advantages import group_advantages, group_stats

# Tolerances. group_advantages works in float32; the references are float64 (Python / statistics).
EPS32 = torch.finfo(torch.float32).eps


def fp32_tol(rewards, g, want):
    """Bound on |fp32 advantages - float64 reference| for groups of g: the g-term mean and r - mean
    round at the rewards' magnitude (~g/2 ulps of max|r|), which the division by the group std s
    scales by 1 / s; the std (g squares, a sqrt), the division and the float32 cast of the reference
    add ~g/2 + 3 ulps of |A|. (g + 4) eps32 (max|r| / min s + max|A|) is that with 2x to spare."""
    groups = [rewards[i:i + g] for i in range(0, len(rewards), g)]
    min_std = min((statistics.stdev(x) for x in groups if len(set(x)) > 1), default=1.0)
    return (g + 4) * EPS32 * (max(abs(r) for r in rewards) / min_std + float(want.abs().max()))


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
    want = torch.tensor(reference(rewards, 4), dtype=torch.float64)
    assert ((got.double() - want).abs() <= fp32_tol(rewards, 4, want)).all()
    # a worked example: group [1, 0, 0, 1] has mean 0.5, unbiased std sqrt(1/3). Mean, centring and
    # the sum of squares are exact here; /3, sqrt, + eps and the division round once each: 4 ulps
    assert got[0].item() == pytest.approx(0.5 / (3 ** -0.5 + 1e-6), rel=4 * EPS32)


def test_equal_groups_get_zero():
    rewards = [0.7, 0.7, 0.7, 0.0, 2.0, 2.0, 1.0, 0.0]
    got = group_advantages(rewards, 2)
    assert got[:2].tolist() == [0.0, 0.0]                      # exactly zero, no 0/eps blow-up
    assert got[4:6].tolist() == [0.0, 0.0]
    want = torch.tensor(reference(rewards, 2), dtype=torch.float64)
    assert ((got.double() - want).abs() <= fp32_tol(rewards, 2, want)).all()
    assert group_advantages([0.1] * 3, 3).tolist() == [0.0, 0.0, 0.0]   # float mean noise stays zero


def test_dr_grpo_has_no_std():
    rewards = [3.0, 1.0, 0.0, 0.0, 0.0, 2.0]
    got = group_advantages(rewards, 3, norm_std=False)
    # fp32: the mean (an exact integer sum / 3) and r - mean round once each, at magnitude <= max|r|
    assert got.tolist() == pytest.approx([5 / 3, -1 / 3, -4 / 3, -2 / 3, -2 / 3, 4 / 3], abs=2 * EPS32 * max(rewards))


def test_batch_normalisation():
    from rlengine.advantages import batch_normalise

    rewards = [1.0, 0.0, 0.0, 0.0, 5.0, 5.0, 0.0, 3.0]
    centred = torch.tensor(reference(rewards, 4, norm_std=False))
    got = batch_normalise(group_advantages(rewards, 4, norm_std=False))
    # the group-centred values have batch mean 0: dividing by their RMS is the population batch std
    rms = float((centred.double() ** 2).mean().sqrt())
    eps32 = torch.finfo(torch.float32).eps
    assert torch.allclose(got.double(), centred.double() / (rms + 1e-6), rtol=8 * eps32, atol=0)  # a few roundings
    zeros = batch_normalise(group_advantages([1.0, 1.0, 0.0, 1.0], 2))
    assert zeros[:2].tolist() == [0.0, 0.0]


def test_shape_errors_and_group_of_one():
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages([1.0, 2.0], 3)
    assert group_advantages([1.0, 0.0, 2.0], 1).tolist() == [0.0, 0.0, 0.0]


def test_group_stats():
    s = group_stats([1.0, 1.0, 0.0, 1.0, 0.0, 0.0], 2)
    # fp32 means of 0/1 values: the sums are exact integers, the division rounds once (eps32 / 2)
    assert s["reward_mean"] == pytest.approx(0.5, rel=EPS32)
    assert s["frac_equal_groups"] == pytest.approx(2 / 3, rel=EPS32)
    assert s["frac_groups_all_max"] == pytest.approx(1 / 3, rel=EPS32)
    assert s["frac_groups_all_min"] == pytest.approx(1 / 3, rel=EPS32)
    # three fp32 group stds (mean, square, /1, sqrt: ~3 roundings each) and their 3-term mean: ~5 ulps
    assert s["reward_std_in_group"] == pytest.approx(statistics.stdev([0.0, 1.0]) / 3, rel=8 * EPS32)
