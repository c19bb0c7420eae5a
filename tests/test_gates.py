"""The SAPO gates: values are the gate paper's equations, autograd's f' is the paper's f', and
every gate is admissible (Sec. 4): C1, f'(1) = 1 is the global maximum, f' decays monotonically
away from 1, x f'(x) -> 0. The admissibility checker is shown to reject non-admissible gates."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rlengine.losses import GATES, policy_loss, register_gate

TAUS = [0.5, 1.0, 1.05, 5.0, 10.0, 12.0]
EPS64 = torch.finfo(torch.float64).eps


def paper_f(gate: str, x: np.ndarray, tau: float) -> np.ndarray:
    """Eqs. (3), (6), (7), (8) written directly."""
    u = tau * (x - 1)
    if gate == "sigmoid":
        return 4 / tau / (1 + np.exp(-u))
    if gate == "erf":
        c = math.sqrt(math.pi / (2 * tau ** 2))
        return c * (1 + np.array([math.erf(v / math.sqrt(2)) for v in u])) + 1 - c
    if gate == "arctan":
        return 1 + np.arctan(u) / tau
    if gate == "softsign":
        return 1 + (x - 1) / np.sqrt(1 + u ** 2)
    raise KeyError(gate)


def paper_f_prime(gate: str, x: np.ndarray, tau: float) -> np.ndarray:
    u = tau * (x - 1)
    if gate == "sigmoid":
        e = np.exp(-np.abs(u))  # 4 s (1 - s) = 4 e^-|u| / (1 + e^-|u|)^2, no cancellation
        return 4 * e / (1 + e) ** 2
    if gate == "erf":
        return np.exp(-u ** 2 / 2)
    if gate == "arctan":
        return 1 / (1 + u ** 2)
    if gate == "softsign":
        return (1 + u ** 2) ** -1.5
    raise KeyError(gate)


# Tolerances. Each gate is g(u) / tau (+ const) of u = tau (x - 1), so an error du in u moves f' by
# |d ln f' / du| du relatively: |u| for erf's exp(-u^2 / 2), tanh(|u| / 2) <= 1 for sigmoid's
# 4 s (1 - s), 2|u| / (1 + u^2) <= 1 for arctan, 3|u| / (1 + u^2) <= 1.5 for softsign. u carries
# du <= eps (2|u| + tau |x| rel_x): x - 1, the product by tau (or tau / sqrt 2) and the square each
# round once, and rel_x is the relative error of x itself against the reference's x. On top, each
# form rounds ~10 times at its own magnitude (<= 16 eps with libm's exp / erf / atan ulps).
DLOG_FPRIME = {"sigmoid": lambda a: np.tanh(a / 2), "erf": lambda a: a, "arctan": lambda a: 2 * a / (1 + a * a),
               "softsign": lambda a: 3 * a / (1 + a * a)}


def fprime_rtol(gate: str, x: np.ndarray, tau: float, eps: float, rel_x: float = 0.0) -> np.ndarray:
    """Relative error bound of a computed f'(x) against the float64 paper form (see above)."""
    u = np.abs(tau * (x - 1.0))
    return 16 * eps + DLOG_FPRIME[gate](u) * (2 * eps * u + tau * np.abs(x) * rel_x)


def fprime_atol(dtype) -> float:
    """Below a few smallest-normal numbers f' may underflow or be flushed to 0 (the sigmoid gate's
    e^|u| overflows at |u| = ln(max), where 4 e^-|u| = 4 / max ~ tiny): no relative accuracy there."""
    return 4 * torch.finfo(dtype).tiny


def value_scale(gate: str, tau: float, want: np.ndarray) -> np.ndarray:
    """Magnitude at which the paper's value forms round: sigmoid is a product (|f| itself); erf adds
    c (1 + erf) and 1 - c with c = sqrt(pi / 2) / tau; arctan and softsign add 1 and a term <= pi / (2 tau)."""
    extra = {"sigmoid": 0.0, "erf": 1 + 2 * math.sqrt(math.pi / 2) / tau, "arctan": 1 + math.pi / (2 * tau),
             "softsign": 1 + 1 / tau}[gate]
    return np.maximum(np.abs(want), extra)


