"""The loss zoo: one registered pure function per policy loss (docs/losses.md, the formula sheet
the code cites; symbols as in papers.md).

Each function maps the ratio context to the surrogate s [B, T]; the per-token loss is
l = -A * s and the gradient weight is w = ds/dlogp (dl/dlogp = -A * w). `ctx.ratio` is r
(with gradient), `ctx.ratio_sg` is sg(r), `ctx.positive` is A > 0, `ctx.logp` is log pi_theta.
L = 1 - eps_low, U = 1 + eps_high, c = clip_c. Region conditions use sg(r).

Token-level (elementwise) weights per region (M / LN / HP / LP / HN):
  grpo     r (0 if A<=0, r>c) | 0     | 0               | r              | r if r <= c else 0
  cispo    r      | L         | U               | L              | U
  gppo     r (0 if A<=0, r>c) | L     | U               | r              | r if r <= c else 0
  ce_gppo  r (0 if A<=0, r>c) | beta1 L | beta2 U       | r              | r if r <= c else 0
  aspo     r (A<0), 1/r (A>0), c past c | 0 | 0         | 1/r if r >= 1/c else c | r if r <= c else c
  sapo     f'(r) r everywhere
  dgpo     r      | r^(n+1)/L^n | U^(1/m) r^(1-1/m) | r           | r
  dppo     M_t min(r, c) everywhere (M_t: the probability-change mask)
Sequence-level (elementwise=False): gspo, gspo_token, gmpo (see their docstrings).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from rlengine.losses.core import RatioContext, greater, less, register_loss, select, sequence_mean, sequence_ratio
from rlengine.losses.gates import apply_gate

# Implementation notes. The region indicators ctx.M, ctx.LN, ctx.HP, ctx.LP, ctx.HN (float 0/1,
# from sg(r), shared with the metrics) and `select(c, a, b)` ("a where c else b") replace
# branching on r and on the sign of A. Several papers write their loss as r times a
# stop-gradient factor (GPPO's r / sg(r), ASPO's p / sg(p)^2, DGPO's r (sg(r)/L)^n); the code
# does the same: a factor k built from sg(r) alone, so the only operation carrying gradient is
# r * k, whose derivative w.r.t. logp is w = r k.


def _dual_clip(ctx: RatioContext, clip_c: float | None) -> Tensor | None:
    """Indicator of the negative tokens (A <= 0) beyond the dual-clip threshold, sg(r) > c, in
    whatever region they lie: with c <= U that includes tokens of M (papers.md's
    min(max(r, L), c)), not only HN. (Masked tokens have r = 1 < c.)"""
    if clip_c is None:
        return None
    return ctx.is_neg * greater(ctx.ratio_sg, clip_c)


@register_loss("grpo")
def grpo(ctx: RatioContext, *, eps_low: float = 0.2, eps_high: float = 0.2, clip_c: float | None = 3.0) -> Tensor:
    """GRPO: PPO clip (DeepSeekMath) with dual clip c (Ye et al. 2020).

    A > 0:  l = -A * min(r, U)
    A <= 0: l = -A * min(max(r, L), c)      (clip_c=None: l = -A * max(r, L))
    Equivalently l = -max(min(r A, clip(r, L, U) A), c A) for A < 0.
    w: M r, LN 0, HP 0, LP r, HN r if r <= c else 0; with c < U also 0 on the M tokens with
    A <= 0 and r > c (the dual clip acts wherever r > c).
    """
    s = select(ctx.HP, ctx.U, select(ctx.LN, ctx.L, ctx.ratio))          # min(r, U) | max(r, L)
    beyond_c = _dual_clip(ctx, clip_c)
    return s if beyond_c is None else select(beyond_c, clip_c, s)         # min(., c) for A <= 0


@register_loss("cispo")
def cispo(ctx: RatioContext, *, eps_low: float = 0.2, eps_high: float = 0.2) -> Tensor:
    """CISPO (MiniMax-M1): l = -sg(clip(r, L, U)) * A * logp.

    The weight is clipped, every token keeps its gradient: w = clip(r, L, U), i.e.
    M r, LN L, HP U, LP L, HN U. MiniMax uses no lower bound: eps_low >= 1 gives that.
    """
    return torch.clamp(ctx.ratio_sg, min=ctx.L, max=ctx.U) * ctx.logp


def _gradient_preserving(ctx: RatioContext, clip_c: float | None, beta1: float, beta2: float) -> Tensor:
    """GPPO / CE-GPPO: r * sg(k) with k = beta2 U / r on HP, beta1 L / r on LN, 1 elsewhere;
    the dual clip replaces the value by the constant c (no gradient)."""
    inv = torch.reciprocal(ctx.ratio_sg)                                  # 1 / sg(r)
    k = select(ctx.HP, (beta2 * ctx.U) * inv, select(ctx.LN, (beta1 * ctx.L) * inv, 1.0))
    s = ctx.ratio * k
    beyond_c = _dual_clip(ctx, clip_c)
    return s if beyond_c is None else select(beyond_c, clip_c, s)


@register_loss("gppo")
def gppo(ctx: RatioContext, *, eps_low: float = 0.2, eps_high: float = 0.2, clip_c: float | None = 3.0) -> Tensor:
    """GPPO (Klear-Reasoner): PPO clip with gradient-carrying bounds, plus dual clip for A <= 0.

    l = -A * clip(r, L r / sg(r), U r / sg(r)) inside the PPO max (value as PPO clip):
    A > 0:  l = -A * (U r / sg(r) if r > U else r)
    A <= 0: l = -A * (L r / sg(r) if r < L else r), and l = -A c if r > c (dual clip, no gradient)
    w: M r, LN L, HP U, LP r, HN r if r <= c else 0.
    """
    return _gradient_preserving(ctx, clip_c, 1.0, 1.0)


@register_loss("ce_gppo")
def ce_gppo(ctx: RatioContext, *, eps_low: float = 0.2, eps_high: float = 0.2, clip_c: float | None = 3.0,
            beta1: float = 0.75, beta2: float = 1.0) -> Tensor:
    """CE-GPPO (Su et al. 2025): GPPO with the LN gradient scaled by beta1 and the HP one by beta2.

    A > 0:  l = -A * (beta2 U r / sg(r) if r > U else r)
    A <= 0: l = -A * (beta1 L r / sg(r) if r < L else r), and l = -A c if r > c (dual clip)
    w: M r, LN beta1 L, HP beta2 U, LP r, HN r if r <= c else 0.
    Defaults: beta1 = 0.75, beta2 = 1 (the authors' 7B script; their 1.5B script uses
    beta1 = 0.5). The authors' scripts use c = 10; the shared default here is clip_c = 3.
    """
    return _gradient_preserving(ctx, clip_c, beta1, beta2)


@register_loss("aspo")
def aspo(ctx: RatioContext, *, eps_low: float = 0.2, eps_high: float = 0.2, clip_c: float | None = 3.0,
         top_entropy_eps: float | None = None, top_entropy_frac: float = 0.2) -> Tensor:
    """ASPO (Archer2.0 code): the importance ratio is flipped for positive tokens, soft dual clip.

    A > 0:  p = min(r, U),  l = -A * (p / sg(p)) / sg(p)   (value -A/p, weight 1/r, 0 above U);
            soft dual clip: if 1/r > c, l = -A c r / sg(r)  (weight c)
    A <= 0: l = -A * max(r, L);  soft dual clip: if r > c, l = -A c r / sg(r)  (weight c)
    w: M r (A<0) / 1/r (A>0), LN 0, HP 0, LP 1/r if r >= 1/c else c, HN r if r <= c else c.
    The soft dual clip acts wherever 1/r > c (A > 0) or r > c (A <= 0), in M too when c lies
    inside the trust region. clip_c=None turns both soft dual clips off.
    top_entropy_eps (the authors' option, off by default): the tokens whose entropy is in the top
    `top_entropy_frac` of their own response's tokens (entropy above the response's
    (1 - frac)-quantile) get the wider bounds [1 - top_entropy_eps, 1 + top_entropy_eps] on both
    sides (the authors: 0.4 for the top 20%, 0.2 elsewhere); needs the per-token entropy of the
    current policy (`entropy=`, which the trainer passes). The reporting regions keep L, U.
    Written as r * sg(k) + sg(b): k = 1 / sg(r)^2 for A > 0 (r / sg(r)^2 has value 1/r and
    weight 1/r), 1 for A <= 0, c / sg(r) under a soft dual clip (value c, weight c), 0 where
    clipped (HP, LN), where the value is the constant b = 1/U resp. L.
    """
    r_sg = ctx.ratio_sg
    inv = torch.reciprocal(r_sg)
    high, low, clip_high, clip_low = ctx.U, ctx.L, ctx.HP, ctx.LN
    if top_entropy_eps is not None:
        wide = _top_entropy(ctx, top_entropy_frac)                        # 0/1 [B, T]
        high = select(wide, 1.0 + top_entropy_eps, ctx.U)
        low = select(wide, 1.0 - top_entropy_eps, ctx.L)
        clip_high = ctx.is_pos * torch.gt(r_sg, high).to(r_sg.dtype)
        clip_low = ctx.is_neg * ctx.mask * torch.lt(r_sg, low).to(r_sg.dtype)
    k = select(ctx.is_pos, inv * inv, 1.0)
    k = select(clip_high + clip_low, 0.0, k)                              # clipped: constant value
    if clip_c is not None:
        soft = ctx.is_pos * less(r_sg, 1.0 / clip_c) + _dual_clip(ctx, clip_c)
        k = select(soft, clip_c * inv, k)
    return torch.addcmul(clip_high / high + clip_low * low, ctx.ratio, k)


def _top_entropy(ctx: RatioContext, frac: float) -> Tensor:
    """0/1 indicator of the tokens whose entropy lies above the (1 - frac) quantile of their own
    response's token entropies (the authors' per-response nanquantile, strict >). [B, T]"""
    if ctx.entropy is None:
        raise ValueError("loss 'aspo': top_entropy_eps needs the per-token entropy; pass entropy= "
                         "(the trainer does)")
    # The per-response quantile (torch.nanquantile's linear interpolation, position q (n - 1) in
    # ascending order, q = 1 - frac) from the top k entries alone: a topk of ~frac T per row
    # instead of a full sort (13 ms -> 5 ms at [64, 4096]).
    n = ctx.mask.sum(-1, keepdim=True)                                   # [B, 1]
    pos = (1.0 - frac) * (n - 1).clamp(min=0)                            # ascending position
    lo_idx, hi_idx = pos.floor(), pos.ceil()
    k = min(ctx.mask.shape[-1], int(math.ceil(frac * (ctx.mask.shape[-1] - 1))) + 2)
    top = torch.topk(torch.where(ctx.mask > 0, ctx.entropy, -torch.inf), k, dim=-1).values   # [B, k] descending
    at = lambda i: torch.gather(top, 1, (n - 1 - i).clamp(0, k - 1).long())  # noqa: E731  ascending index i
    v_lo, v_hi = at(lo_idx), at(hi_idx)
    threshold = v_lo + (pos - lo_idx) * (v_hi - v_lo)                    # [B, 1]
    return torch.gt(ctx.entropy, threshold).to(ctx.mask.dtype) * ctx.mask


@register_loss("sapo")
def sapo(ctx: RatioContext, *, gate: str = "sigmoid", tau_pos: float = 1.0, tau_neg: float = 1.05) -> Tensor:
    """SAPO (Gao et al. 2025) with a gate f from GATES: l = -A * f(r; tau).

    tau = tau_pos on positive tokens (A > 0), tau_neg otherwise. w = f'(r) r, w / r = f'(r).
    No trust region: the loss section's eps_low / eps_high only define the reporting regions. Defaults are the original SAPO's
    (sigmoid, 1.0, 1.05); the gate paper's best is tau_pos = 10, tau_neg = 12. SAPO averages
    per sequence then over the batch: use agg="seq-mean-token-mean" to match the paper.
    """
    if tau_pos == tau_neg:
        return apply_gate(gate, ctx.ratio, tau_pos)
    return apply_gate(gate, ctx.ratio, select(ctx.is_pos, tau_pos, tau_neg))   # per-token tau [B, T]


@register_loss("dgpo")
def dgpo(ctx: RatioContext, *, eps_low: float = 0.2, eps_high: float = 0.2, n: float = 1.0, m: float = 2.0) -> Tensor:
    """DGPO (Fu et al.): gradient weights that decay at both boundaries and stay continuous.

    LN (r < L, A <= 0): l = -A * r * (sg(r) / L)^n       w = r^(n+1) / L^n, w/r = (r/L)^n
    HP (r > U, A > 0):  l = -A * r * (U / sg(r))^(1/m)   w = U^(1/m) r^(1-1/m), w/r = (U/r)^(1/m)
    elsewhere:          l = -A * r                        w = r (no dual clip)
    Probability weights: W = sg(pi)^n / (L^n pi_old^(n+1)) on LN, (U / sg(pi))^(1/m) pi_old^(1/m-1)
    on HP, 1 / pi_old inside; continuous at r = L and r = U for any n, m. n = 0 or m = inf is
    plain IS; m = 1 is GPPO's HP weight. Defaults n = 1, m = 2 (7B / 14B); n = 2, m = 2 for 1.5B.
    """
    low, high, r_sg = ctx.L, ctx.U, ctx.ratio_sg
    # Factors from sg(r), clamped so the unselected branch stays finite (<= 1).
    decay_left = (torch.clamp(r_sg, max=low) / low) ** n if low > 0 else torch.ones_like(r_sg)
    decay_right = (high / torch.clamp(r_sg, min=high)) ** (1.0 / m)
    k = select(ctx.LN, decay_left, select(ctx.HP, decay_right, 1.0))
    return ctx.ratio * k


# ----------------------------------------------------------------------------- sequence-level losses
# These mix the tokens of a response (a sequence ratio, a geometric mean), so they register with
# elementwise=False and get plain autograd of the aggregated loss (core.py, "The contract").
# Each returns the sequence's surrogate broadcast to its tokens, 0 on padding.

def _sequence_ratio_sg(ctx: RatioContext) -> Tensor:
    """sg(s_i) broadcast to the tokens (1 on padding): GSPO's trust region acts on it. [B, T]"""
    return sequence_ratio(ctx.log_ratio, ctx.mask)


