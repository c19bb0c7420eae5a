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


def register_gate(name: str, *, replace: bool = False) -> Callable[[Gate], Gate]:
    """Decorator: register `f(x: Tensor, tau: float | Tensor) -> Tensor` under `name`."""

    def decorator(fn: Gate) -> Gate:
        if name in GATES and not replace:
            raise ValueError(f"gate {name!r} is already registered (pass replace=True to override)")
        GATES[name] = fn
        return fn

    return decorator


def get_gate(name: str) -> Gate:
    if name not in GATES:
        raise ValueError(f"unknown gate {name!r}; valid choices: {', '.join(sorted(GATES))}")
    return GATES[name]


@register_gate("sigmoid")
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


@register_gate("erf")
def erf_gate(x: Tensor, tau: float | Tensor) -> Tensor:
    """Eq. (6): f(x) = sqrt(pi / (2 tau^2)) (1 + erf(tau (x - 1) / sqrt 2)) + 1 - sqrt(pi / (2 tau^2)).

    f'(x) = exp(-tau^2 (x - 1)^2 / 2); Gaussian decay. f(1) = 1."""
    scale = math.sqrt(math.pi / 2.0) / tau                                # sqrt(pi / (2 tau^2)), tau > 0
    # scale (1 + erf(v)) + 1 - scale, with the constants collected: 1 + scale erf(v)
    return 1.0 + scale * torch.erf((x - 1.0) * (tau / math.sqrt(2.0)))


@register_gate("arctan")
def arctan_gate(x: Tensor, tau: float | Tensor) -> Tensor:
    """Eq. (7): f(x) = 1 + arctan(tau (x - 1)) / tau.

    f'(x) = 1 / (1 + tau^2 (x - 1)^2); polynomial decay."""
    return 1.0 + torch.atan(tau * (x - 1.0)) / tau


@register_gate("softsign")
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
