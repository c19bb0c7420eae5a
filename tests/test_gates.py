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
    # (i) C1: f is differentiable (central differences match f') and f' has no jumps
    h = 1e-6
    xs = np.array([0.3, 0.9, 1.0 - 1e-3, 1.0, 1.0 + 1e-3, 1.1, 1.7, 4.0])
    fd = (f(torch.tensor(xs + h, dtype=torch.float64), tau) - f(torch.tensor(xs - h, dtype=torch.float64), tau)).numpy() / (2 * h)
    if not np.allclose(fd, autograd_f_prime(f, xs, tau), rtol=1e-5, atol=1e-8):
        bad.append("(i) f' does not match the derivative of f")
    left = (f(torch.tensor([1.0], dtype=torch.float64), tau) - f(torch.tensor([1.0 - h], dtype=torch.float64), tau)).item() / h
    right = (f(torch.tensor([1.0 + h], dtype=torch.float64), tau) - f(torch.tensor([1.0], dtype=torch.float64), tau)).item() / h
    if abs(left - right) > 1e-3 * max(1.0, tau):
        bad.append("(i) one-sided derivatives differ at x = 1")
    fine = x[:30001]
    step = np.abs(np.diff(d[:30001])).max()
    if step > 50 * (fine[1] - fine[0]) * max(1.0, tau) ** 2:
        bad.append(f"(i) f' jumps by {step:.3g} between neighbouring grid points")
    if not np.isfinite(fx).all():
        bad.append("f not finite")
    # (ii) f'(1) = 1 is the global maximum
    if abs(autograd_f_prime(f, np.array([1.0]), tau)[0] - 1.0) > 1e-12:
        bad.append("(ii) f'(1) != 1")
    if d.max() > 1.0 + 1e-12:
        bad.append("(ii) f' exceeds 1")
    # (iii) monotone decay away from 1
    below, above = x <= 1.0, x >= 1.0
    if (np.diff(d[below]) < -1e-15).any() or (np.diff(d[above]) > 1e-15).any():
        bad.append("(iii) f' is not monotone away from 1")
    # (iv) x f'(x) -> 0
    far = np.array([1e2, 1e3, 1e4, 1e6])
    tail = far * autograd_f_prime(f, far, tau)
    if not (tail[-1] < 1e-3 and (np.diff(tail) <= 1e-15).all()):
        bad.append("(iv) x f'(x) does not go to 0")
    return bad


@pytest.mark.parametrize("gate", ["sigmoid", "erf", "arctan", "softsign"])
@pytest.mark.parametrize("tau", TAUS)
def test_gate_values_are_the_paper_equations(gate, tau):
    x = np.concatenate([np.linspace(0, 3, 301), np.geomspace(3, 1e3, 50)])
    np.testing.assert_allclose(GATES[gate](torch.tensor(x, dtype=torch.float64), tau).numpy(), paper_f(gate, x, tau),
                               rtol=1e-12, atol=1e-13)
    if gate != "sigmoid":  # (6)-(8) pass through (1, 1); (3) gives f(1) = 2 / tau
        assert GATES[gate](torch.tensor([1.0], dtype=torch.float64), tau).item() == pytest.approx(1.0, abs=1e-15)
    else:
        assert GATES[gate](torch.tensor([1.0], dtype=torch.float64), tau).item() == pytest.approx(2.0 / tau)


@pytest.mark.parametrize("gate", ["sigmoid", "erf", "arctan", "softsign"])
@pytest.mark.parametrize("tau", TAUS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_autograd_derivative_is_the_paper_derivative(gate, tau, dtype):
    x = np.concatenate([np.geomspace(1e-3, 1e3, 400), [1.0]])
    got = autograd_f_prime(GATES[gate], x, tau, dtype)
    want = paper_f_prime(gate, x, tau)
    if dtype == torch.float64:
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-300)
    else:  # float32: relative accuracy where f' is representable, absolute elsewhere
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-30)


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
        assert torch.allclose(f(x, tau), expected, rtol=1e-14, atol=0), name


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
        assert torch.allclose(out.weight, want, rtol=1e-12)
        assert out.metrics["eur"] == pytest.approx((want / r).mean().item())
        with pytest.raises(ValueError, match="already registered"):
            register_gate("test_tanh")(tanh_gate)
    finally:
        GATES.pop("test_tanh", None)


@pytest.mark.parametrize("gate", ["sigmoid", "erf", "arctan", "softsign"])
@pytest.mark.parametrize("tau", TAUS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_closed_form_derivative_is_f_and_its_derivative(gate, tau, dtype):
    """SAPO's backward multiplies by the gate's declared (f, f') pair: f must be the gate's value
    and f' the paper's derivative (float64: rounding of ~10 ops, rtol 1e-9; float32: 2e-5 as above),
    and the SAPO weight built on it must be f'(r) r."""
    from rlengine.losses.gates import GATE_DERIVATIVES

    x = torch.tensor(np.concatenate([np.geomspace(1e-3, 1e3, 400), [1.0]]), dtype=dtype)
    value, slope = GATE_DERIVATIVES[gate](x, tau)
    rtol = 1e-9 if dtype == torch.float64 else 2e-5
    np.testing.assert_allclose(value.double().numpy(), GATES[gate](x.double(), tau).numpy(), rtol=rtol, atol=1e-300)
    np.testing.assert_allclose(slope.double().numpy(), paper_f_prime(gate, x.double().numpy(), tau), rtol=rtol,
                               atol=1e-30)
    r = x.reshape(1, -1).double()
    out = policy_loss("sapo", torch.log(r), torch.zeros_like(r), torch.tensor([1.0], dtype=torch.float64),
                      torch.ones_like(r, dtype=torch.bool), gate=gate, tau_pos=tau, tau_neg=tau)
    np.testing.assert_allclose(out.weight[0].numpy(), paper_f_prime(gate, r[0].numpy(), tau) * r[0].numpy(),
                               rtol=1e-9, atol=1e-300)