def _ppo_clip(ctx: RatioContext, s: Tensor) -> Tensor:
    """min(s, U) for A > 0, max(s, L) for A <= 0, by the regions of ctx.region_ratio = sg(s)."""
    return select(ctx.HP, ctx.U, select(ctx.LN, ctx.L, s))


@register_loss("gspo", elementwise=False, agg="seq-mean-token-mean", region_ratio=_sequence_ratio_sg)
def gspo(ctx: RatioContext, *, eps_low: float = 3e-4, eps_high: float = 4e-4) -> Tensor:
    """GSPO (Zheng et al. 2025, Qwen; arXiv 2507.18071, eqs. 5 and 7): a sequence-level ratio, clipped.

    s_i = (pi(o_i) / pi_old(o_i))^(1/|o_i|) = exp(mean_t log r_t)
    l_t = -A * min(s_i, U) for A > 0,  -A * max(s_i, L) for A <= 0   (PPO clip on s_i)
    The paper's J = mean_i min(s_i A_i, clip(s_i) A_i) is seq-mean-token-mean (the default agg).
    w (dl_t/dlogp_t summed over the sequence, per token): s_i, or 0 where s_i is clipped; the
    regions and the relative weight w / s_i are those of s_i. With per-token advantages each
    token's own A_t and sign apply to the shared s_i (plain autograd: exact).
    Defaults eps_low = 3e-4, eps_high = 4e-4 (the paper's sec. 5.1).
    """
    return _ppo_clip(ctx, sequence_ratio(ctx.logp - ctx.old_logp, ctx.mask)) * ctx.mask


