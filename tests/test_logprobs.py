"""The chunked log-prob / entropy autograd function against the naive full-logits computation."""
from __future__ import annotations

import pytest
import torch

from rlengine import logprobs
from rlengine.logprobs import chunked_logprobs_entropy, default_chunk_size

EPS64, EPS32 = torch.finfo(torch.float64).eps, torch.finfo(torch.float32).eps


def naive_logprobs_entropy(hidden, weight, targets, temperature):
    """Reference: materialise all logits, log_softmax, gather; entropy = -sum p log p."""
    logp_all = torch.log_softmax((hidden @ weight.t()) / temperature, dim=-1)  # [N, V]
    logp = logp_all.gather(1, targets[:, None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


# Tolerances: derived from the inputs' magnitudes (float64 on the side), as in
# tests/test_logprobs_model.py. Each implementation forms a logit z_v = h . w_v / T to within ~eps S
# of the exact value, S = max_v sum_i |h_i w_vi| / T, and its log-softmax loses a few ulps of the
# largest magnitudes it subtracts: |logp - exact| <= eps (S + 4 (|logp| + max|z|)) per side. The
# entropy (sum_v p_v (-logp_v)) carries the logits' error with weights summing to 1, hence 2x plus
# a few ulps of itself. The gradients: the logits' gradient g_nv = up_logp (1[v=y] - p_v)
# - up_ent p_v (logp_v + H_n) moves by p_v (|up_logp| + |up_ent| (1 + |logp_v| + H_n)) times the
# log-prob bound, and each gradient sums V (grad hidden) or N (grad weight) such terms, which
# rounds to ~V eps (or N eps) of their absolute sum.
def head_bounds(hidden, weight, targets, temperature, eps, sides=2, up_logp=None, up_ent=None):
    """(logp, entropy, grad hidden, grad weight) bounds on |got - want|; `sides`: how many of the two
    computations round at `eps` (2: two float64 implementations; 1: a float32 one against float64)."""
    h, w = hidden.detach().double(), weight.detach().double()
    S = (h.abs() @ w.abs().t()).amax(-1) / temperature                              # [N]
    z = h @ w.t() / temperature                                                       # [N, V]
    logp_all = torch.log_softmax(z, -1)
    p, ent = logp_all.exp(), -(logp_all.exp() * logp_all).sum(-1)
    b = eps * (sides * S + 4 * (logp_all.abs().amax(-1) + z.abs().amax(-1)))       # [N] any logp_v of the row
    bounds = [b, 2 * b + 4 * eps * ent.abs()]
    if up_logp is not None:
        ul = up_logp.abs()[:, None]
        ue = up_ent.abs()[:, None] if up_ent is not None else torch.zeros_like(ul)
        onehot = torch.nn.functional.one_hot(targets, z.shape[1]).double()
        g_abs = ul * (onehot + p) + ue * p * (logp_all.abs() + ent[:, None])          # [N, V] |g|
        dg = b[:, None] * p * (ul + ue * (1 + logp_all.abs() + ent[:, None]))          # [N, V] |delta g|
        V, N = z.shape[1], z.shape[0]
        bounds.append(((dg @ w.abs()) + sides * V * eps * (g_abs @ w.abs())) / temperature)       # [N, H]
        bounds.append(((dg.t() @ h.abs()) + sides * N * eps * (g_abs.t() @ h.abs())) / temperature)  # [V, H]
    return bounds


def assert_within(got, want, bound, name=""):
    err = (got.double() - want.double()).abs()
    assert (err <= bound).all(), f"{name}: worst |err| / bound {(err / bound.clamp_min(1e-300)).max().item():.3g}"


def make_inputs(n=37, h=16, v=50, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    weight = torch.randn(v, h, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=gen)
    return hidden, weight, targets


def grads_of(fn, hidden, weight, targets, temperature, up_logp, up_ent):
    hidden.grad = weight.grad = None
    logp, entropy = fn(hidden, weight, targets, temperature)
    loss = (logp * up_logp).sum() + ((entropy * up_ent).sum() if up_ent is not None else 0)
    loss.backward()
    return logp.detach(), entropy.detach(), hidden.grad.clone(), weight.grad.clone()


@pytest.mark.parametrize("temperature", [1.0, 0.6, 1.7])
@pytest.mark.parametrize("chunk_size", [1, 7, 37, 64])  # 7: ragged last chunk; 64 > N: one chunk
@pytest.mark.parametrize("column_block", [8192, 16])  # 16: V = 50 in 4 vocabulary blocks, the last ragged
def test_values_and_grads_match_naive_float64(temperature, chunk_size, column_block, monkeypatch):
    monkeypatch.setattr(logprobs, "COLUMN_BLOCK", column_block)
    hidden, weight, targets = make_inputs()
    gen = torch.Generator().manual_seed(1)
    up_logp = torch.randn(37, generator=gen, dtype=torch.float64)
    up_ent = torch.randn(37, generator=gen, dtype=torch.float64)
    chunked = grads_of(lambda *a: chunked_logprobs_entropy(*a, chunk_size=chunk_size), hidden, weight, targets,
                       temperature, up_logp, up_ent)
    naive = grads_of(naive_logprobs_entropy, hidden, weight, targets, temperature, up_logp, up_ent)
    bounds = head_bounds(hidden, weight, targets, temperature, EPS64, 2, up_logp, up_ent)
    for got, want, bound, name in zip(chunked, naive, bounds, ["logp", "entropy", "grad hidden", "grad weight"]):
        assert got.dtype == torch.float64
        assert_within(got, want, bound[:, None] if bound.dim() < got.dim() else bound, name)


@pytest.mark.parametrize("use", ["logp", "entropy"])
def test_grads_when_only_one_output_is_used(use, monkeypatch):
    monkeypatch.setattr(logprobs, "COLUMN_BLOCK", 8)
    hidden, weight, targets = make_inputs(n=20, seed=3)
    up = torch.linspace(-1, 1, 20, dtype=torch.float64)

    def loss_of(fn):
        hidden.grad = weight.grad = None
        logp, entropy = fn(hidden, weight, targets, 0.8)
        ((logp if use == "logp" else entropy) * up).sum().backward()
        return hidden.grad.clone(), weight.grad.clone()

    got = loss_of(lambda *a: chunked_logprobs_entropy(*a, chunk_size=6))
    want = loss_of(naive_logprobs_entropy)
    zero = torch.zeros_like(up)
    ups = (up, None) if use == "logp" else (zero, up)
    bounds = head_bounds(hidden, weight, targets, 0.8, EPS64, 2, *ups)[2:]
    for g, w, bound, name in zip(got, want, bounds, ["grad hidden", "grad weight"]):
        assert_within(g, w, bound, name)


def test_without_entropy_output():
    hidden, weight, targets = make_inputs(n=11, seed=4)
    logp, entropy = chunked_logprobs_entropy(hidden, weight, targets, 1.3, chunk_size=4, with_entropy=False)
    assert entropy is None
    logp.sum().backward()
    got = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    naive_logprobs_entropy(hidden, weight, targets, 1.3)[0].sum().backward()
    bounds = head_bounds(hidden, weight, targets, 1.3, EPS64, 2, torch.ones(11, dtype=torch.float64), None)[2:]
    for g, w, bound, name in zip(got, (hidden.grad, weight.grad), bounds, ["grad hidden", "grad weight"]):
        assert_within(g, w, bound, name)


def test_gradcheck_finite_differences(monkeypatch):
    """Independent of the analytic reference: central finite differences of both outputs."""
    monkeypatch.setattr(logprobs, "COLUMN_BLOCK", 4)
    hidden, weight, targets = make_inputs(n=9, h=5, v=13, seed=5)
    fn = lambda h, w: chunked_logprobs_entropy(h, w, targets, 0.7, chunk_size=4)  # noqa: E731
    # central differences, step h, float64: the two outputs round to a few ulps of F = their largest
    # magnitude (4 eps64 F / h after the division by 2h), and truncation h^2 |f^(3)| / 6 with each
    # logit's slope along one input <= M = max(|hidden|, |weight|) / T (log-softmax's own third
    # derivatives are <= 1): <= h^2 M^3; 2x to spare (gradcheck's defaults, atol 1e-5 / rtol 1e-3,
    # were ~500x looser)
    h = 1e-6
    F = max(float(v.detach().abs().max()) for v in fn(hidden, weight))
    M = max(float(hidden.detach().abs().max()), float(weight.detach().abs().max())) / 0.7
    assert torch.autograd.gradcheck(fn, (hidden, weight), eps=h, rtol=0, atol=2 * (4 * EPS64 * F / h + h ** 2 * M ** 3))


def test_fp32_inputs_are_accurate():
    hidden64, weight64, targets = make_inputs(n=64, h=32, v=500, seed=6)
    hidden, weight = hidden64.detach().float().requires_grad_(), (weight64.detach() * 0.3).float().requires_grad_()
    logp, entropy = chunked_logprobs_entropy(hidden, weight, targets, 0.9, chunk_size=10)
    ref_logp, ref_entropy = naive_logprobs_entropy(hidden.double(), weight.double(), targets, 0.9)
    assert logp.dtype == torch.float32
    # one float32 side against float64 on the same (float32) inputs
    b_logp, b_ent = head_bounds(hidden, weight, targets, 0.9, EPS32, sides=1)
    assert_within(logp, ref_logp, b_logp, "logp")
    assert_within(entropy, ref_entropy, b_ent, "entropy")


def test_bf16_inputs_get_fp32_logits_and_bf16_grads():
    """bf16 hidden/weight: logits must be computed in fp32 (a bf16 matmul output is off by ~1e-2)."""
    hidden64, weight64, targets = make_inputs(n=48, h=64, v=300, seed=7)
    hidden = hidden64.detach().bfloat16().requires_grad_()
    weight = (weight64.detach() * 0.5).bfloat16().requires_grad_()
    logp, entropy = chunked_logprobs_entropy(hidden, weight, targets, 1.0, chunk_size=16)
    ref_logp, ref_entropy = naive_logprobs_entropy(hidden.double(), weight.double(), targets, 1.0)
    assert logp.dtype == torch.float32
    # bf16 x bf16 products are exact in float32, so the logits round as a float32 computation's
    b_logp, b_ent = head_bounds(hidden, weight, targets, 1.0, EPS32, sides=1)
    assert_within(logp, ref_logp, b_logp, "logp")
    assert_within(entropy, ref_entropy, b_ent, "entropy")
    bf16_logits_error = (torch.log_softmax((hidden @ weight.t()).double(), -1).gather(1, targets[:, None]).squeeze(-1)
                         - ref_logp).abs()
    assert (bf16_logits_error > b_logp).any()  # the test can tell fp32 from bf16 logits (eps_bf16 = 2^16 eps32)
    logp.sum().backward()
    assert hidden.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.bfloat16
    hidden64 = hidden.detach().double().requires_grad_()
    weight64 = weight.detach().double().requires_grad_()
    naive_logprobs_entropy(hidden64, weight64, targets, 1.0)[0].sum().backward()
    # float32 gradients (head_bounds at eps32) rounded once to bf16: <= eps_bf16 / 2 of each value
    eps_bf16 = torch.finfo(torch.bfloat16).eps
    _, _, b_hidden, b_weight = head_bounds(hidden64, weight64, targets, 1.0, EPS32, 1, torch.ones(48, dtype=torch.float64))
    assert_within(weight.grad, weight64.grad, b_weight + eps_bf16 / 2 * weight64.grad.abs(), "grad weight")
    assert_within(hidden.grad, hidden64.grad, b_hidden + eps_bf16 / 2 * hidden64.grad.abs(), "grad hidden")


def test_saves_no_full_logits_for_backward():
    """What autograd keeps between forward and backward is O(N*H + V*H), never N*V."""
    hidden, weight, targets = make_inputs(n=40, h=8, v=1000, dtype=torch.float32, seed=8)
    saved = []

    def pack(tensor):
        saved.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        logp, entropy = chunked_logprobs_entropy(hidden, weight, targets, 1.0, chunk_size=8)
    assert max(saved) <= 1000 * 8 and sum(saved) <= 40 * 8 + 1000 * 8 + 3 * 40
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        saved.clear()
        naive_logprobs_entropy(hidden, weight, targets, 1.0)
    assert max(saved) >= 40 * 1000  # the reference does keep [N, V] tensors


def test_default_chunk_size_and_errors():
    assert default_chunk_size(152064) == 220 and default_chunk_size(49152) == 682
    assert default_chunk_size(10) == 4096 and default_chunk_size(10**9) == 64
    hidden, weight, targets = make_inputs(n=4, h=3, v=5)
    with pytest.raises(ValueError, match="hidden \\[N, H\\]"):
        chunked_logprobs_entropy(hidden, weight[:, :2], targets)
    with pytest.raises(ValueError, match="targets"):
        chunked_logprobs_entropy(hidden, weight, targets[:3])
    with pytest.raises(ValueError, match="temperature"):
        chunked_logprobs_entropy(hidden, weight, targets, temperature=0.0)
