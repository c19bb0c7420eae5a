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
`eps_low` / `eps_high` are the loss's trust region when its function takes them; every loss
accepts them anyway as the bounds of its five reporting regions. A config may also name a
plug-in, `loss.name=package.module:function` (`LOSSES.resolve`). Use `ctx.ratio` for a ratio
that carries gradient and `ctx.ratio_sg` for `sg(r)`; never call `.detach()` on `ctx.ratio`
inside a loss (the finite-difference tests freeze `ctx.ratio_sg`).

The contract, `register_loss(name, elementwise=True)`: an elementwise loss promises that token
t's surrogate s_t depends on token t's log-prob alone (every loss of papers.md is A times a
function of (r_t, sign A_t)). Then the gradient weight w = ds/dlogp (dl/dlogp = -A * w) of
*every* token, A = 0 included, comes from one elementwise autograd pass over a detached leaf,
and the loss is a scalar whose value is aggregate(-A * s) and whose gradient w.r.t. logp is
exactly -A * w times the aggregation weight (a small autograd.Function carrying that
precomputed gradient): the metrics, the dumps and the gradient come from one computation, and
the graph is traversed once. That assembly would be wrong for a surrogate that mixes tokens
(a sequence ratio) as soon as A varies within a sequence, so `LOSSES.build` checks the promise
(`check_elementwise`), and `elementwise=False` losses (GSPO, GSPO-token, GMPO) take plain
autograd of the aggregated loss instead, through the same ratio, aggregation and metrics.
`LOSSES.build(name, **hp)` resolves and validates a loss once into a `LossFn`; the trainer
calls that per micro-batch.

The regions are computed once per call from sg(r) (or the loss's `region_ratio`) (`ctx.M`, `ctx.LN`, `ctx.HP`, `ctx.LP`,
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
    mask       float 0/1, 1 on response tokens
    is_pos, is_neg       float 0/1 indicators of A > 0 and A <= 0 (A <= 0 is negative,
                         papers.md; masked tokens count as negative); `positive` is the bool
    region_ratio         sg of the ratio the loss's trust region acts on: sg(r) for token-level
                         losses, the sequence ratio broadcast to its tokens for GSPO
    M, LN, HP, LP, HN    float 0/1 indicators of the five regions (papers.md, from
                         region_ratio); all five are 0 on masked tokens
    L, U       the trust-region bounds 1 - eps_low, 1 + eps_high of this loss
    entropy    the policy's per-token entropy [B, T] when the caller passed it (no gradient, 0 on
               masked tokens), else None; cleaned on first access (most losses never read it)
    Indicators combine with `select` (exact; on CPU much cheaper than torch.where).
    """

    logp: Tensor
    old_logp: Tensor
    ratio: Tensor
    ratio_sg: Tensor
    log_ratio: Tensor
    mask: Tensor
    is_pos: Tensor
    is_neg: Tensor
    region_ratio: Tensor
    M: Tensor
    LN: Tensor
    HP: Tensor
    LP: Tensor
    HN: Tensor
    L: float
    U: float
    entropy_input: Tensor | None = None

    @property
    def entropy(self) -> Tensor | None:
        if self.entropy_input is not None and not hasattr(self, "_entropy"):
            self._entropy = sanitize(self.entropy_input, self.mask, self.ratio_sg.dtype)
        return None if self.entropy_input is None else self._entropy

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
                       frozen_logp: Tensor | None = None, entropy: Tensor | None = None) -> RatioContext:
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
    return _context(live, old, ratio, ratio_sg, log_ratio, (positive & mask).to(dtype), mask_f, eps_low, eps_high,
                    entropy=entropy)


def _context(logp: Tensor, old: Tensor, ratio: Tensor, ratio_sg: Tensor, log_ratio: Tensor, is_pos: Tensor,
             mask_f: Tensor, eps_low: float, eps_high: float, region_ratio: Tensor | None = None,
             entropy: Tensor | None = None) -> RatioContext:
    """The regions, computed once per call and shared by the loss, the metrics and the dumps, from
    `region_ratio` (default sg(r)): M: L <= r <= U; LN: r < L, A <= 0; HP: r > U, A > 0;
    LP: r < L, A > 0; HN: r > U, A <= 0."""
    low, high = trust_bounds(eps_low, eps_high)
    rr = ratio_sg if region_ratio is None else region_ratio
    below = less(rr, low)                                                  # masked tokens: r = 1, never below
    above = greater(rr, high)
    LP = below * is_pos
    HP = above * is_pos
    return RatioContext(logp=logp, old_logp=old, ratio=ratio, ratio_sg=ratio_sg, log_ratio=log_ratio, mask=mask_f,
                        is_pos=is_pos, is_neg=1.0 - is_pos, region_ratio=rr,
                        M=mask_f - below - above, LN=below - LP, HP=HP, LP=LP, HN=above - HP, L=low, U=high,
                        entropy_input=entropy)


def sequence_mean(x: Tensor, mask_f: Tensor) -> Tensor:
    """Each sequence's mean of x over its response tokens, [B, T] -> [B, 1] (0 for an empty row)."""
    return (x * mask_f).sum(-1, keepdim=True) / mask_f.sum(-1, keepdim=True).clamp(min=1)


