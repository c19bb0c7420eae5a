"""SAPO gate functions f(x, tau): the gate paper's equations (3), (6), (7), (8).

A gate replaces PPO's hard clip: SAPO's per-token loss is l = -A * f(r; tau), so the gradient
weight is w = f'(r) * r and the relative weight is w / r = f'(r). Autograd gives f'; the
closed forms below are for the reader (and the tests check autograd against them).

Admissible gates (gate paper, Sec. 4): (i) f is C1; (ii) f' has its global maximum 1 at x = 1;
(iii) f' decreases monotonically away from 1; (iv) x f'(x) -> 0 as x -> inf.

Add a gate with one decorated function:

    @register_gate("tanh")
    def tanh_gate(x, tau):
        '''f = 1 + tanh(tau (x - 1)) / tau,  f' = 1 - tanh^2(tau (x - 1))'''
        return 1 + torch.tanh(tau * (x - 1)) / tau

A config can also name a gate defined outside rlengine: `loss.gate=my_pkg.gates:tanh`.

`tau` is a float or a tensor broadcastable to x (SAPO passes a per-token tensor holding tau_pos
on positive tokens and tau_neg elsewhere), so write gates with torch ops only.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

Gate = Callable[[Tensor, "float | Tensor"], Tensor]

GATES: dict[str, Gate] = {}
# name -> (x, tau) -> (f(x), f'(x)), computed without autograd: the closed-form derivative SAPO's
# backward multiplies by, instead of differentiating f's graph (one multiply instead of a dozen
# kernels; tests/test_gates.py checks both against autograd of f and the paper's f').
GATE_DERIVATIVES: dict[str, Callable[[Tensor, "float | Tensor"], tuple[Tensor, Tensor]]] = {}


def register_gate(name: str, *, value_and_derivative=None, replace: bool = False) -> Callable[[Gate], Gate]:
    """Decorator: register `f(x: Tensor, tau: float | Tensor) -> Tensor` under `name` (autograd
    gives f'). `value_and_derivative(x, tau) -> (f, f')`, optional, is a faster closed form."""

    def decorator(fn: Gate) -> Gate:
        if name in GATES and not replace:
            raise ValueError(f"gate {name!r} is already registered (pass replace=True to override)")
        GATES[name] = fn
        GATE_DERIVATIVES.pop(name, None)
        if value_and_derivative is not None:
            GATE_DERIVATIVES[name] = value_and_derivative
        return fn

    return decorator


class _ClosedFormGate(torch.autograd.Function):
    """f(x) whose gradient is the precomputed f'(x) [B, T] (tau carries no gradient)."""

    @staticmethod
    def forward(ctx, x: Tensor, tau, pair) -> Tensor:  # noqa: D102
        value, slope = pair(x, tau)
        ctx.save_for_backward(slope)
        return value

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: D102
        (slope,) = ctx.saved_tensors
        return grad * slope, None, None


def apply_gate(name: str, x: Tensor, tau: "float | Tensor") -> Tensor:
    """f(x; tau) with gradient: through the gate's closed-form derivative when it declares one,
    else autograd of f."""
    pair = GATE_DERIVATIVES.get(name)
    if pair is None:
        return get_gate(name)(x, tau)
    return _ClosedFormGate.apply(x, tau, pair)


def get_gate(name: str) -> Gate:
    """A registered gate, or a plug-in `package.module:function` (imported and registered under
    that reference on first use)."""
    from rlengine.plugins import import_ref, is_ref

    if isinstance(name, str) and name in GATES:
        return GATES[name]
    if is_ref(name):
        GATES[name] = import_ref(name, "gate")
        return GATES[name]
    raise ValueError(f"unknown gate {name!r}; valid choices: {', '.join(sorted(GATES))} "
                     "or a plug-in 'package.module:function'")


def _sigmoid_pair(x: Tensor, tau: float | Tensor) -> tuple[Tensor, Tensor]:
    """f = (4 / tau) sigmoid(u), f' = 4 sigmoid(u) sigmoid(-u): both factors taken as they are,
    without 1 - s, so f' keeps its relative accuracy far into the tail. u = tau (x - 1)."""
    u = (x - 1.0) * tau
    s, t = torch.sigmoid(u), torch.sigmoid(-u)
    return s * (4.0 / tau), (s * t).mul_(4.0)


def _erf_pair(x: Tensor, tau: float | Tensor) -> tuple[Tensor, Tensor]:
    """f = 1 + sqrt(pi / 2) / tau * erf(v), f' = exp(-v^2), v = tau (x - 1) / sqrt 2."""
    v = (x - 1.0) * (tau / math.sqrt(2.0))
    return torch.erf(v).mul_(math.sqrt(math.pi / 2.0) / tau).add_(1.0), torch.exp(-(v * v))


def _arctan_pair(x: Tensor, tau: float | Tensor) -> tuple[Tensor, Tensor]:
    """f = 1 + arctan(u) / tau, f' = 1 / (1 + u^2), u = tau (x - 1)."""
    u = (x - 1.0) * tau
    return torch.atan(u).div_(tau).add_(1.0), torch.reciprocal(torch.addcmul(torch.ones_like(u), u, u))


def _softsign_pair(x: Tensor, tau: float | Tensor) -> tuple[Tensor, Tensor]:
    """f = 1 + (x - 1) / h, f' = h^-3, h = hypot(1, u) = sqrt(1 + u^2) without overflow. u = tau (x - 1).
    (The value has no cancellation; f' is a product of positive terms.)"""
    d = x - 1.0
    h = torch.hypot(torch.ones_like(d), d * tau)
    return (d / h).add_(1.0), torch.pow(h, -3.0)


@register_gate("sigmoid", value_and_derivative=_sigmoid_pair)
def sigmoid_gate(x: Tensor, tau: float | Tensor) -> Tensor:
    """Eq. (3), original SAPO: f(x) = sigmoid(tau (x - 1)) * 4 / tau.

    f'(x) = 4 s (1 - s), s = sigmoid(tau (x - 1)); exponential decay. (f(1) = 2 / tau.)

    Evaluated as sigmoid(u) = 1/2 + sign(u) (1/2 - sigmoid(-|u|)), so the sigmoid is always
    taken where it is small: autograd's y (1 - y) is then accurate far into the tail, where the
    direct form's 1 - y cancels to a few ulps of 1 in float32. sign(0) = +1 here, so f'(1) = 1.
    """
    d = x - 1.0
    sgn = torch.copysign(d.new_ones(()), d.detach())                      # sign(u), tau > 0; +1 at d = +0
    y = torch.sigmoid(d * (sgn * -tau))                                   # sigmoid(-|u|) <= 1/2, u = tau d
    # (4 / tau) (1/2 + sgn (1/2 - y)) = c1 - c2 y
    c2 = sgn * (4.0 / tau)
    return torch.addcmul(0.5 * c2 + 2.0 / tau, c2, y, value=-1.0)


@register_gate("erf", value_and_derivative=_erf_pair)
def erf_gate(x: Tensor, tau: float | Tensor) -> Tensor:
    """Eq. (6): f(x) = sqrt(pi / (2 tau^2)) (1 + erf(tau (x - 1) / sqrt 2)) + 1 - sqrt(pi / (2 tau^2)).

    f'(x) = exp(-tau^2 (x - 1)^2 / 2); Gaussian decay. f(1) = 1."""
    scale = math.sqrt(math.pi / 2.0) / tau                                # sqrt(pi / (2 tau^2)), tau > 0
    # scale (1 + erf(v)) + 1 - scale, with the constants collected: 1 + scale erf(v)
    return 1.0 + scale * torch.erf((x - 1.0) * (tau / math.sqrt(2.0)))


@register_gate("arctan", value_and_derivative=_arctan_pair)
def arctan_gate(x: Tensor, tau: float | Tensor) -> Tensor:
    """Eq. (7): f(x) = 1 + arctan(tau (x - 1)) / tau.

    f'(x) = 1 / (1 + tau^2 (x - 1)^2); polynomial decay."""
    return 1.0 + torch.atan(tau * (x - 1.0)) / tau


@register_gate("softsign", value_and_derivative=_softsign_pair)
def softsign_gate(x: Tensor, tau: float | Tensor) -> Tensor:
    """Eq. (8): f(x) = 1 + (x - 1) / sqrt(1 + tau^2 (x - 1)^2).

    f'(x) = (1 + tau^2 (x - 1)^2)^(-3/2); polynomial decay.

    Written as f = 1 + sign(u) g(|u|) / tau with u = tau (x - 1), a = |u|, s = sqrt(1 + a^2)
    and g(a) = a / s = 1 - 1 / (s (s + a)) (since (s - a)(s + a) = 1): the same function, but
    autograd's derivative of the direct form is a difference of two nearly equal terms
    (1 + u^2)^(-1/2) - u^2 (1 + u^2)^(-3/2), which loses all precision in float32 once |u| is
    large, while here every term of the derivative is positive. sign(0) = +1, so f'(1) = 1.
    """
    d = x - 1.0
    sgn = torch.copysign(d.new_ones(()), d.detach())                      # sign(u), tau > 0; +1 at d = +0
    a = d * (sgn * tau)                                                   # |u|, u = tau d; d|u|/du = sgn
    q = torch.addcmul(d.new_ones(()), a, a)                               # 1 + a^2 = s^2
    h = torch.addcmul(q, a, torch.sqrt(q))                                # s (s + a)
    c2 = sgn / tau
    return torch.addcdiv(1.0 + c2, c2, h, value=-1.0)                     # 1 + sgn (1 - 1/h) / tau
