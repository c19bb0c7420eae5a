"""Tests of the loss zoo against papers.md: per-region gradient weights (autograd and finite
differences), aggregation by hand, metrics by independent counts, stability, and bad input.

Reference weights are written here from the papers.md table, in numpy float64, independently of
rlengine/losses (which derives them by autograd of the loss functions).
"""
from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from rlengine import losses
from rlengine.losses import (
    AGG_MODES, GATES, LOSSES, REGION_PAD, REGIONS, aggregate, aggregation_weights, entropy_from_logits, entropy_term, kl_k1, kl_k2,
    kl_k3, kl_penalty, kl_term, loss_hyperparams, make_ratio_context, policy_loss, register_loss,
    validate_loss_params,
)
from tests.test_gates import assert_within, fprime_rtol

EPS64, EPS32 = torch.finfo(torch.float64).eps, torch.finfo(torch.float32).eps
EXPECTED_LOSSES = {"grpo", "cispo", "gppo", "ce_gppo", "aspo", "sapo", "dgpo", "dppo", "gspo", "gspo_token", "gmpo"}
SEQUENCE_LOSSES = {"gspo", "gspo_token", "gmpo"}   # elementwise=False; their tests: test_losses_sequence.py

# --------------------------------------------------------------------------- reference formulas


def gate_prime(gate: str, x: np.ndarray, tau: np.ndarray) -> np.ndarray:
    """f'(x) of the gate paper, eqs. (3), (6), (7), (8)."""
    u = tau * (x - 1.0)
    if gate == "sigmoid":
        e = np.exp(-np.abs(u))  # 4 s (1 - s) = 4 e^-|u| / (1 + e^-|u|)^2, no cancellation
        return 4 * e / (1 + e) ** 2
    if gate == "erf":
        return np.exp(-(u ** 2) / 2.0)
    if gate == "arctan":
        return 1.0 / (1.0 + u ** 2)
    if gate == "softsign":
        return (1.0 + u ** 2) ** -1.5
    raise KeyError(gate)


def reference_weight(name: str, r: np.ndarray, pos: np.ndarray, p: dict) -> np.ndarray:
    """w of papers.md's table (dl/dlogp = -A w), region by region."""
    L, U = 1.0 - p["eps_low"], 1.0 + p["eps_high"]
    c = p.get("clip_c")
    M = (r >= L) & (r <= U)
    LN, LP = (r < L) & ~pos, (r < L) & pos
    HP, HN = (r > U) & pos, (r > U) & ~pos
    w = np.full_like(r, np.nan)
    cap = np.ones_like(r, dtype=bool) if c is None else (r <= c)
    beyond_c = ~pos & ~cap          # the dual clip acts on every negative token with r > c (M too if c < U)
    if name == "grpo":
        w[M], w[LN], w[HP], w[LP] = r[M], 0.0, 0.0, r[LP]
        w[HN] = np.where(cap[HN], r[HN], 0.0)
        w[beyond_c] = 0.0
    elif name == "cispo":
        w[M], w[LN], w[HP], w[LP], w[HN] = r[M], L, U, L, U
        if L <= 0:
            w[LN | LP] = r[LN | LP]  # cannot happen: no r < L when L <= 0
    elif name in ("gppo", "ce_gppo"):
        b1, b2 = (p["beta1"], p["beta2"]) if name == "ce_gppo" else (1.0, 1.0)
        w[M], w[LN], w[HP], w[LP] = r[M], b1 * L, b2 * U, r[LP]
        w[HN] = np.where(cap[HN], r[HN], 0.0)
        w[beyond_c] = 0.0
    elif name == "aspo":
        w[M] = np.where(pos[M], 1.0 / r[M], r[M])
        w[LN], w[HP] = 0.0, 0.0
        w[LP] = 1.0 / r[LP] if c is None else np.where(r[LP] >= 1.0 / c, 1.0 / r[LP], c)
        w[HN] = r[HN] if c is None else np.where(r[HN] <= c, r[HN], c)
        if c is not None:   # soft dual clip wherever 1/r > c (A > 0) or r > c (A <= 0), M included
            w[(pos & (r < 1.0 / c)) | beyond_c] = c
    elif name == "sapo":
        tau = np.where(pos, p["tau_pos"], p["tau_neg"])
        w = gate_prime(p["gate"], r, tau) * r
    elif name == "dgpo":
        n, m = p["n"], p["m"]
        w[M], w[LP], w[HN] = r[M], r[LP], r[HN]
        w[LN] = r[LN] ** (n + 1) / L ** n
        w[HP] = U ** (1.0 / m) * r[HP] ** (1.0 - 1.0 / m)
    elif name == "dppo":
        pi_old, pi = p["pi_old"], p["pi_old"] * r
        if p["dppo_type"] == "binary_tv":
            drop = np.where(pos, pi - pi_old > p["delta_high"], pi - pi_old < -p["delta_low"])
        else:
            kl = pi_old * np.log(pi_old / pi) + (1 - pi_old) * np.log((1 - pi_old) / (1 - pi))
            drop = np.where(pos, (pi > pi_old) & (kl > p["delta_high"]), (pi < pi_old) & (kl > p["delta_low"]))
        w = np.where(drop, 0.0, r if c is None else np.minimum(r, c))
    else:
        raise KeyError(name)
    assert not np.isnan(w).any()
    return w