def sequence_ratio(log_ratio: Tensor, mask_f: Tensor) -> Tensor:
    """GSPO's s_i = (pi / pi_old)^(1/|o_i|) = exp(mean_t log r_t), broadcast to its tokens (1 on
    padding); it carries gradient when `log_ratio` does. [B, T]"""
    s = torch.exp(sequence_mean(log_ratio, mask_f))                        # [B, 1]
    return torch.lerp(torch.ones_like(log_ratio), s.expand_as(log_ratio), mask_f)


def region_codes(ctx: RatioContext, mask_f: Tensor) -> Tensor:
    """Region code per token: index into REGIONS, REGION_PAD (-1) on masked tokens. [B, T] int8."""
    code = ctx.LN + 2.0 * ctx.HP + 3.0 * ctx.LP + 4.0 * ctx.HN + (mask_f - 1.0)
    return code.to(torch.int8)


# ----------------------------------------------------------------------------- aggregation

def check_agg_mode(agg: str, loss: str | None = None) -> None:
    """ValueError naming the valid aggregations (and the loss, when given) for an unknown `agg`."""
    if agg not in AGG_MODES:
        prefix = f"loss {loss!r}: " if loss else ""
        raise ValueError(f"{prefix}aggregation {agg!r} is not valid; valid choices: {', '.join(AGG_MODES)}")


def _check_agg(agg: str, max_len: int | None, width: int) -> int:
    check_agg_mode(agg)
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
    from rlengine.losses.gates import get_gate
    try:
        get_gate(value)                                                     # a name, or module:function
    except ValueError as e:
        raise ValueError(f"loss {loss!r}: parameter {param!r}: {e}") from None
    return value


def _rule_optional_nonneg(loss: str, param: str, value: Any) -> float | None:
    v = _number(loss, param, value, allow_none=True)
    if v is not None and v < 0:
        raise ValueError(f"loss {loss!r}: parameter {param!r} = {v} is invalid; valid choices: a number >= 0, or None")
    return v


def _rule_fraction(loss: str, param: str, value: Any) -> float:
    v = _number(loss, param, value)
    if not 0 < v <= 1:
        raise ValueError(f"loss {loss!r}: parameter {param!r} = {v} is invalid; valid choices: a number in (0, 1]")
    return v


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
    "delta_low": _rule_nonneg,
    "delta_high": _rule_nonneg,
    "top_entropy_eps": _rule_optional_nonneg,
    "top_entropy_frac": _rule_fraction,
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

REPORT_EPS = 0.2   # reporting bounds (eps_low, eps_high) of a loss whose function does not take them


