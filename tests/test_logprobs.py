"""The chunked log-prob / entropy autograd function against the naive full-logits computation."""
from __future__ import annotations

import pytest
import torch

from rlengine import logprobs
from rlengine.logprobs import chunked_logprobs_entropy, default_chunk_size


def naive_logprobs_entropy(hidden, weight, targets, temperature):
    """Reference: materialise all logits, log_softmax, gather; entropy = -sum p log p."""
    logp_all = torch.log_softmax((hidden @ weight.t()) / temperature, dim=-1)  # [N, V]
    logp = logp_all.gather(1, targets[:, None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


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
    for got, want, name in zip(chunked, naive, ["logp", "entropy", "grad hidden", "grad weight"]):
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=name)


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
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_without_entropy_output():
    hidden, weight, targets = make_inputs(n=11, seed=4)
    logp, entropy = chunked_logprobs_entropy(hidden, weight, targets, 1.3, chunk_size=4, with_entropy=False)
    assert entropy is None
    logp.sum().backward()
    got = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    naive_logprobs_entropy(hidden, weight, targets, 1.3)[0].sum().backward()
    torch.testing.assert_close(got, (hidden.grad, weight.grad), rtol=1e-10, atol=1e-10)


def test_gradcheck_finite_differences(monkeypatch):
    """Independent of the analytic reference: central finite differences of both outputs."""
    monkeypatch.setattr(logprobs, "COLUMN_BLOCK", 4)
    hidden, weight, targets = make_inputs(n=9, h=5, v=13, seed=5)
    assert torch.autograd.gradcheck(
        lambda h, w: chunked_logprobs_entropy(h, w, targets, 0.7, chunk_size=4), (hidden, weight))


def test_fp32_inputs_are_accurate():
    hidden64, weight64, targets = make_inputs(n=64, h=32, v=500, seed=6)
    hidden, weight = hidden64.detach().float().requires_grad_(), (weight64.detach() * 0.3).float().requires_grad_()
    logp, entropy = chunked_logprobs_entropy(hidden, weight, targets, 0.9, chunk_size=10)
    ref_logp, ref_entropy = naive_logprobs_entropy(hidden.double(), weight.double(), targets, 0.9)
    assert logp.dtype == torch.float32
    torch.testing.assert_close(logp.double(), ref_logp, rtol=0, atol=2e-5)
    torch.testing.assert_close(entropy.double(), ref_entropy, rtol=0, atol=2e-5)


def test_bf16_inputs_get_fp32_logits_and_bf16_grads():
    """bf16 hidden/weight: logits must be computed in fp32 (a bf16 matmul output is off by ~1e-2)."""
    hidden64, weight64, targets = make_inputs(n=48, h=64, v=300, seed=7)
    hidden = hidden64.detach().bfloat16().requires_grad_()
    weight = (weight64.detach() * 0.5).bfloat16().requires_grad_()
    logp, entropy = chunked_logprobs_entropy(hidden, weight, targets, 1.0, chunk_size=16)
    ref_logp, ref_entropy = naive_logprobs_entropy(hidden.double(), weight.double(), targets, 1.0)
    assert logp.dtype == torch.float32
    torch.testing.assert_close(logp.double(), ref_logp, rtol=0, atol=1e-4)
    torch.testing.assert_close(entropy.double(), ref_entropy, rtol=0, atol=1e-4)
    bf16_logits_error = (torch.log_softmax((hidden @ weight.t()).double(), -1).gather(1, targets[:, None]).squeeze(-1)
                         - ref_logp).abs().max()
    assert bf16_logits_error > 1e-3  # the test can tell fp32 from bf16 logits
    logp.sum().backward()
    assert hidden.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.bfloat16
    hidden64 = hidden.detach().double().requires_grad_()
    weight64 = weight.detach().double().requires_grad_()
    naive_logprobs_entropy(hidden64, weight64, targets, 1.0)[0].sum().backward()
    torch.testing.assert_close(weight.grad.double(), weight64.grad, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(hidden.grad.double(), hidden64.grad, rtol=1e-2, atol=1e-2)


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
