"""The loss contract (elementwise or not), the sequence-level losses (GSPO, GSPO-token, GMPO), DPPO,
ASPO's entropy option, the dual clip inside the trust region, and loss / gate plug-ins.

Every reference below is written here in numpy float64 from the papers' formulas (GSPO eqs. 5-7
and 13-14, GMPO eq. 4 with the authors' sign-dependent clip), independently of rlengine/losses.
Tolerances (float64, eps64 = 2.2e-16), derived per check below: a signed sum of n terms in two
different orders differs by <= 2 n eps64 sum|terms| (recursive summation; torch's pairwise is
tighter), so each loss / gradient bound is that of its own sums (T = 10 tokens a row, B = 6 rows),
plus a few ulps of the value for the exp / products; finite differences (h = 1e-6, central) add the
rounding of the two loss values over 2h and the truncation h^2 |L^(3)| / 6. All of them are
orders of magnitude below a 1e-6 scale error.
"""
from __future__ import annotations

import math
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from rlengine.config import ConfigError, load_config
from rlengine.losses import GATES, LOSSES, REGIONS, make_ratio_context, policy_loss, register_loss
from tests.test_gates import assert_within

ROOT = Path(__file__).resolve().parents[1]
SEQUENCE = ("gspo", "gspo_token", "gmpo")
EPS64 = torch.finfo(torch.float64).eps