@dataclass
class PolicyLossOutput:
    """What a loss call returns.

    loss        scalar, differentiable w.r.t. logp
    metrics     dict of Python floats (see `LossFn.__call__`)
    ratio       [B, T] detached token ratio r (1 on masked tokens)
    weight      [B, T] detached gradient weight w (0 on masked tokens), see `LossFn.__call__`;
                defined for A = 0 tokens too (evaluated with the negative branch)
    region      [B, T] int codes into REGIONS, REGION_PAD (-1) on masked tokens
    token_loss  [B, T] detached per-token loss l = -A * s (0 on masked tokens)
    rel_weight  [B, T] w / region_ratio, the relative weight the metrics average (0 on masked tokens)
    """

    loss: Tensor
    metrics: dict[str, float]
    ratio: Tensor
    weight: Tensor
    region: Tensor
    token_loss: Tensor
    rel_weight: Tensor


class LossEntry:
    """A registered loss: the pure surrogate function, its hyperparameters and its contract.

    elementwise   each token's surrogate depends on that token's log-prob alone (checked when a
                  loss is built), which allows the exact fast gradient path
    agg           the aggregation its paper uses, the default when the caller names none
    region_ratio  ctx -> the (detached) ratio its trust region acts on, when that is not the token
                  ratio (GSPO: the sequence ratio)
    Calling the entry runs the full loss: `LOSSES["grpo"](logp, old_logp, advantages, mask,
    agg="token-mean", **hyperparams)` is `policy_loss("grpo", ...)`. The pure function is `.fn`.
    """

    def __init__(self, name: str, fn: Callable[..., Tensor], defaults: dict[str, Any],
                 validators: dict[str, Callable[[str, str, Any], Any]], elementwise: bool = True,
                 agg: str | None = None, region_ratio: Callable[[RatioContext], Tensor] | None = None):
        self.name = name
        self.fn = fn
        self.fn_params = tuple(defaults)                                   # what fn itself takes
        # eps_low / eps_high are every loss's reporting bounds: the function's own when it takes them
        self.defaults = {"eps_low": REPORT_EPS, "eps_high": REPORT_EPS, **defaults}
        self.validators = {"eps_low": _rule_nonneg, "eps_high": _rule_nonneg, **validators}
        self.elementwise = elementwise
        self.agg = agg or "token-mean"
        self.region_ratio = region_ratio
        self.__doc__ = fn.__doc__
        self._checked: set[str] = set()                                    # params whose elementwise probe passed

    def __call__(self, logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor,
                 agg: str | None = None, max_len: int | None = None, entropy: Tensor | None = None,
                 **hyperparams: Any) -> PolicyLossOutput:
        return LOSSES.build(self.name, **hyperparams)(logp, old_logp, advantages, mask, agg=agg, max_len=max_len,
                                                      entropy=entropy)

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.defaults.items())
        return f"<loss {self.name}({params})>"


class LossRegistry(dict):
    """name -> LossEntry. `LOSSES.build(name, **hp)` resolves a loss once (plug-in import,
    validation, elementwise check) into the `LossFn` the trainer calls per micro-batch."""

    def resolve(self, name: str) -> LossEntry:
        """The entry of a registry name, or of a `module:function` plug-in (imported and registered
        under that reference on first use; a function already registered by its module's decorator
        keeps its registration)."""
        from rlengine.plugins import import_ref, is_ref

        if isinstance(name, str) and name in self:
            return self[name]
        if is_ref(name):
            fn = import_ref(name, "loss")
            known = next((e for e in list(self.values()) if e.fn is fn), None)
            if known is None:
                register_loss(name)(fn)
            else:
                self[name] = known
            return self[name]
        raise ValueError(f"unknown loss {name!r}; valid choices: {', '.join(sorted(self))} "
                         "or a plug-in 'package.module:function'")

    def build(self, name: str, **hyperparams: Any) -> "LossFn":
        entry = self.resolve(name)
        params = validate_loss_params(name, hyperparams)
        fn_params = {k: params[k] for k in entry.fn_params}
        if entry.elementwise:
            check_elementwise(entry, fn_params)
        return LossFn(entry=entry, params=params, fn_params=fn_params)


LOSSES: LossRegistry = LossRegistry()


