"""The policy-loss zoo, SAPO gates, KL estimators and the entropy term (pure functions).

    from rlengine.losses import LOSSES, policy_loss
    loss_fn = LOSSES.build("dgpo", n=2, m=2)            # resolved and validated once
    out = loss_fn(logp, old_logp, advantages, mask, agg="token-mean")
    out.loss.backward(); out.metrics["frac_LN"], out.metrics["eur"]
    policy_loss("dgpo", logp, old_logp, advantages, mask, n=2, m=2)   # the same in one call

Modules: core.py (ratio, regions, aggregation, metrics, registry), gates.py (GATES),
zoo.py (one function per loss), kl.py (k1/k2/k3, entropy). Formulas: docs/losses.md.
"""
from rlengine.losses.core import (
    AGG_MODES,
    LOG_RATIO_CLAMP,
    LOSSES,
    PARAM_RULES,
    REPORT_EPS,
    REGION_PAD,
    REGIONS,
    LossEntry,
    LossFn,
    LossRegistry,
    PolicyLossOutput,
    RatioContext,
    aggregate,
    aggregation_weights,
    greater,
    less,
    loss_hyperparams,
    make_ratio_context,
    policy_loss,
    region_codes,
    register_loss,
    select,
    sequence_mean,
    sequence_ratio,
    trust_bounds,
    validate_loss_params,
)
from rlengine.losses.gates import GATE_DERIVATIVES, GATES, apply_gate, get_gate, register_gate
from rlengine.losses import zoo  # noqa: F401  (registers the built-in losses)
from rlengine.losses.kl import (
    KL_ESTIMATORS,
    entropy_from_logits,
    entropy_term,
    kl_k1,
    kl_k2,
    kl_k3,
    kl_penalty,
    kl_term,
)

__all__ = [
    "AGG_MODES", "GATES", "KL_ESTIMATORS", "LOG_RATIO_CLAMP", "LOSSES", "PARAM_RULES", "REGIONS", "REGION_PAD",
    "LossEntry", "LossFn", "LossRegistry", "PolicyLossOutput", "REPORT_EPS", "GATE_DERIVATIVES", "apply_gate",
    "sequence_mean", "sequence_ratio", "RatioContext", "aggregate", "aggregation_weights", "greater", "less", "select", "entropy_from_logits", "entropy_term",
    "get_gate", "kl_k1", "kl_k2", "kl_k3", "kl_penalty", "kl_term", "loss_hyperparams", "make_ratio_context",
    "policy_loss", "region_codes", "register_gate", "register_loss", "trust_bounds", "validate_loss_params",
]