def weight_rtol(name: str, p: dict, r: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Relative bound on |w - w_ref| in float64, both from the same r: each table entry is r, a
    constant, 1 / r or a power of r (libm pow within 1 ulp), a few roundings: 16 eps64. SAPO's f'
    is sensitive to its argument u = tau (r - 1) (erf: |d ln f' / du| = |u|, up to ~38 before f'
    underflows): tests/test_gates.py's fprime_rtol."""
    if name == "sapo":
        return fprime_rtol(p["gate"], r, np.where(pos, p["tau_pos"], p["tau_neg"]), EPS64)
    return np.full(r.shape, 16 * EPS64)


def fd_bound(s_plus, s_minus, w, logp, r, h: float, tau=0.0) -> np.ndarray:
    """|central difference - w| bound for s(logp +- h) (float64): the two surrogate values round to a
    few ulps of their magnitude (4 eps |s| / h after the division by 2h); logp +- h, logp - old and
    exp carry eps (|logp| + |ln r| + 2) in ln r, which moves s by that times w (over h); truncation
    h^2 |s^(3)| / 6 with |s^(3)| <= (4 + tau r)^2 |w| (powers r^k, k <= 4; a gate adds tau r per
    derivative). 2x to spare."""
    S, aw = np.maximum(np.abs(s_plus), np.abs(s_minus)), np.abs(w)
    return 2 * (4 * EPS64 * S / h + EPS64 * (np.abs(logp) + np.abs(np.log(r)) + 2) * aw / h
                + h ** 2 * (4 + tau * r) ** 2 * aw / 6)


def reference_regions(r: np.ndarray, pos: np.ndarray, eps_low: float, eps_high: float) -> np.ndarray:
    L, U = 1.0 - eps_low, 1.0 + eps_high
    out = np.empty(r.shape, dtype=np.int64)
    for i, (ri, pi) in enumerate(zip(r.ravel(), pos.ravel())):
        if L <= ri <= U:
            out.flat[i] = REGIONS.index("M")
        elif ri < L:
            out.flat[i] = REGIONS.index("LP" if pi else "LN")
        else:
            out.flat[i] = REGIONS.index("HP" if pi else "HN")
    return out


# --------------------------------------------------------------------------- cases and data

LOSS_CASES = [
    ("grpo", {}),
    ("grpo", {"clip_c": None}),
    ("grpo", {"eps_low": 0.1, "eps_high": 0.28, "clip_c": 5.0}),
    ("cispo", {}),
    ("cispo", {"eps_low": 1.0, "eps_high": 4.0}),
    ("gppo", {}),
    ("gppo", {"clip_c": None}),
    ("ce_gppo", {}),
    ("ce_gppo", {"beta1": 0.5, "beta2": 1.5, "clip_c": 10.0}),
    ("aspo", {}),
    ("aspo", {"clip_c": None}),
    ("dgpo", {}),
    ("dgpo", {"n": 2.0, "m": 2.0}),
    ("dgpo", {"n": 0.0, "m": 1.0}),
    ("dgpo", {"n": 3.0, "m": 0.5, "eps_low": 0.3}),
    # the dual clip with c inside the trust region (c < U, 1/c > L for ASPO)
    ("grpo", {"clip_c": 1.1}),
    ("gppo", {"clip_c": 1.1}),
    ("ce_gppo", {"clip_c": 1.15, "beta1": 0.5}),
    ("aspo", {"clip_c": 1.1}),
    ("dppo", {}),
    ("dppo", {"dppo_type": "binary_kl", "delta_low": 0.05, "delta_high": 0.1, "clip_c": 2.0}),
    ("dppo", {"delta_low": 0.01, "delta_high": 0.02, "clip_c": 1.5}),
] + [("sapo", {"gate": g, "tau_pos": tp, "tau_neg": tn})
     for g in ("sigmoid", "erf", "arctan", "softsign") for tp, tn in ((1.0, 1.05), (10.0, 12.0))]


def case_id(case):
    name, p = case
    return name + "".join(f"-{k}={v}" for k, v in p.items())


def make_batch(seed: int = 0, B: int = 16, T: int = 48, dtype=torch.float64, boundaries=(0.8, 1.2, 3.0, 1 / 3.0),
               probabilities: bool = False):
    """Ratios log-uniform in [1e-3, 1e3] (half the tokens) or uniform in [0.5, 1.6] (the rest),
    both signs of A and A = 0 rows, right padding holding NaN / inf garbage. probabilities=True
    shifts old_logp so that logp <= -0.01 too (DPPO reads pi = exp(logp) as a probability)."""
    g = torch.Generator().manual_seed(seed)
    wide = torch.exp((torch.rand(B, T, generator=g, dtype=torch.float64) * 2 - 1) * math.log(1e3))
    near = 0.5 + 1.1 * torch.rand(B, T, generator=g, dtype=torch.float64)
    r = torch.where(torch.rand(B, T, generator=g) < 0.5, wide, near)
    # keep away from region / cap boundaries (the weight jumps there): 1e-4 relative is 100 finite-
    # difference steps (h = 1e-6 in log r) and ~1e11 float64 ulps, so neither straddles a jump
    for b in boundaries:
        r = torch.where((r / b - 1).abs() < 1e-4, r * 1.01, r)
    old_logp = -5 * torch.rand(B, T, generator=g, dtype=torch.float64)
    if probabilities:
        old_logp = old_logp - torch.log(r).clamp(min=0) - 0.01
    logp = old_logp + torch.log(r)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    adv[3 % B] = 0.0
    adv[7 % B] = 0.0
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = T
    mask = torch.arange(T)[None, :] < lengths[:, None]
    logp = torch.where(mask, logp, torch.nan)
    old_logp = torch.where(mask, old_logp, -torch.inf)
    return logp.to(dtype), old_logp.to(dtype), adv.to(dtype), mask


def full_params(name, p):
    return validate_loss_params(name, p)


def case_batch(seed: int, name: str, params: dict):
    """make_batch kept away from every weight discontinuity of this case (L, U, c, 1/c)."""
    c = params.get("clip_c") or 3.0
    return make_batch(seed, boundaries=(1 - params["eps_low"], 1 + params["eps_high"], c, 1 / c, 3.0, 1 / 3.0),
                      probabilities=name == "dppo")


def ref_params(params: dict, old: torch.Tensor, mask: torch.Tensor) -> dict:
    """params plus pi_old (DPPO's mask reads it); masked entries get a harmless placeholder."""
    return {**params, "pi_old": torch.exp(torch.where(mask, old, -1.0)).numpy()}


# --------------------------------------------------------------------------- registry and API


def test_registry_names_and_api():
    assert set(LOSSES) == EXPECTED_LOSSES
    assert set(GATES) == {"sigmoid", "erf", "arctan", "softsign"}
    assert AGG_MODES == ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
    assert REGIONS == ("M", "LN", "HP", "LP", "HN")
    for name in LOSSES:
        hp = loss_hyperparams(name)
        assert list(hp)[:2] == ["eps_low", "eps_high"]                   # every loss reports five regions
        if name not in ("gspo", "gspo_token", "gmpo"):
            assert hp["eps_low"] == 0.2 and hp["eps_high"] == 0.2
        assert re.search(r"\bl(_t)? = ", LOSSES[name].__doc__ or ""), name   # the formula in the docstring
        assert LOSSES[name].elementwise == (name not in SEQUENCE_LOSSES)
    # the papers' defaults, typed from the papers
    assert (loss_hyperparams("gspo")["eps_low"], loss_hyperparams("gspo")["eps_high"]) == (3e-4, 4e-4)
    assert loss_hyperparams("gspo_token") == loss_hyperparams("gspo")
    # the same float64 expressions as the library's defaults: only a different libm exp (1 ulp of
    # e^+-0.4, <= 3 ulps of the differences; the subtractions are exact by Sterbenz) could differ
    assert loss_hyperparams("gmpo") == {"eps_low": pytest.approx(1 - math.exp(-0.4), rel=4 * EPS64),
                                        "eps_high": pytest.approx(math.exp(0.4) - 1, rel=4 * EPS64)}
    assert loss_hyperparams("dppo") == {"eps_low": 0.2, "eps_high": 0.2, "dppo_type": "binary_tv",
                                        "delta_low": 0.2, "delta_high": 0.2, "clip_c": None}
    assert {n: LOSSES[n].agg for n in SEQUENCE_LOSSES} == dict.fromkeys(SEQUENCE_LOSSES, "seq-mean-token-mean")
    assert loss_hyperparams("aspo") == {"eps_low": 0.2, "eps_high": 0.2, "clip_c": 3.0, "top_entropy_eps": None,
                                        "top_entropy_frac": 0.2}
    assert loss_hyperparams("grpo") == {"eps_low": 0.2, "eps_high": 0.2, "clip_c": 3.0}
    for name in ("gppo", "ce_gppo", "aspo"):
        assert loss_hyperparams(name)["clip_c"] == 3.0
    assert "eps_low" not in LOSSES["sapo"].fn_params   # no trust region: eps only bound the reporting regions
    assert loss_hyperparams("sapo") == {"eps_low": 0.2, "eps_high": 0.2, "gate": "sigmoid",
                                        "tau_pos": 1.0, "tau_neg": 1.05}
    assert loss_hyperparams("dgpo") == {"eps_low": 0.2, "eps_high": 0.2, "n": 1.0, "m": 2.0}
    assert set(loss_hyperparams("ce_gppo")) == {"eps_low", "eps_high", "clip_c", "beta1", "beta2"}
    assert validate_loss_params("dgpo", {"n": 2}) == {"eps_low": 0.2, "eps_high": 0.2, "n": 2.0, "m": 2.0}


def test_entry_call_equals_policy_loss():
    logp, old, adv, mask = make_batch(1)
    a = LOSSES["dgpo"](logp, old, adv, mask, n=2.0)
    b = policy_loss("dgpo", logp, old, adv, mask, n=2.0)
    assert a.loss.item() == b.loss.item() and a.metrics == b.metrics


# --------------------------------------------------------------------------- gradient weights


@pytest.mark.parametrize("case", LOSS_CASES, ids=case_id)
def test_autograd_gradient_matches_closed_form_weight(case):
    name, p = case
    params = full_params(name, p)
    logp, old, adv, mask = case_batch(2, name, params)
    logp.requires_grad_(True)
    out = policy_loss(name, logp, old, adv, mask, **p)
    out.loss.backward()

    m = mask.numpy()
    r = torch.exp(torch.where(mask, logp.detach() - old, 0.0)).numpy()
    A = np.broadcast_to(adv.numpy()[:, None], r.shape)
    pos = A > 0
    regions = reference_regions(r, pos, params["eps_low"], params["eps_high"])
    reachable = range(5) if params["eps_low"] < 1 else (0, 2, 4)  # L <= 0: no r < L
    assert all((regions[m] == k).sum() >= 5 for k in reachable), "every region must be exercised"

    w_ref = reference_weight(name, r, pos, ref_params(params, old, mask))
    w_ref_masked = np.where(m, w_ref, 0.0)
    # the per-token weight output (defined for A = 0 tokens too) equals the table, per region
    rtol = weight_rtol(name, params, r, pos)
    for k, region in enumerate(REGIONS):
        sel = m & (regions == k)
        assert_within(out.weight.numpy()[sel], w_ref[sel], rtol=rtol[sel], atol=0), f"{name} {p} region {region}"
    # the gradient of the aggregated loss is -A w / N_tokens (2 more roundings); masked tokens get exactly 0
    grad = logp.grad.numpy()
    expected = np.where(m, -A * w_ref_masked / m.sum(), 0.0)
    assert_within(grad, expected, rtol=rtol + 2 * EPS64, atol=0)
    assert (grad[~m] == 0.0).all() and np.isfinite(grad).all()
    np.testing.assert_array_equal(out.region.numpy(), np.where(m, regions, REGION_PAD))


@pytest.mark.parametrize("case", LOSS_CASES, ids=case_id)
def test_finite_difference_weight(case):
    """w = ds/dlogp with the stop-gradient parts frozen at the current point, by central differences."""
    name, p = case
    params = full_params(name, p)
    logp, old, adv, mask = case_batch(3, name, params)
    pos = torch.broadcast_to(adv[:, None], logp.shape) > 0
    loss_fn = LOSSES.build(name, **p)
    h = 1e-6
    s = {}
    for sign in (1.0, -1.0):
        ctx = make_ratio_context(logp + sign * h, old, pos, mask, params["eps_low"], params["eps_high"], frozen_logp=logp)
        s[sign] = loss_fn.surrogate(ctx).detach()
    w_fd = ((s[1.0] - s[-1.0]) / (2 * h)).numpy()
    m = mask.numpy()
    r = torch.exp(torch.where(mask, logp - old, 0.0)).numpy()
    w_ref = reference_weight(name, r, pos.numpy(), ref_params(params, old, mask))
    err = np.abs(w_fd[m] - w_ref[m])
    tau = np.where(pos.numpy(), params["tau_pos"], params["tau_neg"]) if name == "sapo" else 0.0
    bound = fd_bound(s[1.0].numpy(), s[-1.0].numpy(), w_ref, logp.numpy(), r, h, tau)[m]
    assert (err <= bound).all(), (err / bound).max()


@pytest.mark.parametrize("case", [c for c in LOSS_CASES if c[0] in ("grpo", "sapo")], ids=case_id)
def test_finite_difference_of_loss_value(case):
    """For losses without stop-gradients the plain derivative of the per-token loss value is -A w."""
    name, p = case
    logp, old, adv, mask = make_batch(4)
    h = 1e-6
    plus = policy_loss(name, logp + h, old, adv, mask, **p).token_loss
    minus = policy_loss(name, logp - h, old, adv, mask, **p).token_loss
    fd = ((plus - minus) / (2 * h)).numpy()
    out = policy_loss(name, logp, old, adv, mask, **p)
    A = np.broadcast_to(adv.numpy()[:, None], fd.shape)
    m = mask.numpy()
    # fd_bound of the token loss -A s, whose derivative is -A w (one more rounding on the right)
    params = full_params(name, p)
    r = torch.exp(torch.where(mask, logp - old, 0.0)).numpy()
    tau = np.where(A > 0, params["tau_pos"], params["tau_neg"]) if name == "sapo" else 0.0
    bound = fd_bound(plus.numpy(), minus.numpy(), A * out.weight.numpy(), logp.numpy(), r, h, tau)
    assert_within(fd[m], (-A * out.weight.numpy())[m], rtol=2 * EPS64, atol=bound[m])


@pytest.mark.parametrize("n", [0.0, 0.5, 1.0, 2.0, 3.0])
@pytest.mark.parametrize("m", [0.5, 1.0, 2.0, 4.0, math.inf])
def test_dgpo_weight_continuous_at_boundaries(n, m):
    eps_low, eps_high = 0.2, 0.28
    L, U = 1 - eps_low, 1 + eps_high
    d = 1e-9
    r = torch.tensor([[L * (1 - d), L * (1 + d), U * (1 - d), U * (1 + d)]], dtype=torch.float64)
    for sign, pair in ((-1.0, slice(0, 2)), (1.0, slice(2, 4))):  # LN | M at L (A<0), M | HP at U (A>0)
        out = policy_loss("dgpo", torch.log(r), torch.zeros_like(r), torch.tensor([sign], dtype=torch.float64),
                          torch.ones_like(r, dtype=torch.bool), n=n, m=m, eps_low=eps_low, eps_high=eps_high)
        w = out.weight[0, pair]
        # continuous: the two points are 2 d r apart and |dw/dr| <= max(n + 1, 1) on either side
        # ((r/L)^n r and U^(1/m) r^(1 - 1/m)), plus a few roundings of w ~ U; 2x to spare.
        # GRPO's jump at L is 0.8 (next test)
        assert abs(w[0] - w[1]).item() < 2 * (max(n + 1, 1.0) * 2 * d * U + 8 * EPS64 * U), (n, m, sign, w)
        assert out.region[0, pair].tolist() == ([1, 0] if sign < 0 else [0, 2])


def test_grpo_weight_jumps_at_boundary():
    """The continuity check can fail: GRPO's weight drops from L to 0 across r = L (A < 0)."""
    L, d = 0.8, 1e-9
    r = torch.tensor([[L * (1 - d), L * (1 + d)]], dtype=torch.float64)
    out = policy_loss("grpo", torch.log(r), torch.zeros_like(r), torch.tensor([-1.0], dtype=torch.float64),
                      torch.ones_like(r, dtype=torch.bool))
    # inside, w = r = L (1 + d): off L by L d, plus the log / exp round trip of r (a few ulps)
    assert out.weight[0, 0].item() == 0.0 and abs(out.weight[0, 1].item() - L) < L * d + 8 * EPS64 * L


def test_dgpo_limits():
    """n = 0 and m = inf give plain IS (w = r); m = 1 gives GPPO's HP weight U."""
    logp, old, adv, mask = make_batch(5)
    r = torch.exp(torch.where(mask, logp - old, 0.0))
    plain = policy_loss("dgpo", logp, old, adv, mask, n=0.0, m=math.inf)
    # float64 r^1 / L^0 and U^0 r^1: r up to a pow's ulp and a rounding or two
    assert torch.allclose(plain.weight[mask], r[mask], rtol=4 * EPS64, atol=0)
    gp = policy_loss("dgpo", logp, old, adv, mask, m=1.0)
    hp = gp.region == REGIONS.index("HP")
    # U^1 r^0 = U = 1.2 (float64 1 + 0.2), likewise up to a few ulps
    assert hp.any() and torch.allclose(gp.weight[hp], torch.full_like(gp.weight[hp], 1.2), rtol=4 * EPS64, atol=0)


def test_dgpo_decays_where_cispo_diverges():
    """Relative weight on LN as r -> 0: DGPO (r/L)^n -> 0, CISPO / GPPO L/r -> inf."""
    r = torch.tensor([[1e-1, 1e-2, 1e-3]], dtype=torch.float64)
    args = (torch.log(r), torch.zeros_like(r), torch.tensor([-1.0], dtype=torch.float64), torch.ones_like(r, dtype=torch.bool))
    rel = {name: (policy_loss(name, *args).weight / r)[0] for name in ("dgpo", "cispo", "gppo")}
    # a decay criterion, not a rounding bound: (r/L)^1 at r = 1e-3 is 1.25e-3, CISPO's L / r is 800
    assert (rel["dgpo"].diff() < 0).all() and rel["dgpo"][-1] < 1e-2
    for name in ("cispo", "gppo"):
        assert (rel[name].diff() > 0).all() and rel[name][-1] > 700


# --------------------------------------------------------------------------- stability and dtypes


@pytest.mark.parametrize("case", LOSS_CASES, ids=case_id)
def test_extreme_log_ratios_are_finite_float32(case):
    name, p = case
    B, T = 4, 61
    lr = torch.linspace(-30, 30, T).repeat(B, 1)
    old = torch.full((B, T), -3.0)
    logp = (old + lr).requires_grad_(True)
    adv = torch.tensor([1.5, -2.0, 0.0, 0.3])
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[3, -5:] = False
    out = policy_loss(name, logp, old, adv, mask, **p)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(logp.grad).all()
    assert torch.isfinite(out.weight).all() and torch.isfinite(out.ratio).all()
    assert all(math.isfinite(v) for v in out.metrics.values())
    assert (logp.grad[3, -5:] == 0).all()


def test_masked_garbage_gets_exactly_zero_gradient():
    logp, old, adv, mask = make_batch(6, dtype=torch.float32)
    adv_tok = torch.where(mask, adv[:, None].expand_as(mask), torch.inf)  # [B, T] with inf padding
    logp = torch.where(mask, logp, torch.inf).requires_grad_(True)
    for name in LOSSES:
        logp.grad = None
        out = policy_loss(name, logp, old, adv_tok, mask)
        out.loss.backward()
        assert torch.isfinite(out.loss), name
        assert (logp.grad[~mask] == 0).all() and torch.isfinite(logp.grad).all(), name
        assert (out.weight[~mask] == 0).all() and (out.token_loss[~mask] == 0).all()


def test_per_token_advantages_equal_per_sequence():
    logp, old, adv, mask = make_batch(7)
    for name in LOSSES:
        a = policy_loss(name, logp, old, adv, mask)
        b = policy_loss(name, logp, old, adv[:, None].expand_as(logp).clone(), mask)
        assert a.loss.item() == b.loss.item() and a.metrics == b.metrics


def test_bfloat16_logp_computes_in_float32():
    logp, old, adv, mask = make_batch(8, dtype=torch.float32)
    logp = torch.where(mask, logp, 0.0).to(torch.bfloat16).requires_grad_(True)
    for name in LOSSES:
        out = policy_loss(name, logp, old, adv, mask)
        ref = policy_loss(name, logp.detach().float(), old, adv, mask)
        assert out.loss.dtype == torch.float32 and out.weight.dtype == torch.float32
        assert torch.equal(out.weight, ref.weight) and out.loss.item() == ref.loss.item()
        (g,) = torch.autograd.grad(out.loss, logp)
        assert g.dtype == torch.bfloat16 and torch.isfinite(g).all()


def test_no_grad_context_still_reports_weights():
    logp, old, adv, mask = make_batch(9)
    with torch.no_grad():
        out = policy_loss("dgpo", logp, old, adv, mask)
    ref = policy_loss("dgpo", logp, old, adv, mask)
    assert torch.equal(out.weight, ref.weight) and out.metrics == ref.metrics


# --------------------------------------------------------------------------- aggregation


def test_aggregation_by_hand():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)  # row 2: padding only
    values = torch.where(mask, values, torch.nan)  # masked NaN must not leak
    # float32: sums of small integers are exact; the divisions (by lengths, rows, max_len) and the
    # weights they make round <= 3 times, each <= eps32 / 2 relative
    rel = 2 * EPS32
    assert aggregate(values, mask, "token-mean").item() == pytest.approx((1 + 2 + 4) / 3, rel=rel)
    assert aggregate(values, mask, "seq-mean-token-mean").item() == pytest.approx(((1 + 2) / 2 + 4 / 1) / 2, rel=rel)
    assert aggregate(values, mask, "seq-mean-token-sum-norm").item() == pytest.approx(7 / (2 * 3), rel=rel)
    assert aggregate(values, mask, "seq-mean-token-sum-norm", max_len=10).item() == pytest.approx(7 / (2 * 10), rel=rel)
    empty = torch.zeros_like(mask)
    for agg in AGG_MODES:
        assert aggregate(values, empty, agg).item() == 0.0