def seq_batch(seed: int, B: int = 6, T: int = 10, spread: float = 0.1, per_token_adv: bool = True):
    """float64 batch: log-ratios ~ N(0, spread), right padding with NaN / inf garbage, advantages
    that vary within rows 0-2 (per-token, as under train.tis_cap) and are constant in the rest."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, T + 1, (B,), generator=g)
    lengths[0] = T
    mask = torch.arange(T)[None, :] < lengths[:, None]
    old = -3.0 * torch.rand(B, T, generator=g, dtype=torch.float64) - 0.05
    log_r = spread * torch.randn(B, T, generator=g, dtype=torch.float64)
    logp = old + log_r
    adv_seq = torch.randn(B, generator=g, dtype=torch.float64)
    adv = adv_seq[:, None].expand(B, T).clone()
    if per_token_adv:
        adv[:3] = adv[:3] * (0.3 + 1.4 * torch.rand(3, T, generator=g, dtype=torch.float64))
        adv[1, 1] = -adv[1, 1]                                            # mixed signs in one response
    logp = torch.where(mask, logp, torch.nan)
    old = torch.where(mask, old, -torch.inf)
    adv = torch.where(mask, adv, torch.inf)
    return logp, old, adv, mask


def agg_weights_np(mask: np.ndarray, agg: str) -> np.ndarray:
    m = mask.astype(float)
    if agg == "token-mean":
        return m / m.sum()
    rows = m.sum(1, keepdims=True)
    return m / (rows * (rows[:, 0] > 0).sum())


def reference(name: str, logp, old, adv, mask, eps_low: float, eps_high: float, agg: str):
    """(value, gradient [B, T], s_i [B]) of loss `name`, independently in numpy."""
    m = mask.numpy()
    d = np.where(m, logp.detach().numpy() - old.numpy(), 0.0)           # log r, 0 on padding
    A = np.where(m, adv.numpy(), 0.0) if adv.dim() == 2 else np.where(m, adv.numpy()[:, None], 0.0)
    a = agg_weights_np(m, agg)
    n = m.sum(1)
    L, U = 1 - eps_low, 1 + eps_high
    value, grad, s_all = 0.0, np.zeros_like(d), np.zeros(len(d))
    for i in range(len(d)):
        t = np.flatnonzero(m[i])
        if name == "gmpo":
            clipped = np.where(A[i, t] > 0, np.minimum(d[i, t], math.log(U)), np.maximum(d[i, t], math.log(L)))
            s = math.exp(clipped.mean())
            free = clipped == d[i, t]                                     # this token's log-ratio is unclipped
            value += np.sum(a[i, t] * -A[i, t] * s)
            grad[i, t] = np.sum(a[i, t] * -A[i, t]) * s * free / n[i]
        else:
            s = math.exp(d[i, t].mean())
            pos = A[i, t] > 0
            c = np.where(pos, min(s, U), max(s, L))
            free = np.where(pos, s <= U, s >= L)                          # PPO clip of s_i, per token's sign
            value += np.sum(a[i, t] * -A[i, t] * c)
            if name == "gspo":
                grad[i, t] = np.sum(a[i, t] * -A[i, t] * free) * s / n[i]
            else:                                                         # gspo_token: own token only
                grad[i, t] = a[i, t] * -A[i, t] * free * s
        s_all[i] = s
    return value, grad, s_all


@pytest.mark.parametrize("agg", ["seq-mean-token-mean", "token-mean"])
@pytest.mark.parametrize("name", SEQUENCE)
@pytest.mark.parametrize("per_token_adv", [True, False])
def test_sequence_loss_gradient_matches_closed_form(name, agg, per_token_adv):
    eps = {"gmpo": (0.05, 0.06)}.get(name, (0.02, 0.03))                 # a mix of clipped and free
    logp, old, adv, mask = seq_batch(1, per_token_adv=per_token_adv)
    logp.requires_grad_(True)
    out = policy_loss(name, logp, old, adv, mask, agg=agg, eps_low=eps[0], eps_high=eps[1])
    out.loss.backward()
    value, grad, s = reference(name, logp, old, adv, mask, eps[0], eps[1], agg)
    m = mask.numpy()
    B, T = m.shape
    # |terms| of the value's sum: a |A| c_i with c_i <= max(s_i, U); s_i = exp(mean log r) itself is
    # off by T eps64 max|log r| + 2 ulps (the mean, exp), small against the sums' bound
    a_abs_A = agg_weights_np(m, agg) * np.abs(np.where(m, adv.numpy() if adv.dim() == 2 else adv.numpy()[:, None], 0.0))
    mag = (a_abs_A * np.maximum(s, 1 + eps[1])[:, None]).sum()
    assert out.loss.item() == pytest.approx(value, abs=2 * B * T * EPS64 * mag)
    # each gradient entry sums <= T terms of its row (gspo, gmpo): 2 T eps64 of the row's a |A| s / n,
    # plus a few roundings of the entry itself
    row = a_abs_A.sum(1, keepdims=True) * s[:, None] / np.maximum(m.sum(1, keepdims=True), 1)
    assert_within(logp.grad.numpy(), grad, rtol=8 * EPS64, atol=2 * T * EPS64 * np.broadcast_to(row, grad.shape))
    assert (logp.grad[~mask] == 0).all() and (out.token_loss[~mask] == 0).all()   # padding: zero
    assert (grad != 0).sum() > 10 and (grad[mask.numpy()] == 0).sum() > 3  # both clipped and free tokens


@pytest.mark.parametrize("name", ["gspo", "gmpo"])
def test_sequence_loss_gradient_by_finite_differences(name):
    """GSPO and GMPO have no stop-gradient: the gradient is the plain derivative of the value."""
    logp, old, adv, mask = seq_batch(2)
    kw = {"eps_low": 0.02, "eps_high": 0.03}
    out = policy_loss(name, logp.clone().requires_grad_(True), old, adv, mask, **kw)
    lp = logp.clone().requires_grad_(True)
    policy_loss(name, lp, old, adv, mask, **kw).loss.backward()
    h = 1e-6
    # L(+h) and L(-h) are a row sum (T terms) then a sum over rows (B): each rounds to within
    # (T + B) eps64 of mag = sum a |A| max(s_i, U), and the difference is divided by 2h; logp +- h
    # itself rounds by eps64 |logp| (times the slope g, over h); truncation h^2 |L^(3)| / 6 with
    # |L^(3)| <= mag (each derivative of exp(mean log r) brings a factor 1/n <= 1). 2x to spare.
    m = mask.numpy()
    B, T = m.shape
    _, _, s = reference(name, logp, old, adv, mask, kw["eps_low"], kw["eps_high"], "seq-mean-token-mean")
    a_abs_A = agg_weights_np(m, "seq-mean-token-mean") * np.abs(np.where(m, adv.numpy(), 0.0))
    mag = (a_abs_A * np.maximum(s, 1 + kw["eps_high"])[:, None]).sum()
    for b, t in [(0, 0), (0, 5), (1, 1), (2, 0), (4, 0), (5, 1)]:
        if not mask[b, t]:
            continue
        plus, minus = logp.clone(), logp.clone()
        plus[b, t] += h
        minus[b, t] -= h
        fd = (policy_loss(name, plus, old, adv, mask, **kw).loss - policy_loss(name, minus, old, adv, mask, **kw).loss) / (2 * h)
        g = lp.grad[b, t].item()
        tol = 2 * ((T + B) * EPS64 * mag / h + EPS64 * abs(logp[b, t].item()) * abs(g) / h + h ** 2 * mag / 6)
        assert fd.item() == pytest.approx(g, abs=tol), (b, t)
    assert torch.isfinite(out.loss)


def test_gspo_token_equals_gspo_for_a_constant_advantage():
    logp, old, adv, mask = seq_batch(3, per_token_adv=False)
    outs = {}
    for name in ("gspo", "gspo_token"):
        lp = logp.clone().requires_grad_(True)
        out = policy_loss(name, lp, old, adv, mask, eps_low=0.02, eps_high=0.03)
        out.loss.backward()
        outs[name] = (out, lp.grad)
    (a, ga), (b, gb) = outs["gspo"], outs["gspo_token"]
    m = mask.numpy()
    B, T = m.shape
    # the same value by two code paths: signed sums of <= B T terms a |A| c_i (c_i <= max(s_i, U)),
    # each order within B T eps64 of their magnitude (see the module docstring)
    s = torch.exp(torch.where(mask, logp - old, 0.0).sum(1) / mask.sum(1)).numpy()
    mag = (agg_weights_np(m, "seq-mean-token-mean") * np.abs(np.where(m, adv.numpy(), 0.0))
           * np.maximum(s, 1.03)[:, None]).sum()
    assert a.loss.item() == pytest.approx(b.loss.item(), abs=2 * B * T * EPS64 * mag)
    # A constant in a row: gspo's row sum of T equal-signed terms (T eps64 relative) against
    # gspo_token's single term; the weight s_i (or an exact 0) on both, a few ulps
    np.testing.assert_allclose(ga.numpy(), gb.numpy(), rtol=2 * T * EPS64 + 8 * EPS64, atol=0)
    np.testing.assert_allclose(a.weight.numpy(), b.weight.numpy(), rtol=8 * EPS64, atol=0)


@pytest.mark.parametrize("name", SEQUENCE)
def test_sequence_weight_metrics_mean_the_sequence_weight(name):
    """weight = s_i broadcast to the response (0 on clipped tokens); GSPO's regions are s_i's."""
    logp, old, adv, mask = seq_batch(4, per_token_adv=False)
    eps = (0.02, 0.03)
    out = policy_loss(name, logp, old, adv, mask, eps_low=eps[0], eps_high=eps[1])
    _, grad, s = reference(name, logp, old, adv, mask, eps[0], eps[1], "seq-mean-token-mean")
    m = mask.numpy()
    w = out.weight.numpy()
    s_tok = np.broadcast_to(s[:, None], w.shape)
    free = np.abs(grad) > 0
    # s_i = exp(mean of T log-ratios) in torch and in numpy: the means differ by <= T eps64 max|log r|
    # (absolute), which exp turns relative, plus exp's ulp and the division by n
    log_r = np.abs(np.where(m, logp.numpy() - old.numpy(), 0.0))
    np.testing.assert_allclose(w[m & free], s_tok[m & free], rtol=m.shape[1] * EPS64 * log_r.max() + 4 * EPS64, atol=0)
    assert (w[m & ~free] == 0).all()
    if name != "gmpo":                                                    # regions of the sequence ratio
        A = adv.numpy()[:, :1]
        L, U = 1 - eps[0], 1 + eps[1]
        expect = np.where(s[:, None] > U, np.where(A > 0, 2, 4), np.where(s[:, None] < L, np.where(A > 0, 3, 1), 0))
        np.testing.assert_array_equal(out.region.numpy()[m], np.broadcast_to(expect, w.shape)[m])
        rel = out.metrics["eur"]
        # eur = fraction not clipped: w / s_i is 1 (to an ulp or two) or 0 per token, N of them summed
        # and divided by N: 2 eps64 relative per token plus the division
        assert rel == pytest.approx(free[m].mean(), rel=4 * EPS64)
    assert out.metrics["n_tokens"] == m.sum()
    # five float64 fractions of exact counts, each rounded once, then summed
    assert sum(out.metrics[f"frac_{k}"] for k in REGIONS) == pytest.approx(1.0, abs=2 * len(REGIONS) * EPS64)


def test_the_elementwise_assembly_would_be_wrong_for_a_sequence_loss():
    """Why the contract exists: the fast path's -A_t w_t a_t equals GSPO's true gradient when A is
    constant within a response and misses it when A varies (train.tis_cap)."""
    for per_token, differs in ((False, False), (True, True)):
        logp, old, adv, mask = seq_batch(5, per_token_adv=per_token)
        lp = logp.clone().requires_grad_(True)
        out = policy_loss("gspo", lp, old, adv, mask, eps_low=0.02, eps_high=0.03)
        out.loss.backward()
        a = agg_weights_np(mask.numpy(), "seq-mean-token-mean")
        A = np.where(mask.numpy(), adv.numpy(), 0.0)
        fast = -A * out.weight.numpy() * a
        gap = np.abs(fast - lp.grad.numpy()).max() / np.abs(lp.grad.numpy()).max()
        # A constant: the same gradient up to GSPO's T-term row sum (T eps64 relative) and a few ulps.
        # A varying (x 0.3-1.7 within rows 0-2): the fast path misses it by tens of percent; 1e-2 is
        # the detection threshold, far from either
        T = mask.shape[1]
        assert (gap > 1e-2) if differs else (gap < 2 * T * EPS64 + 8 * EPS64), (per_token, gap)


# ----------------------------------------------------------------------------- the contract

def contract_cases():
    cases = [(name, {}) for name, e in LOSSES.items() if e.elementwise]
    cases += [("sapo", {"gate": g, "tau_pos": 10.0, "tau_neg": 12.0}) for g in GATES]
    cases += [("dppo", {"dppo_type": "binary_kl", "clip_c": 2.0}), ("aspo", {"top_entropy_eps": 0.4}),
              ("grpo", {"clip_c": 1.1}), ("aspo", {"clip_c": 1.1})]
    return cases


def surrogate_after_moving(name, params, b, t, seed=0):
    """(s, s with token (b, t)'s log-prob moved by 0.3), [B, T] each."""
    g = torch.Generator().manual_seed(seed)
    B, T = 5, 9
    old = -2.0 * torch.rand(B, T, generator=g, dtype=torch.float64) - 0.5
    logp = old + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)
    pos = (torch.randn(B, 1, generator=g) > 0).expand(B, T)
    mask = torch.ones(B, T, dtype=torch.bool)
    ent = torch.rand(B, T, generator=g, dtype=torch.float64)
    loss = LOSSES.build(name, **params)
    lo, hi = loss.params["eps_low"], loss.params["eps_high"]
    ctx_of = lambda lp: make_ratio_context(lp, old, pos, mask, lo, hi, entropy=ent)  # noqa: E731
    moved = logp.clone()
    moved[b, t] += 0.3
    return loss.surrogate(ctx_of(logp)).detach(), loss.surrogate(ctx_of(moved)).detach()


