"""The off-policy correction layer (rlengine/correction.py) against float64 recomputations written
here, its place in `shape_advantages`, its config keys, and its contract with every loss of the zoo.

Tolerances: the layer runs in float32 on log-probs of magnitude <= 3 and ratios <= e^3; an exp,
a sum of <= 4 terms and a product each round by <= eps32/2 relative, so 32 eps32 relative to the
value bounds every check (`rel=REL`). The loss contract is checked in float64 (eps64 = 2.2e-16):
a sum of 12 per-token terms in two orders differs by <= 2 * 12 * eps64 * sum|terms|, so 1e-12
absolute on losses of O(1) is that bound with room for the exp of each ratio.
"""
from __future__ import annotations

import math

import pytest
import torch

from rlengine.advantages import shape_advantages
from rlengine.config import ConfigError, TrainConfig, load_config
from rlengine.correction import Correction, correct, correction_of, mismatch_kl
from rlengine.losses import LOSSES
from tests.test_shape_advantages import _batch, _group_norm

REL = 32 * torch.finfo(torch.float32).eps


def _pair(seed: int = 0, B: int = 4, T: int = 5):
    """behaviour and old log-probs [B, T] with log-ratios within [-1.9, 1.9] (a row offset each, so
    that whole responses fall inside and outside the bounds too), and a ragged mask."""
    g = torch.Generator().manual_seed(seed)
    behaviour = -3 * torch.rand(B, T, generator=g)
    offset = torch.tensor([0.0, 0.9, -0.9, 0.1])[:B, None]
    old = behaviour + 2 * (torch.rand(B, T, generator=g) - 0.5) + offset
    lengths = torch.tensor([T, 3, 1, 4])[:B]
    mask = (torch.arange(T)[None, :] < lengths[:, None]).float()
    return old, behaviour, mask


def _ratios64(old, behaviour, mask, level: str) -> list[list[float]]:
    out = []
    for i in range(old.shape[0]):
        d = [float(old[i, t]) - float(behaviour[i, t]) for t in range(old.shape[1]) if mask[i, t]]
        if level == "token":
            out.append([math.exp(x) for x in d])
        else:
            total = sum(d) / (len(d) if level == "geometric" else 1)
            out.append([math.exp(total)] * len(d))
    return out


@pytest.mark.parametrize("level", ["token", "sequence", "geometric"])
def test_tis_truncates_the_ratio_at_each_level(level):
    old, behaviour, mask = _pair()
    w, keep = correct(old, behaviour, mask, Correction("tis", level, None, 1.5))
    expected = _ratios64(old, behaviour, mask, level)
    for i, row in enumerate(expected):
        for t, rho in enumerate(row):
            assert float(w[i, t]) == pytest.approx(min(rho, 1.5), rel=REL)
    assert torch.equal(keep, mask)                                  # tis keeps every token
    assert float((w * (1 - mask)).abs().sum()) == 0.0               # nothing on padding
    capped = sum(rho > 1.5 for row in expected for rho in row)
    assert capped > 0 and capped < mask.sum()                       # the cap bites, not everywhere


@pytest.mark.parametrize("level", ["token", "sequence", "geometric"])
def test_mis_masks_outside_the_bounds_and_keeps_the_ratio_inside(level):
    old, behaviour, mask = _pair(1)
    w, keep = correct(old, behaviour, mask, Correction("mis", level, None, 2.0))   # low = 1/2
    expected = _ratios64(old, behaviour, mask, level)
    masked = 0
    for i, row in enumerate(expected):
        for t, rho in enumerate(row):
            inside = 0.5 <= rho <= 2.0
            masked += not inside
            assert float(keep[i, t]) == float(inside)
            assert float(w[i, t]) == (pytest.approx(rho, rel=REL) if inside else 0.0)
    assert 0 < masked < mask.sum()
    if level != "token":     # a response is kept or dropped whole
        for i in range(old.shape[0]):
            row = keep[i][mask[i] > 0]
            assert bool((row == row[0]).all())


def test_mis_lower_bound_is_settable():
    old, behaviour, mask = _pair(2)
    _, keep_default = correct(old, behaviour, mask, Correction("mis", "token", None, 2.0))
    _, keep_zero = correct(old, behaviour, mask, Correction("mis", "token", 0.0, 2.0))
    rho = (old - behaviour).exp()
    assert torch.equal(keep_zero, mask * (rho <= 2.0).float())
    assert keep_zero.sum() > keep_default.sum()


def test_none_is_the_identity():
    old, behaviour, mask = _pair()
    w, keep = correct(old, behaviour, mask, Correction())
    assert torch.equal(w, mask) and torch.equal(keep, mask)


