"""The shared machinery of every policy loss: ratio, regions, weights, aggregation, metrics, registry.

Notation follows `papers.md`: `r = exp(logp - old_logp)`, `L = 1 - eps_low`, `U = 1 + eps_high`,
`sg(x) = x.detach()`, a token is *positive* if A > 0 and *negative* otherwise (A <= 0).

A loss is one pure function registered with `@register_loss("name")`:

    @register_loss("my_loss")
    def my_loss(ctx: RatioContext, *, eps_low=0.2, eps_high=0.2, alpha=0.5) -> Tensor:
        '''formula in the docstring'''
        return ...   # the surrogate s [B, T]; the per-token loss is l = -A * s

Its keyword-only parameters (with their defaults) *are* its hyperparameters: `loss_hyperparams`
and `validate_loss_params` read them from the signature, so the config layer needs no edit.
Every loss must take `eps_low` and `eps_high` (they define the five reporting regions).
Use `ctx.ratio` for a ratio that carries gradient and `ctx.ratio_sg` for `sg(r)`; never call
`.detach()` on `ctx.ratio` inside a loss (the finite-difference tests freeze `ctx.ratio_sg`).

Every loss in `papers.md` is A times a function of (r, sign A), so the surrogate never sees A
itself, only its sign (`ctx.is_pos`, and the regions). That gives the per-token gradient
weight w = ds/dlogp (so that dl/dlogp = -A * w) for *every* token, A = 0 included, by one
elementwise autograd pass over a detached leaf. `policy_loss` then returns a scalar whose
value is aggregate(-A * s) and whose gradient w.r.t. logp is exactly -A * w times the
aggregation weight (a small autograd.Function carrying that precomputed gradient). The
metrics, the per-token dumps and the gradient therefore come from one computation and cannot
disagree, and the elementwise graph is traversed once, not twice.

The regions are computed once per call from sg(r) (`ctx.M`, `ctx.LN`, `ctx.HP`, `ctx.LP`,
`ctx.HN`, float 0/1) and shared by the losses, the metrics and the dumps. Branches are taken
with `select` (torch.lerp on a 0/1 indicator: exact, and several times cheaper than
torch.where's boolean kernel on CPU); metrics are sums and dot products of the indicators,
brought to the host in one transfer.

Numerics: the loss math runs in float32 (float64 if `logp` is float64; bfloat16 / float16 are
upcast). The log-ratio is clamped to [-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP] (= 40) before exp, so
every log-ratio gives finite values and gradients (the tests check [-30, 30] for every loss
and gate); beyond the clamp, r and w are those at the clamp. Masked tokens are replaced
(logp, old_logp, A by 0, so r = 1) before any math: NaN / inf padding never leaks, and they
get exactly zero gradient.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

# ----------------------------------------------------------------------------- constants

REGIONS = ("M", "LN", "HP", "LP", "HN")  # region codes 0..4 of `PolicyLossOutput.region`
REGION_PAD = -1                          # code of masked (non-response) tokens
AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
LOG_RATIO_CLAMP = 40.0                   # |logp - old_logp| is clamped here before exp
CLIP_REL_TOL = 1e-5                      # |w - r| > CLIP_REL_TOL * r counts as "clipped"

# ----------------------------------------------------------------------------- ratio context


@dataclass
class RatioContext:
    """Everything a loss function reads. All tensors are [B, T] in the compute dtype.

    logp       log pi_theta, carries gradient (0 on masked tokens)
    old_logp   log pi_old (0 on masked tokens)
    ratio      r = exp(logp - old_logp), carries gradient (1 on masked tokens)
    ratio_sg   sg(r): the same values, no gradient
    log_ratio  sg(logp - old_logp)
    is_pos, is_neg       float 0/1 indicators of A > 0 and A <= 0 (A <= 0 is negative,
                         papers.md; masked tokens count as negative); `positive` is the bool
    M, LN, HP, LP, HN    float 0/1 indicators of the five regions (papers.md, from sg(r));
                         all five are 0 on masked tokens
    L, U       the trust-region bounds 1 - eps_low, 1 + eps_high of this loss
    Indicators combine with `select` (exact; on CPU much cheaper than torch.where).
    """

    logp: Tensor
    old_logp: Tensor
    ratio: Tensor
    ratio_sg: Tensor
    log_ratio: Tensor
    is_pos: Tensor
    is_neg: Tensor
    M: Tensor
    LN: Tensor
    HP: Tensor
    LP: Tensor
    HN: Tensor
    L: float
    U: float

    @property
    def positive(self) -> Tensor:
        """bool [B, T], A > 0."""
        return self.is_pos > 0


def greater(x: Tensor, threshold: float) -> Tensor:
    """Float 0/1 indicator of x > threshold (x without gradient); written straight into a float
    tensor, several times cheaper on CPU than (x > t).to(dtype)."""
    return torch.gt(x, threshold, out=torch.empty_like(x))


def less(x: Tensor, threshold: float) -> Tensor:
    """Float 0/1 indicator of x < threshold (x without gradient)."""
    return torch.lt(x, threshold, out=torch.empty_like(x))


def select(cond: Tensor, a: Tensor | float, b: Tensor | float) -> Tensor:
    """a where cond == 1, b where cond == 0, for a float 0/1 tensor `cond` (a, b finite).

    torch.lerp(b, a, cond): its kernel computes b + w (a - b) for w < 1/2 and a - (a - b)(1 - w)
    otherwise, so the value is exactly a or b, and its gradients cond and 1 - cond are exactly
    0 / 1. One fused pass, where torch.where's boolean kernel is many times slower on CPU."""
    if not isinstance(a, Tensor):
        a = cond.new_tensor(a)
    if not isinstance(b, Tensor):
        b = cond.new_tensor(b)
    return torch.lerp(b, a, cond)