@pytest.mark.parametrize("case", contract_cases(), ids=lambda c: c[0] + "".join(f"-{k}={v}" for k, v in c[1].items()))
def test_elementwise_losses_keep_every_other_token_unchanged(case):
    """Perturb each token j in turn: every other token's surrogate stays bit-identical."""
    name, params = case
    for b, t in [(0, 0), (1, 4), (2, 8), (3, 3), (4, 6)]:
        base, moved = surrogate_after_moving(name, params, b, t)
        other = torch.ones_like(base, dtype=torch.bool)
        other[b, t] = False
        assert torch.equal(base[other], moved[other]), (name, params, b, t)


@pytest.mark.parametrize("name", ["gspo", "gmpo"])
def test_the_perturbation_check_sees_a_sequence_loss(name):
    """The same check flags a loss that mixes tokens (so it can fail)."""
    base, moved = surrogate_after_moving(name, {"eps_low": 0.5, "eps_high": 0.5}, 1, 4)
    assert not torch.equal(base[0], moved[0]) or not torch.equal(base[1, :4], moved[1, :4])


def test_a_sequence_loss_registered_as_elementwise_is_refused():
    def seq_mean_ratio(ctx, *, eps_low=0.2, eps_high=0.2):
        """l = -A * mean_t r_t over the response"""
        return (ctx.ratio * ctx.mask).sum(-1, keepdim=True).expand_as(ctx.ratio) / ctx.mask.sum(-1, keepdim=True)

    register_loss("test_seq_as_elementwise")(seq_mean_ratio)
    try:
        with pytest.raises(ValueError, match=r"elementwise=False"):
            LOSSES.build("test_seq_as_elementwise")
        with pytest.raises(ConfigError, match="test_seq_as_elementwise"):
            load_config(None, ["loss.name=test_seq_as_elementwise"])
        register_loss("test_seq_ok", elementwise=False)(seq_mean_ratio)
        LOSSES.build("test_seq_ok")                                       # declared honestly: fine
    finally:
        LOSSES.pop("test_seq_as_elementwise", None)
        LOSSES.pop("test_seq_ok", None)