@pytest.mark.parametrize("agg", AGG_MODES)
def test_aggregation_weights_match_aggregate(agg):
    g = torch.Generator().manual_seed(3)
    values = torch.randn(6, 9, generator=g, dtype=torch.float64)
    mask = torch.rand(6, 9, generator=g) < 0.6
    mask[2] = False
    weights = aggregation_weights(mask, agg, 20 if agg.endswith("norm") else None, torch.float64)
    assert (weights[~mask] == 0).all()
    # two float64 sums of the same <= n = 54 signed terms in different orders: each within
    # n eps64 sum|terms| of the exact value (recursive summation; torch's is pairwise, tighter)
    terms = (weights * values).abs().sum().item()
    assert (weights * values).sum().item() == pytest.approx(
        aggregate(values, mask, agg, 20 if agg.endswith("norm") else None).item(), abs=2 * mask.numel() * EPS64 * terms)


@pytest.mark.parametrize("agg", AGG_MODES)
def test_aggregation_sets_gradient_scale(agg):
    logp, old, adv, mask = make_batch(10)
    mask[5] = False  # an all-padding row is not a sequence
    logp.requires_grad_(True)
    out = policy_loss("cispo", logp, old, adv, mask, agg=agg, max_len=64 if agg.endswith("norm") else None)
    out.loss.backward()
    m = mask.numpy()
    lengths = np.maximum(m.sum(1, keepdims=True), 1)
    B = m.shape[0] - 1
    scale = {"token-mean": 1.0 / m.sum(), "seq-mean-token-mean": 1.0 / (B * lengths),
             "seq-mean-token-sum-norm": 1.0 / (B * 64)}[agg]
    A = adv.numpy()[:, None]
    expected = np.where(m, -A * out.weight.numpy() * scale, 0.0)
    # float64 products of the same factors in another order: a few roundings each
    np.testing.assert_allclose(logp.grad.numpy(), expected, rtol=8 * EPS64, atol=0)
    # the value is the same aggregation of the per-token loss, computed by hand
    tl = out.token_loss.numpy()
    of = lambda t: {"token-mean": t[m].sum() / m.sum(), "seq-mean-token-mean": np.sum(t.sum(1) / lengths[:, 0]) / B,  # noqa: E731
                    "seq-mean-token-sum-norm": t.sum() / (B * 64)}[agg]
    # signed sums of <= n tokens in two orders: n eps64 of the same aggregation of |token loss|, each way
    assert out.loss.item() == pytest.approx(of(tl), abs=2 * m.sum() * EPS64 * of(np.abs(tl)))