def trust_bounds(eps_low: float, eps_high: float) -> tuple[float, float]:
    """L = 1 - eps_low, U = 1 + eps_high."""
    return 1.0 - eps_low, 1.0 + eps_high


def sanitize(x: Tensor, mask_f: Tensor | None, dtype: torch.dtype) -> Tensor:
    """x in `dtype`, detached, NaN / inf replaced by 0 and masked entries set to exactly 0."""
    x = torch.nan_to_num(x.detach().to(dtype), nan=0.0, posinf=0.0, neginf=0.0)
    return x if mask_f is None else x * mask_f


def make_ratio_context(logp: Tensor, old_logp: Tensor, positive: Tensor, mask: Tensor,
                       eps_low: float = 0.2, eps_high: float = 0.2,
                       frozen_logp: Tensor | None = None) -> RatioContext:
    """Build the context (all inputs [B, T]). `logp` keeps its autograd history; non-finite
    values on masked tokens are replaced, and the log-ratio is held within +-LOG_RATIO_CLAMP.

    `frozen_logp` (tests) evaluates sg(r) and the region indicators at another point than r:
    the gradient of a stop-gradient surrogate at logp0 is the derivative of s(logp) with the sg
    parts frozen at logp0, which is what the finite-difference tests differentiate.
    """
    mask = mask.bool()
    dtype = torch.promote_types(logp.dtype, torch.float32)
    mask_f = mask.to(dtype)
    old = sanitize(old_logp, mask_f, dtype)                               # [B, T]
    live = torch.where(mask, logp.to(dtype), 0.0)
    live = torch.clamp(live, min=old - LOG_RATIO_CLAMP, max=old + LOG_RATIO_CLAMP)
    ratio = torch.exp(live - old)                                          # [B, T]
    if frozen_logp is None:
        log_ratio, ratio_sg = (live - old).detach(), ratio.detach()
    else:
        frozen = sanitize(frozen_logp, mask_f, dtype)
        log_ratio = (frozen - old).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        ratio_sg = torch.exp(log_ratio)
    return _context(live, old, ratio, ratio_sg, log_ratio, (positive & mask).to(dtype), mask_f, eps_low, eps_high)