@register_loss("gspo_token", elementwise=False, agg="seq-mean-token-mean", region_ratio=_sequence_ratio_sg)
def gspo_token(ctx: RatioContext, *, eps_low: float = 3e-4, eps_high: float = 4e-4) -> Tensor:
    """GSPO-token (arXiv 2507.18071, eqs. 13-14): s_i,t = sg(s_i) * pi_t / sg(pi_t), PPO-clipped.

    l_t = -A_t * min(s_i,t, U) for A_t > 0,  -A_t * max(s_i,t, L) for A_t <= 0
    The value of s_i,t is s_i; its gradient flows through token t alone (weight s_i, 0 where
    clipped), so it equals `gspo` when A is constant within a response and gives each token its
    own advantage otherwise. Not elementwise in value (sg(s_i) reads every token).
    """
    own = torch.exp(ctx.logp - ctx.logp.detach())                        # value exactly 1, d/dlogp_t = 1
    return _ppo_clip(ctx, ctx.region_ratio * own) * ctx.mask


@register_loss("gmpo", elementwise=False, agg="seq-mean-token-mean")
def gmpo(ctx: RatioContext, *, eps_low: float = 1.0 - math.exp(-0.4), eps_high: float = math.exp(0.4) - 1.0) -> Tensor:
    """GMPO (Zhao et al. 2025, arXiv 2507.20673 v3, eq. 4 and the authors' code): the geometric mean
    of token ratios instead of their arithmetic mean.

    log r_t clipped by the sign of A:  c_t = min(log r_t, log U) for A > 0, max(log r_t, log L) for A <= 0
    s_i = exp(mean_t c_t)   (the geometric mean of the clipped ratios),   l_t = -A * s_i
    Defaults eps_low = 1 - e^-0.4, eps_high = e^0.4 - 1: the paper's clip range (e^-0.4, e^0.4)
    as the same ratio bounds [1 - eps_low, 1 + eps_high] every loss uses; the paper averages over
    responses (seq-mean-token-mean, the default agg). Regions are the token ratio's.
    w (per token, constant A): s_i on tokens whose log-ratio is not clipped, 0 on clipped ones.
    """
    log_r = ctx.logp - ctx.old_logp                                       # carries gradient
    clipped = select(ctx.HP, math.log(ctx.U), select(ctx.LN, math.log(ctx.L) if ctx.L > 0 else -math.inf, log_r))
    s = torch.exp(sequence_mean(clipped, ctx.mask))                        # [B, 1]
    return s.expand_as(ctx.ratio) * ctx.mask