# --------------------------------------------------------------------------- metrics


@pytest.mark.parametrize("case", [("grpo", {}), ("dgpo", {"n": 2.0}), ("aspo", {}), ("sapo", {"gate": "erf", "tau_pos": 10.0, "tau_neg": 12.0}), ("cispo", {})], ids=case_id)
def test_metrics_against_independent_counts(case):
    name, p = case
    params = full_params(name, p)
    logp, old, adv, mask = make_batch(11)
    out = policy_loss(name, logp, old, adv, mask, **p)
    mt = out.metrics
    assert all(type(v) is float for v in mt.values())
    m = mask.numpy()
    lp, ol = logp.numpy()[m], old.numpy()[m]
    r = np.exp(lp - ol)
    A = np.broadcast_to(adv.numpy()[:, None], m.shape)[m]
    pos = A > 0
    L, U = 1 - params["eps_low"], 1 + params["eps_high"]
    counts = {"M": ((r >= L) & (r <= U)).sum(), "LN": ((r < L) & ~pos).sum(), "HP": ((r > U) & pos).sum(),
              "LP": ((r < L) & pos).sum(), "HN": ((r > U) & ~pos).sum()}
    N = m.sum()
    # Tolerances (float64). A fraction is an exact count over N, rounded once (eps64 / 2) on each side.
    # A mean of N nonnegative terms is off by <= N eps64 relative (summation) plus the terms' own
    # relative error: weight_rtol for w / r, 2 eps64 for r (torch's exp vs numpy's).
    for k in REGIONS:
        assert mt[f"frac_{k}"] == pytest.approx(counts[k] / N, abs=EPS64)
    assert sum(mt[f"frac_{k}"] for k in REGIONS) == pytest.approx(1.0, abs=2 * len(REGIONS) * EPS64)
    w = reference_weight(name, r, pos, params)
    rel = w / r
    rel_tol = N * EPS64 + weight_rtol(name, params, r, pos).max() + 2 * EPS64
    assert mt["eur"] == pytest.approx(rel.mean(), rel=rel_tol)
    for k, sel in (("M", (r >= L) & (r <= U)), ("LN", (r < L) & ~pos), ("HP", (r > U) & pos)):
        assert mt[f"w_{k}"] == pytest.approx(rel[sel].mean(), rel=rel_tol)
    assert mt["ratio_min"] == pytest.approx(r.min(), rel=2 * EPS64)
    assert mt["ratio_max"] == pytest.approx(r.max(), rel=2 * EPS64)
    assert mt["ratio_mean"] == pytest.approx(r.mean(), rel=N * EPS64 + 2 * EPS64)
    # k3 = 1/r - 1 + log r >= 0 cancels near r = 1: each term is off by a few eps64 of 1/r + 1 + |log r|
    # (absolute), and the N-term sum by N eps64 of the (nonnegative) total
    k3 = 1 / r - 1 + np.log(r)
    assert mt["kl_old"] == pytest.approx(k3.mean(), abs=4 * EPS64 * np.mean(1 / r + 1 + np.abs(np.log(r))) + N * EPS64 * k3.mean())
    assert mt["adv_pos_frac"] == pytest.approx(pos.mean(), abs=EPS64)
    assert mt["n_tokens"] == N
    # 1e-5 here is not a tolerance of this test: it is rlengine's definition of clipped (CLIP_REL_TOL)
    assert mt["clip_frac"] == pytest.approx(np.mean(np.abs(w - r) > 1e-5 * r), abs=EPS64)
    assert mt["zero_weight_frac"] == pytest.approx(np.mean(w == 0), abs=EPS64)
    assert mt["loss"] == out.loss.item()                                 # the same float64 number