def assert_within(got, want, rtol, atol) -> None:
    """|got - want| <= atol + rtol |want| elementwise (rtol and atol may be arrays)."""
    err, tol = np.abs(np.asarray(got) - want), atol + rtol * np.abs(want)
    bad = ~(err <= tol)
    assert not bad.any(), f"{bad.sum()} of {err.size} beyond the bound, worst |err| / bound {(err[bad] / tol[bad]).max():.3g}"


def autograd_f_prime(f, x: np.ndarray, tau, dtype=torch.float64) -> np.ndarray:
    xt = torch.tensor(x, dtype=dtype, requires_grad=True)
    (g,) = torch.autograd.grad(f(xt, tau).sum(), xt)
    return g.double().numpy()


def admissibility_violations(f, tau: float) -> list[str]:
    """The gate paper's conditions (i)-(iv), checked numerically; returns what fails."""
    bad = []
    x = np.concatenate([np.linspace(0.0, 3.0, 30001), np.geomspace(3.0, 1e4, 2000)[1:]])
    fx = f(torch.tensor(x, dtype=torch.float64), tau).numpy()
    d = autograd_f_prime(f, x, tau)
    # Numerical allowances (float64). A gate g(tau (x - 1)) / tau has |f''| = tau |g''| <= tau for
    # every gate here (max |g''|: erf 0.61, sigmoid 0.38, arctan 0.65, softsign 0.86, tanh 0.77), and
    # |f^(3)| <= tau^2 likewise; f itself is computed to a few ulps of its magnitude |f| <= fmax.
    fmax = float(np.abs(fx[np.isfinite(fx)]).max(initial=1.0))
    # (i) C1: f is differentiable (central differences match f') and f' has no jumps
    h = 1e-6
    xs = np.array([0.3, 0.9, 1.0 - 1e-3, 1.0, 1.0 + 1e-3, 1.1, 1.7, 4.0])
    fd = (f(torch.tensor(xs + h, dtype=torch.float64), tau) - f(torch.tensor(xs - h, dtype=torch.float64), tau)).numpy() / (2 * h)
    # central differences: rounding of the two values (<= 4 ulps each of fmax) over 2h, and
    # truncation h^2 |f^(3)| / 6 <= h^2 tau^2 / 6; 2x to spare
    if not np.allclose(fd, autograd_f_prime(f, xs, tau), rtol=0, atol=2 * (4 * EPS64 * fmax / h + h ** 2 * tau ** 2 / 6)):
        bad.append("(i) f' does not match the derivative of f")
    left = (f(torch.tensor([1.0], dtype=torch.float64), tau) - f(torch.tensor([1.0 - h], dtype=torch.float64), tau)).item() / h
    right = (f(torch.tensor([1.0 + h], dtype=torch.float64), tau) - f(torch.tensor([1.0], dtype=torch.float64), tau)).item() / h
    # each one-sided difference is off by <= h |f''| / 2 <= h tau / 2 (truncation) and 8 ulps of fmax
    # over h (rounding): a kink in f' larger than that, 2x to spare, is a violation
    if abs(left - right) > 2 * (h * max(1.0, tau) + 16 * EPS64 * fmax / h):
        bad.append("(i) one-sided derivatives differ at x = 1")
    fine = x[:30001]
    step = np.abs(np.diff(d[:30001])).max()
    # a smooth f' moves by <= dx |f''| <= dx tau between grid points (dx = 1e-4), plus its rounding
    if step > 2 * (fine[1] - fine[0]) * max(1.0, tau) + 32 * EPS64:
        bad.append(f"(i) f' jumps by {step:.3g} between neighbouring grid points")
    if not np.isfinite(fx).all():
        bad.append("f not finite")
    # (ii) f'(1) = 1 is the global maximum; autograd's f' <= 1 rounds ~10 times at magnitude 1:
    # 16 eps64 either way (so a rounding wiggle between neighbours in (iii) is <= 32 eps64)
    if abs(autograd_f_prime(f, np.array([1.0]), tau)[0] - 1.0) > 16 * EPS64:
        bad.append("(ii) f'(1) != 1")
    if d.max() > 1.0 + 16 * EPS64:
        bad.append("(ii) f' exceeds 1")
    # (iii) monotone decay away from 1
    below, above = x <= 1.0, x >= 1.0
    if (np.diff(d[below]) < -32 * EPS64).any() or (np.diff(d[above]) > 32 * EPS64).any():
        bad.append("(iii) f' is not monotone away from 1")
    # (iv) x f'(x) -> 0. 1e-3 is the limit's criterion, not a rounding bound: the slowest admissible
    # tail here, arctan's 1 / (tau^2 x), is 4e-6 at x = 1e6 for tau = 0.5; identity's x f' is 1e6.
    # Decreasing up to the rounding of x f' (16 ulps of each value).
    far = np.array([1e2, 1e3, 1e4, 1e6])
    tail = far * autograd_f_prime(f, far, tau)
    if not (tail[-1] < 1e-3 and (np.diff(tail) <= 16 * EPS64 * np.abs(tail[:-1])).all()):
        bad.append("(iv) x f'(x) does not go to 0")
    return bad