def register_loss(name: str, *, elementwise: bool = True, agg: str | None = None,
                  region_ratio: Callable[[RatioContext], Tensor] | None = None,
                  validators: dict[str, Callable[[str, str, Any], Any]] | None = None,
                  replace: bool = False) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    """Decorator: register `fn(ctx, *, hyperparameter=default, ...) -> surrogate s [B, T]`.

    The keyword-only parameters with their defaults are the loss's hyperparameters. `eps_low` /
    `eps_high` are the loss's trust region if it takes them; every loss accepts them in any case
    as the bounds of its reporting regions (default REPORT_EPS).
    elementwise=True promises that token t's surrogate depends on token t's log-prob alone: the
    gradient is then assembled exactly from one elementwise autograd pass (the fast path), and
    `LOSSES.build` checks the promise. elementwise=False takes plain autograd of the aggregated
    loss (sequence-level losses: GSPO, GMPO). Returns `fn` unchanged."""
    if agg is not None:
        check_agg_mode(agg, name)

    def decorator(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        if name in LOSSES and not replace:
            raise ValueError(f"loss {name!r} is already registered (pass replace=True to override)")
        if not callable(fn):
            raise TypeError(f"loss {name!r}: {fn!r} is not callable")
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
        rules = {k: (validators or {}).get(k) or PARAM_RULES.get(k) or _rule_same_type(v) for k, v in defaults.items()}
        LOSSES[name] = LossEntry(name, fn, defaults, rules, elementwise=elementwise, agg=agg, region_ratio=region_ratio)
        return fn

    return decorator


def loss_hyperparams(name: str) -> dict[str, Any]:
    """All hyperparameters of loss `name` with their defaults (a fresh dict), eps_low / eps_high first."""
    return dict(LOSSES.resolve(name).defaults)


def validate_loss_params(name: str, params: dict[str, Any]) -> dict[str, Any]:
    """Check `params` for loss `name`; return the full resolved dict (defaults filled in).

    Raises ValueError naming the loss, the parameter and the valid choices for an unknown loss,
    a parameter the loss does not take, or an invalid value."""
    entry = LOSSES.resolve(name)
    unknown = [k for k in params if k not in entry.defaults]
    if unknown:
        raise ValueError(f"loss {name!r} does not take parameter {unknown[0]!r}; "
                         f"valid choices: {', '.join(entry.defaults)}")
    resolved = {}
    for key, default in entry.defaults.items():
        resolved[key] = entry.validators[key](name, key, params.get(key, default))
    return resolved


def check_elementwise(entry: LossEntry, fn_params: dict[str, Any]) -> None:
    """The promise of elementwise=True, checked once per loss and hyperparameters on a small random
    batch: moving one token's log-prob leaves every other token's surrogate bit-identical.
    (Elementwise ops give bit-identical results whatever the neighbours; a sum over tokens does not.)"""
    key = repr(sorted(fn_params.items()))
    if key in entry._checked:
        return
    g = torch.Generator().manual_seed(0)
    B, T = 4, 7
    old = -3.0 * torch.rand(B, T, generator=g, dtype=torch.float64)
    logp = old + 0.6 * torch.randn(B, T, generator=g, dtype=torch.float64)
    positive = torch.tensor([True, False, True, False])[:, None].expand(B, T)
    mask = torch.ones(B, T, dtype=torch.bool)
    entropy = torch.rand(B, T, generator=g, dtype=torch.float64)
    low, high = fn_params.get("eps_low", REPORT_EPS), fn_params.get("eps_high", REPORT_EPS)

    def surrogate(lp: Tensor) -> Tensor:
        ctx = make_ratio_context(lp, old, positive, mask, low, high, entropy=entropy)
        return entry.fn(ctx, **fn_params).detach()

    base = surrogate(logp)
    for b, t in ((0, 3), (1, 0), (2, 6), (3, 2)):
        moved = logp.clone()
        moved[b, t] += 0.45
        other = torch.ones(B, T, dtype=torch.bool)
        other[b, t] = False
        if not torch.equal(surrogate(moved)[other], base[other]):
            raise ValueError(f"loss {entry.name!r} is registered elementwise, but moving the log-prob of token "
                             f"({b}, {t}) changed other tokens' surrogates: register it with "
                             f"register_loss({entry.name!r}, elementwise=False)")
    entry._checked.add(key)


# ----------------------------------------------------------------------------- the loss

def _check_inputs(name: str, logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor,
                  entropy: Tensor | None) -> None:
    for field, t in (("logp", logp), ("old_logp", old_logp), ("advantages", advantages), ("mask", mask)):
        if not isinstance(t, Tensor):
            raise ValueError(f"loss {name!r}: {field} must be a torch.Tensor, got {type(t).__name__}")
    if logp.dim() != 2:
        raise ValueError(f"loss {name!r}: logp must be [B, T], got shape {tuple(logp.shape)}")
    if not logp.is_floating_point():
        raise ValueError(f"loss {name!r}: logp must be a floating tensor, got {logp.dtype}")
    for field, t in (("old_logp", old_logp), ("mask", mask), ("entropy", entropy)):
        if t is not None and t.shape != logp.shape:
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


@dataclass(frozen=True)
class LossFn:
    """A loss resolved once (`LOSSES.build`): the entry, its validated hyperparameters (`params`,
    eps_low / eps_high included) and the subset its function takes (`fn_params`)."""

    entry: LossEntry
    params: dict[str, Any]
    fn_params: dict[str, Any]

    @property
    def name(self) -> str:
        return self.entry.name

    def surrogate(self, ctx: RatioContext) -> Tensor:
        """s = fn(ctx) with this loss's hyperparameters, checked for shape. [B, T]"""
        s = self.entry.fn(ctx, **self.fn_params)
        if not isinstance(s, Tensor) or s.shape != ctx.ratio.shape:
            shape = tuple(s.shape) if isinstance(s, Tensor) else type(s).__name__
            raise RuntimeError(f"loss {self.name!r} returned {shape}, expected a tensor {tuple(ctx.ratio.shape)}")
        return s

    def __call__(self, logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor,
                 agg: str | None = None, max_len: int | None = None,
                 entropy: Tensor | None = None) -> PolicyLossOutput:
        """The loss aggregated with `agg` (default: the loss's own), plus its metrics.

        Shapes: logp, old_logp, mask, entropy (optional, for losses that read it) [B, T];
        advantages [B] (per sequence) or [B, T].
        Gradient: an elementwise loss gets dloss/dlogp_t = -A_t w_t a_t exactly, from one
        elementwise autograd pass (a = the aggregation weights); any other loss gets plain
        autograd of the aggregated value sum_t a_t (-A_t) s_t.
        weight: w_t = sum_j (a_j / a_t) ds_j/dlogp_t, the weight token t gets when its sequence's
        advantage is constant: ds_t/dlogp_t for an elementwise loss, the sequence weight broadcast
        to its tokens for a sequence-level one (GSPO: s_i, or 0 where clipped).
        Metrics (Python floats): loss; frac_M, frac_LN, frac_HP, frac_LP, frac_HN (fractions of
        response tokens, summing to 1, regions of `region_ratio`); eur (token mean of the
        relative weight w / region_ratio); ratio_min / ratio_mean / ratio_max (token ratio);
        w_M ... w_HN (mean relative weight per region, 0.0 when the region is empty); clip_frac
        (tokens whose relative weight differs from 1 by more than 1e-5); zero_weight_frac (w == 0);
        kl_old (masked mean k3 from the current to the old policy, d = old_logp - logp);
        adv_pos_frac (tokens with A > 0); n_tokens. An empty mask gives loss 0 and zero fractions.
        """
        name = self.name
        agg = agg or self.entry.agg
        check_agg_mode(agg, name)
        _check_inputs(name, logp, old_logp, advantages, mask, entropy)

        dtype = torch.promote_types(logp.dtype, torch.float32)
        mask = mask if mask.dtype == torch.bool else mask != 0             # [B, T]
        mask_f = mask.to(dtype)
        with torch.no_grad():
            old = sanitize(old_logp, mask_f, dtype)                        # [B, T]
            if advantages.dim() == 1:
                adv = sanitize(advantages, None, dtype)[:, None] * mask_f # [B, T]
            else:
                adv = sanitize(advantages, mask_f, dtype)
            log_ratio = (sanitize(logp, mask_f, dtype) - old).clamp_(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
            weights = aggregation_weights(mask, agg, max_len, dtype)       # [B, T]

        # The leaf is the log-ratio (d/dlogp = d/dlog_ratio, old_logp being data); 0 on masked tokens.
        leaf = log_ratio.requires_grad_(True)                              # [B, T]
        with torch.enable_grad():
            ratio = torch.exp(leaf)
            ctx = self._context(old + leaf, old, ratio, log_ratio.detach(), adv, mask_f, entropy)
            s = self.surrogate(ctx)
            neg_adv = -adv
            if self.entry.elementwise:                                     # w = ds_t/dlogp_t, one pass
                w = _grad(s, leaf, torch.ones_like(s))
                with torch.no_grad():
                    coef = w * (neg_adv * weights)                         # d loss / d logp
            else:                                                          # plain autograd of the aggregate
                coef = _grad(s, leaf, neg_adv * weights, retain=True)
                w = _grad(s, leaf, weights) / torch.where(weights > 0, weights, 1.0)
        w = w * mask_f                                                     # [B, T]
        with torch.no_grad():
            token_loss = neg_adv * s.detach()                              # [B, T], 0 on masked tokens
            value = torch.dot(token_loss.flatten(), weights.flatten())
            rel = w / ctx.region_ratio                                     # [B, T], 0 on masked tokens
        loss = _WeightedGradient.apply(logp, value, coef)
        return PolicyLossOutput(loss=loss, metrics=_metrics(value, ctx, w, rel, mask_f), ratio=ctx.ratio_sg, weight=w,
                                region=region_codes(ctx, mask_f), token_loss=token_loss, rel_weight=rel)

    def _context(self, logp: Tensor, old: Tensor, ratio: Tensor, log_ratio: Tensor, adv: Tensor, mask_f: Tensor,
                 entropy: Tensor | None) -> RatioContext:
        low, high = self.params["eps_low"], self.params["eps_high"]
        ctx = _context(logp, old, ratio, ratio.detach(), log_ratio, greater(adv, 0.0), mask_f, low, high,
                       entropy=entropy)
        if self.entry.region_ratio is None:
            return ctx
        region_ratio = self.entry.region_ratio(ctx).detach()
        return _context(logp, old, ratio, ctx.ratio_sg, log_ratio, ctx.is_pos, mask_f, low, high,
                        region_ratio=region_ratio, entropy=entropy)


def _grad(s: Tensor, leaf: Tensor, outer: Tensor, retain: bool = False) -> Tensor:
    """d sum(outer * s) / d leaf (zeros where s does not depend on leaf)."""
    if not s.requires_grad:
        return torch.zeros_like(leaf)
    (g,) = torch.autograd.grad(s, leaf, grad_outputs=outer, allow_unused=True, retain_graph=retain)
    return torch.zeros_like(leaf) if g is None else g


def policy_loss(name: str, logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor,
                agg: str | None = None, max_len: int | None = None, entropy: Tensor | None = None,
                **hyperparams: Any) -> PolicyLossOutput:
    """`LOSSES.build(name, **hyperparams)(logp, old_logp, advantages, mask, agg, max_len, entropy)`:
    the one-call form for notebooks, tools and tests (the trainer builds its LossFn once)."""
    return LOSSES.build(name, **hyperparams)(logp, old_logp, advantages, mask, agg=agg, max_len=max_len,
                                             entropy=entropy)


@torch.no_grad()
def _metrics(loss: Tensor, ctx: RatioContext, w: Tensor, rel: Tensor, mask_f: Tensor) -> dict[str, float]:
    """All metrics in one host transfer. Region counts and per-region sums are sums and dot
    products of the shared 0/1 region indicators; masked tokens have r = 1, log-ratio 0, w = 0
    and all indicators 0 (LossFn makes them so), which the counts rely on. The relative weight is
    w / region_ratio (the token ratio r, except for losses whose trust region acts on another)."""
    r, lr = ctx.ratio_sg.flatten(), ctx.log_ratio.flatten()                # [B*T]
    is_pos, mask_v = ctx.is_pos.flatten(), mask_f.flatten()
    numel = r.numel()
    rel = rel.flatten()                                                   # w / region_ratio, 0 on masked tokens
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