def test_grpo_eur_is_one_minus_clip_fraction():
    """The gate paper: without dual clip, GRPO's EUR = 1 - clip_ratio."""
    logp, old, adv, mask = make_batch(12)
    mt = policy_loss("grpo", logp, old, adv, mask, clip_c=None).metrics
    # float64 fractions of exact counts (w / r is exactly 1 or 0 here): one rounding each, plus the
    # subtraction or sum on the right
    assert mt["eur"] == pytest.approx(1 - mt["clip_frac"], abs=2 * EPS64)
    assert mt["clip_frac"] == pytest.approx(mt["zero_weight_frac"], abs=EPS64)
    assert mt["clip_frac"] == pytest.approx(mt["frac_LN"] + mt["frac_HP"], abs=2 * EPS64)


def test_empty_region_reports_zero_weight_and_empty_mask():
    r = torch.tensor([[1.0, 1.1]], dtype=torch.float64)
    mt = policy_loss("dgpo", torch.log(r), torch.zeros_like(r), torch.tensor([1.0]), torch.ones_like(r, dtype=torch.bool)).metrics
    assert mt["frac_M"] == 1.0 and mt["w_LN"] == 0.0 and mt["w_HP"] == 0.0
    empty = policy_loss("grpo", torch.log(r), torch.zeros_like(r), torch.tensor([1.0]), torch.zeros_like(r, dtype=torch.bool))
    assert empty.loss.item() == 0.0 and all(math.isfinite(v) for v in empty.metrics.values())