@pytest.mark.parametrize("gate", ["sigmoid", "erf", "arctan", "softsign"])
@pytest.mark.parametrize("tau", TAUS)
def test_gate_values_are_the_paper_equations(gate, tau):
    x = np.concatenate([np.linspace(0, 3, 301), np.geomspace(3, 1e3, 50)])
    want = paper_f(gate, x, tau)
    # two float64 forms of ~10 ops each (libm exp / erf / atan within 1-2 ulps), rounding at the
    # magnitude of the terms they add (value_scale): 16 eps64 of that
    assert_within(GATES[gate](torch.tensor(x, dtype=torch.float64), tau).numpy(), want,
                  rtol=0, atol=16 * EPS64 * value_scale(gate, tau, want))
    if gate != "sigmoid":  # (6)-(8) pass through (1, 1); (3) gives f(1) = 2 / tau
        # u = 0 makes the gate's own term 0 (softsign: (1 + 1/tau) - 1/tau, one rounding of 1 + 1/tau)
        assert GATES[gate](torch.tensor([1.0], dtype=torch.float64), tau).item() == pytest.approx(
            1.0, abs=EPS64 * (1 + 1 / tau))
    else:  # 4/tau - (2/tau) sigmoid(0), sigmoid(0) = 1/2 exactly: the roundings of 4 / tau and 2 / tau
        assert GATES[gate](torch.tensor([1.0], dtype=torch.float64), tau).item() == pytest.approx(2.0 / tau, rel=2 * EPS64)