def test_mismatch_kl_is_k3_of_sampler_against_trainer():
    old, behaviour, mask = _pair(3)
    terms = [math.exp(float(old[i, t] - behaviour[i, t])) - 1 - float(old[i, t] - behaviour[i, t])
             for i in range(4) for t in range(5) if mask[i, t]]
    assert mismatch_kl(old, behaviour, mask) == pytest.approx(sum(terms) / len(terms), rel=REL)
    assert mismatch_kl(behaviour, behaviour, mask) == 0.0


def test_shape_advantages_applies_the_layer_and_logs_it():
    r = [1, 0, 0, 0, 1, 1, 0, 1]
    batch = _batch(r, lengths=[3, 2, 1, 3, 3, 3, 3, 3])
    batch.old_logp = batch.sampler_logp + torch.linspace(-1.2, 1.2, 3).expand(8, 3) * batch.resp_mask
    stats = shape_advantages(batch, TrainConfig(correction="mis", correction_high=2.0))
    group = _group_norm(r)
    rho = (batch.old_logp - batch.sampler_logp).exp()
    inside = ((rho >= 0.5) & (rho <= 2.0)).float() * batch.resp_mask
    assert torch.equal(batch.loss_mask, inside)
    for i in range(8):
        for t in range(3):
            want = group[i] * float(rho[i, t]) if inside[i, t] else 0.0
            assert float(batch.advantages[i, t]) == pytest.approx(want, rel=REL, abs=1e-7)
    assert stats["correction/masked_frac"] == pytest.approx(1 - float(inside.sum() / batch.resp_mask.sum()), rel=REL)
    assert stats["correction/weight_mean"] == pytest.approx(float((rho * inside).sum() / inside.sum()), rel=REL)
    assert stats["mismatch/kl"] > 0


def test_shape_advantages_without_correction_still_measures_the_gap():
    batch = _batch([1, 0, 0, 0])
    batch.old_logp = batch.sampler_logp + 0.3 * batch.resp_mask
    stats = shape_advantages(batch, TrainConfig())
    assert batch.advantages.shape == (4,)                             # untouched: per response
    assert stats["correction/masked_frac"] == 0.0 and stats["correction/weight_mean"] == 1.0
    assert stats["mismatch/kl"] == pytest.approx(math.exp(0.3) - 1.3, rel=REL)


def test_tis_cap_is_the_token_tis_setting():
    assert correction_of(TrainConfig(tis_cap=3.0)) == Correction("tis", "token", None, 3.0)
    cfg = load_config("configs/default.yaml", ["train.tis_cap=3"])
    assert correction_of(cfg.train) == correction_of(
        load_config("configs/default.yaml", ["train.correction=tis", "train.correction_high=3"]).train)


@pytest.mark.parametrize("overrides, key", [
    (["train.correction=mis", "train.correction_low=3", "train.correction_high=2"], "train.correction_low"),
    (["train.correction=tis", "train.correction_low=0.5"], "train.correction_low"),
    (["train.tis_cap=2", "train.correction=mis"], "train.tis_cap"),
    (["train.correction_level=tokens"], "train.correction_level"),
    (["rollout.max_staleness=1"], "rollout.max_staleness"),
])
def test_bad_settings_name_their_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("configs/default.yaml", overrides)


@pytest.mark.parametrize("name", list(LOSSES))
def test_every_loss_sees_the_weight_through_the_advantage(name):
    """The contract: loss(A * w) == sum_t w_t * term_t, where term_t is token t's share of loss(A).
    It holds when, for a fixed sign pattern of A, the loss is linear in A (every loss here:
    -A * f(ratio), clipped by A's sign); then scaling A by w > 0 is the same as weighting each
    token's loss term by w, for per-token and per-response weights alike. term_t is measured as
    loss(A with A_t doubled) - loss(A), exact for a loss linear in A_t at a fixed sign."""
    loss_fn = LOSSES.build(name)
    g = torch.Generator().manual_seed(7)
    B, T = 3, 4
    old = -2 * torch.rand(B, T, generator=g, dtype=torch.float64) - 0.1
    logp = old + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = torch.ones(B, T, dtype=torch.float64)
    mask[2, 3] = 0
    adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    w = 0.2 + 2 * torch.rand(B, T, generator=g, dtype=torch.float64)
    entropy = torch.rand(B, T, generator=g, dtype=torch.float64)

    def loss(a):
        return loss_fn(logp, old, a, mask, max_len=T, entropy=entropy).loss

    base = float(loss(adv))
    share = torch.zeros(B, T, dtype=torch.float64)                             # [B, T] term_t
    for i in range(B):
        for t in range(T):
            doubled = adv.clone()
            doubled[i, t] *= 2
            share[i, t] = float(loss(doubled)) - base
    assert base == pytest.approx(float(share.sum()), abs=1e-12)                # linear in A
    assert float(loss(adv * w)) == pytest.approx(float((share * w).sum()), abs=1e-12)