# --------------------------------------------------------------------------- KL and entropy


def test_kl_estimators():
    g = torch.Generator().manual_seed(0)
    logp = (-3 * torch.rand(5, 7, generator=g, dtype=torch.float64)).requires_grad_(True)
    ref = -3 * torch.rand(5, 7, generator=g, dtype=torch.float64)
    d = (ref - logp).detach().numpy()
    # float64, the same subtraction on both sides (k1 exactly -d; k2 adds a square and a halving)
    np.testing.assert_allclose(kl_k1(logp, ref).detach().numpy(), -d, rtol=EPS64, atol=0)
    np.testing.assert_allclose(kl_k2(logp, ref).detach().numpy(), d ** 2 / 2, rtol=2 * EPS64, atol=0)
    k3 = kl_k3(logp, ref)
    # expm1(d) - d against the reference's exp(d) - d - 1, which cancels to a few eps64 of
    # e^d + |d| + 1 (absolute); the same for the gradient 1 - e^d
    assert_within(k3.detach().numpy(), np.exp(d) - d - 1, rtol=4 * EPS64, atol=4 * EPS64 * (np.exp(d) + np.abs(d) + 1))
    assert (k3 >= 0).all()
    (g3,) = torch.autograd.grad(k3.sum(), logp)
    assert_within(g3.numpy(), 1 - np.exp(d), rtol=4 * EPS64, atol=4 * EPS64 * (np.exp(d) + 1))  # d k3 / d logp
    assert torch.equal(kl_penalty(logp, ref, "k2"), kl_k2(logp, ref))
    mask = torch.ones(5, 7, dtype=torch.bool)
    mask[0, 3:] = False
    # a float64 mean of n signed terms in two orders: n eps64 of mean |d|, each way
    n = int(mask.sum())
    assert kl_term(logp, ref, mask, "k1").item() == pytest.approx((-d)[mask.numpy()].mean(),
                                                                   abs=2 * n * EPS64 * np.abs(d)[mask.numpy()].mean())
    with pytest.raises(ValueError, match="k4.*k1, k2, k3"):
        kl_penalty(logp, ref, "k4")
    assert torch.isfinite(kl_k3(torch.zeros(3), torch.tensor([-30.0, 0.0, 30.0]))).all()