# ----------------------------------------------------------------------------- dual clip, DPPO, ASPO entropy

# one float64 token: r comes back from exp(log r) (<= eps64 (1 + |ln r| / 2) relative) and the weight
# is r, a constant, or one division / product of it: 4 eps64
ONE_TOKEN_REL = 4 * EPS64


def one_token(loss, r, A, **hp):
    x = torch.tensor([[r]], dtype=torch.float64)
    out = policy_loss(loss, torch.log(x), torch.zeros_like(x), torch.tensor([A], dtype=torch.float64),
                      torch.ones_like(x, dtype=torch.bool), **hp)
    return out.weight.item(), out.token_loss.item()


@pytest.mark.parametrize("loss", ["grpo", "gppo", "ce_gppo"])
def test_dual_clip_inside_and_outside_the_trust_region(loss):
    # c = 1.1 < U = 1.2: a negative token at r = 1.15 (region M) is dual-clipped: weight 0, value -A c
    assert one_token(loss, 1.15, -1.0, clip_c=1.1) == (0.0, pytest.approx(1.1, rel=ONE_TOKEN_REL))
    # c = 3 > U: the same token keeps its plain weight r and value -A r
    w, v = one_token(loss, 1.15, -1.0, clip_c=3.0)
    assert w == pytest.approx(1.15, rel=ONE_TOKEN_REL) and v == pytest.approx(1.15, rel=ONE_TOKEN_REL)
    assert one_token(loss, 1.15, +1.0, clip_c=1.1)[0] == pytest.approx(1.15, rel=ONE_TOKEN_REL)   # positive: no dual clip