# ----------------------------------------------------------------------------- DPPO

DPPO_TYPES = ("binary_tv", "binary_kl")


def _rule_dppo_type(loss: str, param: str, value) -> str:
    if value not in DPPO_TYPES:
        raise ValueError(f"loss {loss!r}: parameter {param!r} = {value!r} is invalid; "
                         f"valid choices: {', '.join(DPPO_TYPES)}")
    return value


@register_loss("dppo", validators={"dppo_type": _rule_dppo_type})
def dppo(ctx: RatioContext, *, dppo_type: str = "binary_tv", delta_low: float = 0.2, delta_high: float = 0.2,
         clip_c: float | None = None) -> Tensor:
    """DPPO (Qi et al., "Rethinking the Trust Region in LLM Reinforcement Learning", arXiv 2602.04879
    v3, eqs. 12-14): the trust region on the change of the sampled token's probability instead of
    on the ratio. With pi = exp(logp), pi_old = exp(old_logp), r = pi / pi_old:

    l = -A * M * min(r, c)   value;  gradient weight w = M * min(r, c)   (clip_c=None: c = inf)
    M = 0 (token dropped) when the update moved pi too far in the advantage's direction:
      binary_tv: A > 0 and pi - pi_old > delta_high,  or  A <= 0 and pi - pi_old < -delta_low
      binary_kl: A > 0 and pi > pi_old and KL > delta_high,  or  A <= 0 and pi < pi_old and KL > delta_low,
                 KL = KL(Bern(pi_old) || Bern(pi)) = pi_old log(pi_old/pi) + (1-pi_old) log((1-pi_old)/(1-pi))
    M = 1 otherwise. Written as r * sg(M min(r, c) / r) (value and weight M min(r, c), as verl's
    dppo_tv / dppo_kl; prime-rl's default loss is the c = inf case).
    Anchor: the mask compares pi with this loss's old_logp, i.e. the trainer's recomputed pi_old
    (verl's default). The authors (and prime-rl) anchor it to the rollout policy's log-probs; the
    two agree when the sampler and trainer agree (rollout.probe_threshold bounds their gap).
    The reporting regions use the loss section's eps_low / eps_high (DPPO has no ratio bounds).
    """
    lr = ctx.log_ratio                                                    # sg(log r), 0 on padding
    # 1 where the probability moved in the advantage's direction: up for A > 0, down for A <= 0
    toward = greater((ctx.is_pos - ctx.is_neg).mul_(lr), 0.0)            # 0 on padding (lr = 0)
    if dppo_type == "binary_tv":
        change = torch.expm1(lr).mul_(torch.exp(ctx.old_logp))            # pi - pi_old
        too_far = torch.gt(change.abs_(), select(ctx.is_pos, delta_high, delta_low))
    else:
        # KL = pi_old log(pi_old/pi) + (1-pi_old) log((1-pi_old)/(1-pi)) = -(pi_old lr + e_old log(e_old/e))
        # with e = expm1(log pi) = -(1 - pi): exact near pi = 1, where 1 - exp(log pi) cancels
        neg_tiny = -torch.finfo(lr.dtype).tiny
        e_old = torch.expm1(ctx.old_logp).clamp_(max=neg_tiny)
        e_new = torch.expm1(ctx.old_logp + lr).clamp_(max=neg_tiny)
        minus_kl = torch.div(e_old, e_new).log_().mul_(e_old).addcmul_(torch.exp(ctx.old_logp), lr)
        too_far = torch.lt(minus_kl, select(ctx.is_pos, -delta_high, -delta_low))
    keep = ctx.mask - toward * too_far                                    # M_t, 0 on padding
    if clip_c is None:
        return ctx.ratio * keep
    return ctx.ratio * (keep * torch.clamp(ctx.ratio_sg, max=clip_c) / ctx.ratio_sg)
