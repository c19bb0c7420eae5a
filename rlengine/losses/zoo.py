"""The loss zoo: one registered pure function per policy loss (papers.md, symbols as there).

Each function maps the ratio context to the surrogate s [B, T]; the per-token loss is
l = -A * s and the gradient weight is w = ds/dlogp (dl/dlogp = -A * w). `ctx.ratio` is r
(with gradient), `ctx.ratio_sg` is sg(r), `ctx.positive` is A > 0, `ctx.logp` is log pi_theta.
L = 1 - eps_low, U = 1 + eps_high, c = clip_c. Region conditions use sg(r).

Weights per region (M / LN / HP / LP / HN), from papers.md:
  grpo     r      | 0         | 0               | r              | r if r <= c else 0
  cispo    r      | L         | U               | L              | U
  gppo     r      | L         | U               | r              | r if r <= c else 0
  ce_gppo  r      | beta1 L   | beta2 U         | r              | r if r <= c else 0
  aspo     r (A<0), 1/r (A>0) | 0 | 0           | 1/r if r >= 1/c else c | r if r <= c else c
  sapo     f'(r) r everywhere
  dgpo     r      | r^(n+1)/L^n | U^(1/m) r^(1-1/m) | r           | r
"""
from __future__ import annotations

import torch
from torch import Tensor

from rlengine.losses.core import RatioContext, greater, less, register_loss, select
from rlengine.losses.gates import get_gate

# Implementation notes. The region indicators ctx.M, ctx.LN, ctx.HP, ctx.LP, ctx.HN (float 0/1,
# from sg(r), shared with the metrics) and `select(c, a, b)` ("a where c else b") replace
# branching on r and on the sign of A. Several papers write their loss as r times a
# stop-gradient factor (GPPO's r / sg(r), ASPO's p / sg(p)^2, DGPO's r (sg(r)/L)^n); the code
# does the same: a factor k built from sg(r) alone, so the only operation carrying gradient is
# r * k, whose derivative w.r.t. logp is w = r k.


def _dual_clip(ctx: RatioContext, clip_c: float | None, region: Tensor) -> Tensor | None:
    """Indicator of the tokens of `region` beyond the dual-clip threshold: sg(r) > c."""
    if clip_c is None:
        return None
    return region * greater(ctx.ratio_sg, clip_c)


@register_loss("grpo")
def grpo(ctx: RatioContext, *, eps_low: float = 0.2, eps_high: float = 0.2, clip_c: float | None = 3.0) -> Tensor:
    """GRPO: PPO clip (DeepSeekMath) with dual clip c (Ye et al. 2020).

    A > 0:  l = -A * min(r, U)
    A <= 0: l = -A * min(max(r, L), c)      (clip_c=None: l = -A * max(r, L))
    Equivalently l = -max(min(r A, clip(r, L, U) A), c A) for A < 0.
    w: M r, LN 0, HP 0, LP r, HN r if r <= c else 0.
    """
    s = select(ctx.HP, ctx.U, select(ctx.LN, ctx.L, ctx.ratio))          # min(r, U) | max(r, L)
    beyond_c = _dual_clip(ctx, clip_c, ctx.HN)
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
    beyond_c = _dual_clip(ctx, clip_c, ctx.HN)
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
def aspo(ctx: RatioContext, *, eps_low: float = 0.2, eps_high: float = 0.2, clip_c: float | None = 3.0) -> Tensor:
    """ASPO (Archer2.0 code): the importance ratio is flipped for positive tokens, soft dual clip.

    A > 0:  p = min(r, U),  l = -A * (p / sg(p)) / sg(p)   (value -A/p, weight 1/r, 0 above U);
            soft dual clip: if 1/r > c, l = -A c r / sg(r)  (weight c)
    A <= 0: l = -A * max(r, L);  soft dual clip: if r > c, l = -A c r / sg(r)  (weight c)
    w: M r (A<0) / 1/r (A>0), LN 0, HP 0, LP 1/r if r >= 1/c else c, HN r if r <= c else c.
    clip_c=None turns both soft dual clips off. (The authors' wider eps for high-entropy
    tokens is not implemented.)
    Written as r * sg(k) + sg(b): k = 1 / sg(r)^2 for A > 0 (r / sg(r)^2 has value 1/r and
    weight 1/r), 1 for A <= 0, c / sg(r) under a soft dual clip (value c, weight c), 0 on HP and
    LN, where the value is the constant b = 1/U resp. L.
    """
    r_sg = ctx.ratio_sg
    inv = torch.reciprocal(r_sg)
    k = select(ctx.is_pos, inv * inv, 1.0)
    k = select(ctx.HP + ctx.LN, 0.0, k)                                   # clipped: constant value
    if clip_c is not None:
        soft = ctx.LP * less(r_sg, 1.0 / clip_c) + _dual_clip(ctx, clip_c, ctx.HN)
        k = select(soft, clip_c * inv, k)
    return torch.addcmul(ctx.HP * (1.0 / ctx.U) + ctx.LN * ctx.L, ctx.ratio, k)


@register_loss("sapo")
def sapo(ctx: RatioContext, *, eps_low: float = 0.2, eps_high: float = 0.2, gate: str = "sigmoid",
         tau_pos: float = 1.0, tau_neg: float = 1.05) -> Tensor:
    """SAPO (Gao et al. 2025) with a gate f from GATES: l = -A * f(r; tau).

    tau = tau_pos on positive tokens (A > 0), tau_neg otherwise. w = f'(r) r, w / r = f'(r).
    eps_low / eps_high only define the reporting regions. Defaults are the original SAPO's
    (sigmoid, 1.0, 1.05); the gate paper's best is tau_pos = 10, tau_neg = 12. SAPO averages
    per sequence then over the batch: use agg="seq-mean-token-mean" to match the paper.
    """
    f = get_gate(gate)
    if tau_pos == tau_neg:
        return f(ctx.ratio, tau_pos)
    return f(ctx.ratio, select(ctx.is_pos, tau_pos, tau_neg))            # per-token tau [B, T]


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