def test_aspo_soft_dual_clip_inside_the_trust_region():
    # c = 1.1: 1/c = 0.909 > L = 0.8, so a positive token at r = 0.85 (region M) has 1/r > c: weight c
    assert one_token("aspo", 0.85, +1.0, clip_c=1.1)[0] == pytest.approx(1.1, rel=ONE_TOKEN_REL)
    assert one_token("aspo", 0.85, +1.0, clip_c=3.0)[0] == pytest.approx(1 / 0.85, rel=ONE_TOKEN_REL)
    assert one_token("aspo", 1.15, -1.0, clip_c=1.1)[0] == pytest.approx(1.1, rel=ONE_TOKEN_REL)
    assert one_token("aspo", 1.15, -1.0, clip_c=3.0)[0] == pytest.approx(1.15, rel=ONE_TOKEN_REL)


def test_aspo_top_entropy_tokens_get_the_wider_clip():
    r = torch.tensor([[1.3, 1.3, 1.3, 1.3, 1.3], [0.7, 0.7, 0.7, 0.7, 0.7]], dtype=torch.float64)
    ent = torch.tensor([[0.1, 0.2, 0.3, 0.4, 2.0], [5.0, 4.0, 3.9, 3.8, 3.7]], dtype=torch.float64)  # per response, not per batch
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    mask = torch.ones_like(r, dtype=torch.bool)
    args = (torch.log(r), torch.zeros_like(r), adv, mask)
    plain = policy_loss("aspo", *args, entropy=ent)
    assert (plain.weight == 0).all()                                     # r = 1.3 > U (A > 0), 0.7 < L (A < 0)
    wide = policy_loss("aspo", *args, entropy=ent, top_entropy_eps=0.4)
    # the top 20% of each response (one token of five: the highest entropy) gets [0.6, 1.4]
    expect = torch.zeros_like(r)
    expect[0, 4], expect[1, 0] = 1 / 1.3, 0.7
    assert torch.allclose(wide.weight, expect, rtol=ONE_TOKEN_REL, atol=0)       # 1 / r and r, as one_token
    with pytest.raises(ValueError, match="entropy"):
        policy_loss("aspo", *args, top_entropy_eps=0.4)