def _context(logp: Tensor, old: Tensor, ratio: Tensor, ratio_sg: Tensor, log_ratio: Tensor, is_pos: Tensor,
             mask_f: Tensor, eps_low: float, eps_high: float) -> RatioContext:
    """The regions, computed once per call and shared by the loss, the metrics and the dumps:
    M: L <= r <= U; LN: r < L, A <= 0; HP: r > U, A > 0; LP: r < L, A > 0; HN: r > U, A <= 0."""
    low, high = trust_bounds(eps_low, eps_high)
    below = less(ratio_sg, low)                                           # masked tokens: r = 1, never below
    above = greater(ratio_sg, high)
    LP = below * is_pos
    HP = above * is_pos
    return RatioContext(logp=logp, old_logp=old, ratio=ratio, ratio_sg=ratio_sg, log_ratio=log_ratio,
                        is_pos=is_pos, is_neg=1.0 - is_pos,
                        M=mask_f - below - above, LN=below - LP, HP=HP, LP=LP, HN=above - HP, L=low, U=high)


def region_codes(ctx: RatioContext, mask_f: Tensor) -> Tensor:
    """Region code per token: index into REGIONS, REGION_PAD (-1) on masked tokens. [B, T] int8."""
    code = ctx.LN + 2.0 * ctx.HP + 3.0 * ctx.LP + 4.0 * ctx.HN + (mask_f - 1.0)
    return code.to(torch.int8)


# ----------------------------------------------------------------------------- aggregation

def _check_agg(agg: str, max_len: int | None, width: int) -> int:
    if agg not in AGG_MODES:
        raise ValueError(f"aggregation {agg!r} is not valid; valid choices: {', '.join(AGG_MODES)}")
    if max_len is None:
        return width
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
        raise ValueError(f"aggregation {agg!r}: max_len must be a positive integer, got {max_len!r}")
    return max_len


def aggregation_weights(mask: Tensor, agg: str = "token-mean", max_len: int | None = None,
                        dtype: torch.dtype = torch.float32) -> Tensor:
    """Per-token weights a [B, T] with aggregate(v) = sum(a * v) (0 on masked tokens).

    token-mean: 1 / N_tokens; seq-mean-token-mean: 1 / (S |o_i|); seq-mean-token-sum-norm:
    1 / (S max_len), with S the number of sequences that have at least one response token."""
    max_len = _check_agg(agg, max_len, mask.shape[-1])
    mask_f = mask.to(dtype) if mask.dtype == torch.bool else (mask != 0).to(dtype)
    if agg == "token-mean":
        return mask_f / mask_f.sum().clamp(min=1)
    tokens_per_seq = mask_f.sum(-1, keepdim=True)                          # [B, 1]
    num_seqs = (tokens_per_seq > 0).sum().clamp(min=1).to(dtype)
    if agg == "seq-mean-token-mean":
        return mask_f / (tokens_per_seq.clamp(min=1) * num_seqs)
    return mask_f / (num_seqs * max_len)


def aggregate(values: Tensor, mask: Tensor, agg: str = "token-mean", max_len: int | None = None) -> Tensor:
    """The one aggregation of per-token values [B, T] into a scalar (papers.md).

    token-mean               sum(mask * v) / sum(mask)
    seq-mean-token-mean      mean over sequences of each sequence's token mean
    seq-mean-token-sum-norm  sum(mask * v) / (num_sequences * max_len); max_len defaults to T

    "Sequences" are the rows with at least one response token (all-padding rows are not
    responses). An empty mask gives 0. Masked entries are dropped with `where`, so NaN / inf
    there neither reaches the value nor the gradient. Sums run in float32 (or float64).
    """
    if values.shape != mask.shape:
        raise ValueError(f"aggregate: values {tuple(values.shape)} and mask {tuple(mask.shape)} differ in shape")
    max_len = _check_agg(agg, max_len, mask.shape[-1])
    mask = mask.bool()
    dtype = torch.promote_types(values.dtype, torch.float32)
    v = torch.where(mask, values.to(dtype), 0.0)                          # [B, T]
    if agg == "token-mean":
        return v.sum() / mask.sum().clamp(min=1)
    tokens_per_seq = mask.sum(-1)                                         # [B]
    num_seqs = (tokens_per_seq > 0).sum().clamp(min=1)
    if agg == "seq-mean-token-mean":
        return (v.sum(-1) / tokens_per_seq.clamp(min=1)).sum() / num_seqs
    return v.sum() / (num_seqs * max_len)