def test_entropy():
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [10.0, 0.0, 0.0, 0.0]]], dtype=torch.float64)
    ent = entropy_from_logits(logits)
    p = np.exp([10.0, 0, 0, 0]) / np.exp([10.0, 0, 0, 0]).sum()
    # float64 log-softmax subtracts the logsumexp (~max|z| = 10) from every logit: each log-prob is off
    # by a few eps64 of max|z| + 1 absolute, and the entropy weighs those errors by p (summing to 1)
    np.testing.assert_allclose(ent.numpy()[0], [math.log(4), -(p * np.log(p)).sum()], rtol=0,
                               atol=8 * EPS64 * (float(logits.abs().max()) + 1))
    mask = torch.tensor([[True, False]])
    # one token: log 4 through the float64 log-softmax and the mean of one value, ~6 roundings
    assert entropy_term(ent, mask).item() == pytest.approx(math.log(4), rel=8 * EPS64)
    assert entropy_from_logits(logits.bfloat16()).dtype == torch.float32


# --------------------------------------------------------------------------- extension


def test_register_loss_with_one_function():
    @register_loss("test_plain_is")
    def test_plain_is(ctx, *, eps_low=0.2, eps_high=0.2, scale=2.0):
        """l = -A * scale * r"""
        return scale * ctx.ratio

    try:
        assert loss_hyperparams("test_plain_is") == {"eps_low": 0.2, "eps_high": 0.2, "scale": 2.0}
        logp, old, adv, mask = make_batch(13)
        out = policy_loss("test_plain_is", logp, old, adv, mask, scale=3.0)
        r = torch.exp(torch.where(mask, logp - old, 0.0))
        assert torch.allclose(out.weight[mask], 3.0 * r[mask], rtol=2 * EPS64, atol=0)   # float64 3 r: one product
        with pytest.raises(ValueError, match="scale"):
            policy_loss("test_plain_is", logp, old, adv, mask, scale="big")
        with pytest.raises(ValueError, match="already registered"):
            register_loss("test_plain_is")(test_plain_is)
        # a loss without a trust region of its own reports its regions with the loss section's bounds
        register_loss("test_no_eps")(lambda ctx, *, scale=1.0: scale * ctx.ratio)
        out = policy_loss("test_no_eps", logp, old, adv, mask, eps_low=0.5, eps_high=0.5)
        r_m = r[mask]
        assert out.metrics["frac_M"] == pytest.approx(float(((r_m >= 0.5) & (r_m <= 1.5)).double().mean()), abs=EPS64)
        with pytest.raises(TypeError, match="keyword-only"):
            register_loss("test_bad")(lambda ctx, **kw: ctx.ratio)
    finally:
        LOSSES.pop("test_plain_is", None)
        LOSSES.pop("test_no_eps", None)