@pytest.mark.parametrize("gate", ["sigmoid", "erf", "arctan", "softsign"])
@pytest.mark.parametrize("tau", TAUS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_autograd_derivative_is_the_paper_derivative(gate, tau, dtype):
    x = np.concatenate([np.geomspace(1e-3, 1e3, 400), [1.0]])
    got = autograd_f_prime(GATES[gate], x, tau, dtype)
    want = paper_f_prime(gate, x, tau)
    # relative accuracy where f' is a normal number, absolute below (fprime_rtol / fprime_atol); x is
    # rounded to dtype (eps / 2) while the float64 reference uses it unrounded
    eps = torch.finfo(dtype).eps
    assert_within(got, want, rtol=fprime_rtol(gate, x, tau, eps, rel_x=eps / 2), atol=fprime_atol(dtype))


@pytest.mark.parametrize("gate", ["sigmoid", "erf", "arctan", "softsign"])
@pytest.mark.parametrize("tau", TAUS)
def test_gates_are_admissible(gate, tau):
    assert admissibility_violations(GATES[gate], tau) == []


def test_admissibility_check_rejects_bad_gates():
    def hard_clip(x, tau):  # not C1, f' = 1 on a plateau
        return torch.clamp(x, 1 - 1 / tau, 1 + 1 / tau)

    def identity(x, tau):  # x f'(x) = x does not vanish
        return x

    def wide_peak(x, tau):  # f'(1) = 2
        return 1 + 2 * torch.atan(tau * (x - 1)) / tau

    def off_center(x, tau):  # peak of f' at x = 1.5
        return 1 + torch.atan(tau * (x - 1.5)) / tau

    assert any(v.startswith("(i)") for v in admissibility_violations(hard_clip, 5.0))
    assert any(v.startswith("(iv)") for v in admissibility_violations(identity, 5.0))
    assert any(v.startswith("(ii)") for v in admissibility_violations(wide_peak, 5.0))
    assert any(v.startswith(("(ii)", "(iii)")) for v in admissibility_violations(off_center, 5.0))


def test_gates_accept_per_token_tau():
    x = torch.linspace(0.1, 3, 50, dtype=torch.float64)
    tau = torch.where(torch.arange(50) % 2 == 0, 10.0, 12.0).double()
    for name, f in GATES.items():
        expected = torch.stack([f(xi.reshape(1), ti.item())[0] for xi, ti in zip(x, tau)])
        # the same float64 formula with a tensor tau instead of a float: at most a vectorised vs scalar
        # transcendental (1-2 ulps) and the few roundings after it, at magnitude |f| <= 1 + pi / 20
        assert torch.allclose(f(x, tau), expected, rtol=0, atol=16 * EPS64), name


def test_user_gate_with_one_decorated_function():
    @register_gate("test_tanh")
    def tanh_gate(x, tau):
        """f = 1 + tanh(tau (x - 1)) / tau,  f' = 1 - tanh^2(tau (x - 1))"""
        return 1 + torch.tanh(tau * (x - 1)) / tau

    try:
        assert admissibility_violations(tanh_gate, 5.0) == []
        r = torch.tensor([[0.5, 1.0, 1.3, 4.0]], dtype=torch.float64)
        out = policy_loss("sapo", torch.log(r), torch.zeros_like(r), torch.tensor([1.0], dtype=torch.float64),
                          torch.ones_like(r, dtype=torch.bool), gate="test_tanh", tau_pos=5.0, tau_neg=6.0)
        want = (1 - torch.tanh(5.0 * (r - 1)) ** 2) * r
        # the loss sees r back from exp(log r) (relative error eps (1 + |ln r| / 2)); relative bound as
        # for the paper's gates with d ln f' / du = 2 tanh u <= 2. Both sides also form 1 - tanh^2
        # from a tanh near 1 (at r = 4: 1 - 2e-13), which cancels to a few eps64 absolute: 4 eps64 r
        rn = r.numpy()
        u = np.abs(5.0 * (rn - 1))
        rtol = 16 * EPS64 + 2 * (2 * EPS64 * u + 5.0 * rn * EPS64 * (1 + np.abs(np.log(rn)) / 2))
        assert_within(out.weight.numpy(), want.numpy(), rtol=rtol, atol=4 * EPS64 * rn.max())
        # the mean of those relative weights (<= 1 each): the same few eps64 absolute
        assert out.metrics["eur"] == pytest.approx((want / r).mean().item(), abs=8 * EPS64)
        with pytest.raises(ValueError, match="already registered"):
            register_gate("test_tanh")(tanh_gate)
    finally:
        GATES.pop("test_tanh", None)


@pytest.mark.parametrize("gate", ["sigmoid", "erf", "arctan", "softsign"])
@pytest.mark.parametrize("tau", TAUS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_closed_form_derivative_is_f_and_its_derivative(gate, tau, dtype):
    """SAPO's backward multiplies by the gate's declared (f, f') pair: f must be the gate's value
    and f' the paper's derivative (to the rounding bounds above: value_scale, fprime_rtol), and the
    SAPO weight built on it must be f'(r) r."""
    from rlengine.losses.gates import GATE_DERIVATIVES

    x = torch.tensor(np.concatenate([np.geomspace(1e-3, 1e3, 400), [1.0]]), dtype=dtype)
    value, slope = GATE_DERIVATIVES[gate](x, tau)
    eps, xd = torch.finfo(dtype).eps, x.double().numpy()        # both sides see the same (rounded) x
    want = GATES[gate](x.double(), tau).numpy()
    assert_within(value.double().numpy(), want, rtol=0, atol=16 * eps * value_scale(gate, tau, want))
    assert_within(slope.double().numpy(), paper_f_prime(gate, xd, tau), rtol=fprime_rtol(gate, xd, tau, eps),
                  atol=fprime_atol(dtype))
    r = x.reshape(1, -1).double()
    out = policy_loss("sapo", torch.log(r), torch.zeros_like(r), torch.tensor([1.0], dtype=torch.float64),
                      torch.ones_like(r, dtype=torch.bool), gate=gate, tau_pos=tau, tau_neg=tau)
    # float64; the loss sees r back from exp(log r), relative error eps64 (1 + |ln r| / 2), and where
    # f' underflows the weight f' r is off by up to fprime_atol r
    assert_within(out.weight[0].numpy(), paper_f_prime(gate, xd, tau) * xd,
                  rtol=fprime_rtol(gate, xd, tau, EPS64, rel_x=EPS64 * (1 + np.abs(np.log(xd)) / 2)),
                  atol=fprime_atol(torch.float64) * xd.max())