# ----------------------------------------------------------------------------- hyperparameter rules

def _number(loss: str, param: str, value: Any, *, allow_none: bool = False, allow_inf: bool = False) -> float | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null")):
        if allow_none:
            return None
        raise ValueError(f"loss {loss!r}: parameter {param!r} must be a number, got None")
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"loss {loss!r}: parameter {param!r} must be a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"loss {loss!r}: parameter {param!r} must be a number, got {value!r}")
    value = float(value)
    if math.isnan(value) or (math.isinf(value) and not allow_inf):
        raise ValueError(f"loss {loss!r}: parameter {param!r} must be finite, got {value!r}")
    return value


def _rule_nonneg(loss: str, param: str, value: Any) -> float:
    v = _number(loss, param, value)
    if v < 0:
        raise ValueError(f"loss {loss!r}: parameter {param!r} = {v} is invalid; valid choices: a number >= 0")
    return v


def _rule_positive(loss: str, param: str, value: Any) -> float:
    v = _number(loss, param, value)
    if v <= 0:
        raise ValueError(f"loss {loss!r}: parameter {param!r} = {v} is invalid; valid choices: a number > 0")
    return v


def _rule_positive_or_inf(loss: str, param: str, value: Any) -> float:
    v = _number(loss, param, value, allow_inf=True)
    if v <= 0:
        raise ValueError(f"loss {loss!r}: parameter {param!r} = {v} is invalid; valid choices: a number > 0 (inf allowed)")
    return v


def _rule_dual_clip(loss: str, param: str, value: Any) -> float | None:
    v = _number(loss, param, value, allow_none=True, allow_inf=True)
    if v is not None and v <= 1:
        raise ValueError(f"loss {loss!r}: parameter {param!r} = {v} is invalid; "
                         "valid choices: a number > 1, or None (dual clip off)")
    return v


def _rule_gate(loss: str, param: str, value: Any) -> str:
    from rlengine.losses.gates import GATES
    if not isinstance(value, str) or value not in GATES:
        raise ValueError(f"loss {loss!r}: parameter {param!r} = {value!r} is not a registered gate; "
                         f"valid choices: {', '.join(sorted(GATES))}")
    return value


# Rules shared by name across losses. A new loss may bring its own (`register_loss(validators=)`);
# a parameter with no rule must keep the type of its default.
PARAM_RULES: dict[str, Callable[[str, str, Any], Any]] = {
    "eps_low": _rule_nonneg,
    "eps_high": _rule_nonneg,
    "clip_c": _rule_dual_clip,
    "beta1": _rule_nonneg,
    "beta2": _rule_nonneg,
    "gate": _rule_gate,
    "tau_pos": _rule_positive,
    "tau_neg": _rule_positive,
    "n": _rule_nonneg,
    "m": _rule_positive_or_inf,
}


def _rule_same_type(default: Any) -> Callable[[str, str, Any], Any]:
    def rule(loss: str, param: str, value: Any) -> Any:
        if isinstance(default, (int, float)) and not isinstance(default, bool):
            return _number(loss, param, value, allow_none=False)
        if default is not None and not isinstance(value, type(default)):
            raise ValueError(f"loss {loss!r}: parameter {param!r} must be a {type(default).__name__}, got {value!r}")
        return value
    return rule


# ----------------------------------------------------------------------------- registry

@dataclass
class PolicyLossOutput:
    """What `policy_loss` returns.

    loss        scalar, differentiable w.r.t. logp (gradient -A * w * aggregation factor)
    metrics     dict of Python floats (see `policy_loss`)
    ratio       [B, T] detached r (1 on masked tokens)
    weight      [B, T] detached gradient weight w, dl/dlogp = -A * w (0 on masked tokens);
                defined for A = 0 tokens too (evaluated with the negative branch)
    region      [B, T] int64 codes into REGIONS, REGION_PAD (-1) on masked tokens
    token_loss  [B, T] detached per-token loss l = -A * s (0 on masked tokens)
    """

    loss: Tensor
    metrics: dict[str, float]
    ratio: Tensor
    weight: Tensor
    region: Tensor
    token_loss: Tensor