# --------------------------------------------------------------------------- bad input


def _raises(match_all, fn, *args, **kwargs):
    with pytest.raises(ValueError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    for part in match_all:
        assert part in msg, (part, msg)


def test_bad_inputs_raise_clear_errors():
    logp, old, adv, mask = make_batch(14, B=4, T=5)
    args = (logp, old, adv, mask)
    _raises(["'foo'", "grpo", "dgpo", "sapo"], policy_loss, "foo", *args)
    _raises(["'foo'", "grpo"], loss_hyperparams, "foo")
    _raises(["'foo'", "grpo"], validate_loss_params, "foo", {})
    _raises(["'grpo'", "'tau_pos'", "eps_low", "clip_c"], policy_loss, "grpo", *args, tau_pos=1.0)
    _raises(["'cispo'", "'clip_c'", "eps_high"], policy_loss, "cispo", *args, clip_c=3.0)
    _raises(["'dgpo'", "'beta1'", "n", "m"], validate_loss_params, "dgpo", {"beta1": 0.5})
    _raises(["'sapo'", "'gate'", "'tanh'", "arctan, erf, sigmoid, softsign"], policy_loss, "sapo", *args, gate="tanh")
    for name in LOSSES:
        for key in ("eps_low", "eps_high"):
            _raises([f"'{name}'", f"'{key}'", ">= 0"], policy_loss, name, *args, **{key: -0.1})
    for key in ("tau_pos", "tau_neg"):
        for bad in (0.0, -1.0):
            _raises(["'sapo'", f"'{key}'", "> 0"], policy_loss, "sapo", *args, **{key: bad})
    _raises(["'dgpo'", "'n'", ">= 0"], policy_loss, "dgpo", *args, n=-1.0)
    for bad in (0.0, -2.0):
        _raises(["'dgpo'", "'m'", "> 0"], policy_loss, "dgpo", *args, m=bad)
    for name in ("grpo", "gppo", "ce_gppo", "aspo"):
        for bad in (1.0, 0.5, -3.0):
            _raises([f"'{name}'", "'clip_c'", "> 1", "None"], policy_loss, name, *args, clip_c=bad)
        validate_loss_params(name, {"clip_c": None})  # None turns dual clip off
    _raises(["'ce_gppo'", "'beta1'", ">= 0"], validate_loss_params, "ce_gppo", {"beta1": -0.5})
    _raises(["'grpo'", "'eps_low'", "number"], validate_loss_params, "grpo", {"eps_low": "wide"})
    _raises(["'grpo'", "'eps_low'", "finite"], validate_loss_params, "grpo", {"eps_low": math.nan})
    _raises(["'grpo'", "'eps_low'", "number"], validate_loss_params, "grpo", {"eps_low": True})
    _raises(["'grpo'", "'eps_low'", "number"], validate_loss_params, "grpo", {"eps_low": None})
    _raises(["'sum'", "token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"], policy_loss, "grpo", *args, agg="sum")
    _raises(["'sum'", "token-mean"], aggregate, logp, mask, "sum")
    _raises(["max_len", "0"], aggregate, old, mask, "seq-mean-token-sum-norm", 0)
    _raises(["'grpo'", "old_logp", "(4, 4)"], policy_loss, "grpo", logp, old[:, :4], adv, mask)
    _raises(["'grpo'", "mask"], policy_loss, "grpo", logp, old, adv, mask[:, :4])
    _raises(["'grpo'", "advantages", "[B]"], policy_loss, "grpo", logp, old, adv[:3], mask)
    _raises(["'grpo'", "logp", "[B, T]"], policy_loss, "grpo", logp[0], old[0], adv, mask[0])
    # numeric strings (CLI overrides) are accepted and converted
    assert validate_loss_params("sapo", {"tau_pos": "10"})["tau_pos"] == 10.0
    assert validate_loss_params("grpo", {"clip_c": "none"})["clip_c"] is None


def test_public_module_exports():
    for name in ("LOSSES", "GATES", "policy_loss", "aggregate", "AGG_MODES", "REGIONS", "loss_hyperparams",
                 "validate_loss_params", "kl_k1", "kl_k2", "kl_k3", "kl_penalty", "entropy_term", "register_loss",
                 "register_gate"):
        assert hasattr(losses, name)


def test_ratio_statistics_ignore_padding():
    r = torch.tensor([[2.0, 3.0, 1.0], [1.5, 1.0, 1.0]], dtype=torch.float64)  # padding would read as r = 1
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    mt = policy_loss("grpo", torch.log(r), torch.zeros_like(r), torch.tensor([1.0, -1.0]), mask).metrics
    # float64: r back from exp(log r) (a few ulps), a 3-term sum and a division; fractions round once
    assert (mt["ratio_min"], mt["ratio_max"]) == (pytest.approx(1.5, rel=4 * EPS64), pytest.approx(3.0, rel=4 * EPS64))
    assert mt["ratio_mean"] == pytest.approx(6.5 / 3, rel=8 * EPS64) and mt["n_tokens"] == 3.0
    assert mt["frac_M"] == 0.0 and mt["frac_HP"] == pytest.approx(2 / 3, abs=EPS64)
    assert mt["frac_HN"] == pytest.approx(1 / 3, abs=EPS64)