def test_dppo_masks_by_the_probability_change():
    # pi_old = 0.5: pi = 0.75 is +0.25 (> delta_high 0.2): dropped for A > 0, kept for A < 0
    # r = exp(log pi - log pi_old): the two logs (|ln| <= 1.4) and the subtraction round at magnitude
    # <= 2.1 in ln r, exp adds an ulp: 4 eps64 relative, as ONE_TOKEN_REL
    assert one_dppo(0.5, 0.75, +1.0) == 0.0 and one_dppo(0.5, 0.75, -1.0) == pytest.approx(1.5, rel=ONE_TOKEN_REL)
    assert one_dppo(0.5, 0.65, +1.0) == pytest.approx(1.3, rel=ONE_TOKEN_REL)               # +0.15: inside
    assert one_dppo(0.5, 0.25, -1.0) == 0.0 and one_dppo(0.5, 0.25, +1.0) == pytest.approx(0.5, rel=ONE_TOKEN_REL)
    assert one_dppo(0.5, 0.65, +1.0, clip_c=1.2) == pytest.approx(1.2, rel=ONE_TOKEN_REL)   # weight min(r, c)
    # binary KL(Bern(0.5) || Bern(0.65)) = 0.5 ln(0.5/0.65) + 0.5 ln(0.5/0.35) = 0.04637
    kl = 0.5 * math.log(0.5 / 0.65) + 0.5 * math.log(0.5 / 0.35)
    assert one_dppo(0.5, 0.65, +1.0, dppo_type="binary_kl", delta_high=kl * 0.99) == 0.0
    assert one_dppo(0.5, 0.65, +1.0, dppo_type="binary_kl", delta_high=kl * 1.01) == pytest.approx(1.3, rel=ONE_TOKEN_REL)
    assert one_dppo(0.5, 0.65, -1.0, dppo_type="binary_kl", delta_low=kl * 0.5) == pytest.approx(1.3, rel=ONE_TOKEN_REL)


def one_dppo(pi_old, pi, A, **hp):
    old = torch.tensor([[math.log(pi_old)]], dtype=torch.float64)
    out = policy_loss("dppo", torch.tensor([[math.log(pi)]], dtype=torch.float64), old,
                      torch.tensor([A], dtype=torch.float64), torch.ones(1, 1, dtype=torch.bool), **hp)
    # value -A M min(r, c): the same float64 factors, one product
    assert out.token_loss.item() == pytest.approx(-A * out.weight.item(), rel=2 * EPS64)
    return out.weight.item()


# ----------------------------------------------------------------------------- plug-ins

PLUGIN = '''
import torch
from rlengine.losses import register_loss


def clipped_is(ctx, *, eps_low=0.2, eps_high=0.2, cap=2.0):
    """l = -A * min(r, cap)"""
    return torch.clamp(ctx.ratio, max=cap)


@register_loss("plugin_seq_mean", elementwise=False)
def seq_mean(ctx, *, eps_low=0.2, eps_high=0.2):
    """l = -A * mean_t r_t over the response"""
    return (ctx.ratio * ctx.mask).sum(-1, keepdim=True).expand_as(ctx.ratio) / ctx.mask.sum(-1, keepdim=True)


def tanh(x, tau):
    """f = 1 + tanh(tau (x - 1)) / tau"""
    return 1 + torch.tanh(tau * (x - 1)) / tau
'''