class LossEntry:
    """A registered loss: the pure surrogate function plus its hyperparameters.

    Calling the entry runs the full loss: `LOSSES["grpo"](logp, old_logp, advantages, mask,
    agg="token-mean", **hyperparams)` is `policy_loss("grpo", ...)`. The pure function is `.fn`.
    """

    def __init__(self, name: str, fn: Callable[..., Tensor], defaults: dict[str, Any],
                 validators: dict[str, Callable[[str, str, Any], Any]]):
        self.name = name
        self.fn = fn
        self.defaults = defaults
        self.validators = validators
        self.__doc__ = fn.__doc__

    def __call__(self, logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor,
                 agg: str = "token-mean", max_len: int | None = None, **hyperparams: Any) -> PolicyLossOutput:
        return policy_loss(self.name, logp, old_logp, advantages, mask, agg=agg, max_len=max_len, **hyperparams)

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.defaults.items())
        return f"<loss {self.name}({params})>"


LOSSES: dict[str, LossEntry] = {}


def register_loss(name: str, *, validators: dict[str, Callable[[str, str, Any], Any]] | None = None,
                  replace: bool = False) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    """Decorator: register `fn(ctx, *, eps_low=..., eps_high=..., **more) -> surrogate [B, T]`.

    The keyword-only parameters with their defaults are the loss's hyperparameters. Returns
    `fn` unchanged (it stays a plain pure function)."""

    def decorator(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        if name in LOSSES and not replace:
            raise ValueError(f"loss {name!r} is already registered (pass replace=True to override)")
        sig = inspect.signature(fn)
        positional = [p for p in sig.parameters.values()
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if len(positional) != 1:
            raise TypeError(f"loss {name!r}: the function must take exactly one positional argument (the RatioContext)")
        defaults: dict[str, Any] = {}
        for p in sig.parameters.values():
            if p.kind == p.KEYWORD_ONLY:
                if p.default is p.empty:
                    raise TypeError(f"loss {name!r}: hyperparameter {p.name!r} needs a default")
                defaults[p.name] = p.default
            elif p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                raise TypeError(f"loss {name!r}: hyperparameters must be explicit keyword-only parameters")
        for required in ("eps_low", "eps_high"):
            if required not in defaults:
                raise TypeError(f"loss {name!r}: every loss takes {required!r} (it defines the reporting regions)")
        rules = {k: (validators or {}).get(k) or PARAM_RULES.get(k) or _rule_same_type(v) for k, v in defaults.items()}
        LOSSES[name] = LossEntry(name, fn, defaults, rules)
        return fn

    return decorator


def _entry(name: str) -> LossEntry:
    if not isinstance(name, str) or name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; valid choices: {', '.join(sorted(LOSSES))}")
    return LOSSES[name]


def loss_hyperparams(name: str) -> dict[str, Any]:
    """All hyperparameters of loss `name` with their defaults (a fresh dict)."""
    return dict(_entry(name).defaults)


def validate_loss_params(name: str, params: dict[str, Any]) -> dict[str, Any]:
    """Check `params` for loss `name`; return the full resolved dict (defaults filled in).

    Raises ValueError naming the loss, the parameter and the valid choices for an unknown loss,
    a parameter the loss does not take, or an invalid value."""
    entry = _entry(name)
    unknown = [k for k in params if k not in entry.defaults]
    if unknown:
        raise ValueError(f"loss {name!r} does not take parameter {unknown[0]!r}; "
                         f"valid choices: {', '.join(entry.defaults)}")
    resolved = {}
    for key, default in entry.defaults.items():
        resolved[key] = entry.validators[key](name, key, params.get(key, default))
    low, high = trust_bounds(resolved["eps_low"], resolved["eps_high"])
    if high < low:  # cannot happen with eps >= 0, kept for custom rules
        raise ValueError(f"loss {name!r}: parameters 'eps_low'/'eps_high' give U < L")
    return resolved


# ----------------------------------------------------------------------------- the loss

def _check_inputs(name: str, logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor) -> None:
    for field, t in (("logp", logp), ("old_logp", old_logp), ("advantages", advantages), ("mask", mask)):
        if not isinstance(t, Tensor):
            raise ValueError(f"loss {name!r}: {field} must be a torch.Tensor, got {type(t).__name__}")
    if logp.dim() != 2:
        raise ValueError(f"loss {name!r}: logp must be [B, T], got shape {tuple(logp.shape)}")
    if not logp.is_floating_point():
        raise ValueError(f"loss {name!r}: logp must be a floating tensor, got {logp.dtype}")
    for field, t in (("old_logp", old_logp), ("mask", mask)):
        if t.shape != logp.shape:
            raise ValueError(f"loss {name!r}: {field} has shape {tuple(t.shape)}, expected logp's {tuple(logp.shape)}")
    if advantages.shape not in (logp.shape[:1], logp.shape):
        raise ValueError(f"loss {name!r}: advantages has shape {tuple(advantages.shape)}, "
                         f"expected [B] = {tuple(logp.shape[:1])} or [B, T] = {tuple(logp.shape)}")


class _WeightedGradient(torch.autograd.Function):
    """A scalar whose value is `value` and whose gradient w.r.t. `logp` is `coef` [B, T]."""

    @staticmethod
    def forward(ctx, logp: Tensor, value: Tensor, coef: Tensor) -> Tensor:  # noqa: D102
        ctx.save_for_backward(coef)
        ctx.logp_dtype = logp.dtype
        return value.detach().clone()

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: D102
        (coef,) = ctx.saved_tensors
        return (coef * grad).to(ctx.logp_dtype), None, None


def surrogate_and_weight(name: str, ctx: RatioContext, params: dict[str, Any], leaf: Tensor) -> tuple[Tensor, Tensor]:
    """s = fn(ctx) and w = ds/dlogp by one elementwise autograd pass. `leaf` is the tensor ctx
    was built from (policy_loss: the log-ratio; d/dlogp = d/dlog_ratio as old_logp is data)."""
    s = LOSSES[name].fn(ctx, **params)                                    # [B, T]
    if s.shape != leaf.shape:
        raise RuntimeError(f"loss {name!r} returned shape {tuple(s.shape)}, expected {tuple(leaf.shape)}")
    w = None
    if s.requires_grad:
        (w,) = torch.autograd.grad(s, leaf, grad_outputs=torch.ones_like(s), allow_unused=True)
    return s.detach(), (torch.zeros_like(leaf) if w is None else w)


def policy_loss(name: str, logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor,
                agg: str = "token-mean", max_len: int | None = None, **hyperparams: Any) -> PolicyLossOutput:
    """The policy loss `name` (a key of LOSSES), aggregated with `agg`, plus its metrics.

    Shapes: logp, old_logp, mask [B, T]; advantages [B] (per sequence) or [B, T].
    Metrics (Python floats): loss; frac_M, frac_LN, frac_HP, frac_LP, frac_HN (fractions of
    response tokens, summing to 1); eur (token mean of w / r); ratio_min / ratio_mean /
    ratio_max; w_M ... w_HN (mean relative weight w / r per region, 0.0 when the region is
    empty); clip_frac (tokens with |w - r| > 1e-5 r, i.e. not the plain IS weight);
    zero_weight_frac (tokens with w == 0, hard-clipped); kl_old (masked mean k3 from the current
    to the old policy, d = old_logp - logp); adv_pos_frac (tokens with A > 0); n_tokens.
    An empty mask gives loss 0 and all-zero fractions.
    """
    params = validate_loss_params(name, hyperparams)
    if agg not in AGG_MODES:
        raise ValueError(f"loss {name!r}: aggregation {agg!r} is not valid; valid choices: {', '.join(AGG_MODES)}")
    _check_inputs(name, logp, old_logp, advantages, mask)

    dtype = torch.promote_types(logp.dtype, torch.float32)
    mask = mask if mask.dtype == torch.bool else mask != 0                 # [B, T]
    mask_f = mask.to(dtype)
    with torch.no_grad():
        old = sanitize(old_logp, mask_f, dtype)                            # [B, T]
        if advantages.dim() == 1:
            adv = sanitize(advantages, None, dtype)[:, None] * mask_f    # [B, T]
        else:
            adv = sanitize(advantages, mask_f, dtype)
        log_ratio = (sanitize(logp, mask_f, dtype) - old).clamp_(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        weights = aggregation_weights(mask, agg, max_len, dtype)           # [B, T]

    # One elementwise autograd pass: the surrogate s and w = ds/dlogp. The leaf is the
    # log-ratio (d/dlogp = d/dlog_ratio, old_logp being data); 0 on masked tokens.
    leaf = log_ratio.requires_grad_(True)                                  # [B, T]
    with torch.enable_grad():
        ratio = torch.exp(leaf)
        ctx = _context(old + leaf, old, ratio, ratio.detach(), log_ratio.detach(), greater(adv, 0.0), mask_f,
                       params["eps_low"], params["eps_high"])
        s, w = surrogate_and_weight(name, ctx, params, leaf)
    w = w * mask_f                                                         # [B, T]
    with torch.no_grad():
        neg_adv = -adv
        token_loss = neg_adv * s                                           # [B, T], 0 on masked tokens
        value = torch.dot(token_loss.flatten(), weights.flatten())
        coef = w * (neg_adv * weights)                                     # d loss / d logp
    loss = _WeightedGradient.apply(logp, value, coef)

    region = region_codes(ctx, mask_f)
    metrics = _metrics(value, ctx, w, mask_f)
    return PolicyLossOutput(loss=loss, metrics=metrics, ratio=ctx.ratio_sg, weight=w,
                            region=region, token_loss=token_loss)


@torch.no_grad()
def _metrics(loss: Tensor, ctx: RatioContext, w: Tensor, mask_f: Tensor) -> dict[str, float]:
    """All metrics in one host transfer. Region counts and per-region sums are sums and dot
    products of the shared 0/1 region indicators; masked tokens have r = 1, log-ratio 0, w = 0
    and all indicators 0 (policy_loss makes them so), which the counts rely on."""
    r, lr = ctx.ratio_sg.flatten(), ctx.log_ratio.flatten()                # [B*T]
    is_pos, mask_v = ctx.is_pos.flatten(), mask_f.flatten()
    numel = r.numel()
    rel = w.flatten() / r                                                 # w / r, 0 on masked tokens
    big = torch.finfo(r.dtype).max
    indicators = {k: getattr(ctx, k).flatten() for k in REGIONS}
    scalars = torch.stack([
        loss.detach(),
        mask_v.sum(),                                                     # n
        rel.sum(),
        torch.addcmul(r, 1.0 - mask_v, r.new_tensor(big)).min(),          # min over response tokens
        torch.dot(r, mask_v),
        (r * mask_v).max(),
        greater((rel - 1.0).abs(), CLIP_REL_TOL).sum(),                   # incl. every masked token
        (w == 0).sum().to(r.dtype),                                       # incl. every masked token
        torch.reciprocal(r).add_(lr).sub_(1.0).sum(),                     # k3 = 1/r - 1 + log r, 0 on masked
        is_pos.sum(),
        *[ind.sum() for ind in indicators.values()],                      # region counts
        *[torch.dot(rel, ind) for ind in indicators.values()],            # relative-weight sums
    ]).double().tolist()
    (loss_v, n, rel_all, r_min, r_sum, r_max, clipped_all, zero_all, k3_sum, pos) = scalars[:10]
    counts = dict(zip(REGIONS, scalars[10:15]))
    rel_sums = dict(zip(REGIONS, scalars[15:20]))
    nf, pad = max(n, 1.0), numel - n
    out = {
        "loss": loss_v,
        "eur": rel_all / nf,
        "ratio_min": r_min if n > 0 else 1.0,
        "ratio_mean": r_sum / nf if n > 0 else 1.0,
        "ratio_max": r_max if n > 0 else 1.0,
        "clip_frac": (clipped_all - pad) / nf,
        "zero_weight_frac": (zero_all - pad) / nf,
        "kl_old": k3_sum / nf,
        "adv_pos_frac": pos / nf,
        "n_tokens": n,
    }
    out.update({f"frac_{k}": counts[k] / nf for k in REGIONS})
    out.update({f"w_{k}": (rel_sums[k] / counts[k] if counts[k] > 0 else 0.0) for k in REGIONS})
    return out