@pytest.fixture
def plugin_module(tmp_path, monkeypatch):
    (tmp_path / "user_losses_for_test.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "user_losses_for_test"
    sys.modules.pop("user_losses_for_test", None)
    for key in [k for k in LOSSES if "user_losses_for_test" in k or k == "plugin_seq_mean"]:
        LOSSES.pop(key)
    for key in [k for k in GATES if "user_losses_for_test" in k]:
        GATES.pop(key)


def test_plugin_loss_and_gate_from_the_config(plugin_module):
    cfg = load_config(ROOT / "configs" / "default.yaml", [f"loss.name={plugin_module}:clipped_is", "loss.cap=1.5"])
    assert cfg.loss.name == f"{plugin_module}:clipped_is" and cfg.loss.params["cap"] == 1.5
    w, _ = one_token(cfg.loss.name, 1.7, 1.0, cap=1.5)
    assert w == 0.0 and one_token(cfg.loss.name, 1.2, 1.0, cap=1.5)[0] == pytest.approx(1.2, rel=ONE_TOKEN_REL)
    # a decorated plug-in keeps its declaration (elementwise=False)
    cfg = load_config(None, [f"loss.name={plugin_module}:seq_mean"])
    assert LOSSES[cfg.loss.name].elementwise is False
    # a gate plug-in, used by SAPO
    cfg = load_config(None, ["loss.name=sapo", f"loss.gate={plugin_module}:tanh", "loss.tau_pos=2"])
    x = torch.tensor([[1.3]], dtype=torch.float64)
    out = policy_loss("sapo", torch.log(x), torch.zeros_like(x), torch.tensor([1.0], dtype=torch.float64),
                      torch.ones_like(x, dtype=torch.bool), **{k: v for k, v in cfg.loss.params.items()})
    # r = 1.3 back from exp(log r) (~2 ulps) moves u = 2 (r - 1) by ~5 eps64, and 1 - tanh^2 by
    # 2 tanh(0.6) = 1.07 times that, relatively; 1 - tanh^2 = 0.71 does not cancel: 16 eps64
    assert out.weight.item() == pytest.approx((1 - math.tanh(2 * 0.3) ** 2) * 1.3, rel=16 * EPS64)
    for bad, words in [(f"{plugin_module}:nope", ["loss.name", "nope"]), ("no_such_mod_x:f", ["no_such_mod_x"])]:
        with pytest.raises(ConfigError) as e:
            load_config(None, [f"loss.name={bad}"])
        assert all(w in str(e.value) for w in words), str(e.value)
    with pytest.raises(ConfigError, match="gate"):
        load_config(None, ["loss.name=sapo", f"loss.gate={plugin_module}:missing"])


def test_the_docs_example_works_as_printed(tmp_path, monkeypatch):
    """docs/losses.md's 'Adding a loss' block, written to a module, then used exactly as the docs say."""
    doc = (ROOT / "docs" / "losses.md").read_text()
    block = doc.split("```python\n", 1)[1].split("```", 1)[0]
    (tmp_path / "my_losses.py").write_text(textwrap.dedent(block))
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        line = next(ln for ln in doc.splitlines() if "loss.name=my_losses:my_loss" in ln)
        overrides = [w.strip("`,.") for w in line.split() if w.strip("`,.").startswith("loss.")]
        cfg = load_config(ROOT / "configs" / "default.yaml", overrides)
        assert cfg.loss.name == "my_loss" or cfg.loss.name == "my_losses:my_loss"
        assert cfg.loss.params["alpha"] == 0.3
        w, _ = one_token(cfg.loss.name, 1.5, 1.0, alpha=0.3)
        assert w == 0.0                                                   # clamp(max=1.3) above 1.3
    finally:
        sys.modules.pop("my_losses", None)
        for key in [k for k in LOSSES if k.startswith("my_loss")]:
            LOSSES.pop(key)


def test_top_entropy_selection_matches_numpy_quantile():
    """ASPO's per-response top-entropy set (a topk, not a sort) against numpy's linear quantile, with
    ties, empty rows and every response length."""
    from rlengine.losses.zoo import _top_entropy

    g = torch.Generator().manual_seed(0)
    for trial in range(60):
        B, T = 7, int(torch.randint(1, 40, (1,), generator=g))
        mask = torch.arange(T)[None] < torch.randint(0, T + 1, (B,), generator=g)[:, None]
        ent = torch.rand(B, T, generator=g, dtype=torch.float64)
        if trial % 3 == 0:
            ent = (ent * 4).round() / 4                                   # ties
        frac = float(torch.rand(1, generator=g)) * 0.9 + 0.05
        zeros = torch.zeros(B, T, dtype=torch.float64)
        got = _top_entropy(make_ratio_context(zeros, zeros, mask, mask, entropy=ent), frac).numpy().astype(bool)
        for b in range(B):
            values = ent[b][mask[b]].numpy()
            expect = np.zeros(T, dtype=bool)
            if len(values):
                expect = (ent[b].numpy() > np.quantile(values, 1 - frac)) & mask[b].numpy()
            np.testing.assert_array_equal(got[b], expect, err_msg=f"trial {trial} row {b} frac {frac}")
