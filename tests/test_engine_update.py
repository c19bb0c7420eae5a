"""The update is right: one optimizer step of the real engine (2 ranks, DeepSpeed ZeRO-3, gradient
accumulation over 2 micro-batches, fp32) on a fixed batch gives the gradient of the objective written out here, in
plain single-process PyTorch, independently of rlengine's loss code:

    L = agg_t( -min(r_t A_t, clip(r_t, 1 - 0.2, 1 + 0.2) A_t) )       GRPO, r_t = pi_theta / pi_old
      + 0.1 * agg_t( exp(ref_t - logp_t) - (ref_t - logp_t) - 1 )   k3 KL to a reference model
      - 0.01 * agg_t( entropy_t )                                     entropy bonus

over all 8 sequences of both ranks, agg = token-mean or seq-mean-token-mean, at temperature 0.8.
The gradient is compared (not the weights after AdamW, whose first step is ~lr * sign(g) and would
hide a scale error). The tiny random Llama and its reference are written by the test; the engine
runs through tests/hooks/one_update.py under the deepspeed launcher.
"""
from __future__ import annotations

import math

import pytest
import torch

from tests.engine_helpers import run_training

TEMPERATURE, EPS, KL_COEF, ENTROPY_COEF = 0.8, 0.2, 0.1, 0.01
PROMPT_LENS = [3, 3, 4, 4, 6, 6, 5, 5]            # groups of 2 share a prompt (train.share_prompt_forward packs them)
SYSTEM = [5, 6]                                   # and every prompt starts with these (packed once, merged layout)
RESPONSE_LENS = [5, 2, 7, 1, 6, 6, 3, 4]          # ragged: padding inside every micro-batch
VOCAB, HIDDEN, LAYERS = 96, 32, 2


def _write_model(path, seed: int, config):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(path)


def _batch(model) -> dict:
    g = torch.Generator().manual_seed(7)
    B, S, T = len(PROMPT_LENS), max(p + r for p, r in zip(PROMPT_LENS, RESPONSE_LENS)), max(RESPONSE_LENS)
    data = {"input_ids": torch.full((B, S), 2), "attention_mask": torch.zeros(B, S, dtype=torch.long),
            "resp_pos": torch.zeros(B, T, dtype=torch.long), "resp_mask": torch.zeros(B, T),
            "targets": torch.full((B, T), 2)}
    prompts = [torch.cat([torch.tensor(SYSTEM), torch.randint(7, VOCAB, (p - len(SYSTEM),), generator=g)])
               for p in PROMPT_LENS[::2]]
    for i, (p, r) in enumerate(zip(PROMPT_LENS, RESPONSE_LENS)):
        ids = torch.cat([prompts[i // 2], torch.randint(3, VOCAB, (r,), generator=g)])
        data["input_ids"][i, :p + r] = ids
        data["attention_mask"][i, :p + r] = 1
        data["resp_pos"][i, :r] = torch.arange(p, p + r)
        data["resp_mask"][i, :r] = 1.0
        data["targets"][i, :r] = ids[p:]
    with torch.no_grad():
        logp, _ = _logp_entropy(model, data)
    # pi_old away from pi_theta, so ratios leave 1 and both clip sides act (|log r| <= 0.9 < log 3: no dual clip)
    data["old_logp"] = (logp + 0.3 * torch.randn(logp.shape, generator=g).clamp(-3, 3)) * data["resp_mask"]
    data["advantages"] = torch.randn(B, generator=g)
    return data


def _logp_entropy(model, data):
    """log pi(target) and the entropy of pi = softmax(logits / T) at every response token, [B, T]."""
    logits = model(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits / TEMPERATURE
    rows = torch.arange(logits.shape[0]).unsqueeze(1)
    at = logits[rows, (data["resp_pos"] - 1).clamp(min=0)]                    # [B, T, V] predicting each token
    logp_all = torch.log_softmax(at, -1)
    logp = logp_all.gather(-1, data["targets"].unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    mask = data["resp_mask"]
    return logp * mask, entropy * mask


def _agg(values, mask, agg):
    if agg == "token-mean":
        return (values * mask).sum() / mask.sum()
    per_seq = (values * mask).sum(1) / mask.sum(1)
    return per_seq.mean()


def _reference(actor_dir, ref_dir, data, agg, dtype):
    """The loss and gradient in fp32, from the weights as the engine holds them (rounded to `dtype`)."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(actor_dir, dtype=dtype).float()
    ref = LlamaForCausalLM.from_pretrained(ref_dir, dtype=dtype).float()
    mask = data["resp_mask"]
    logp, entropy = _logp_entropy(model, data)
    with torch.no_grad():
        ref_logp, _ = _logp_entropy(ref, data)
    ratio = torch.exp(logp - data["old_logp"])
    adv = data["advantages"].unsqueeze(1)
    surrogate = -torch.minimum(ratio * adv, ratio.clamp(1 - EPS, 1 + EPS) * adv)
    d = ref_logp - logp
    loss = (_agg(surrogate, mask, agg) + KL_COEF * _agg(torch.exp(d) - d - 1, mask, agg)
            - ENTROPY_COEF * _agg(entropy, mask, agg))
    loss.backward()
    return float(loss.detach()), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _tolerance(dtype) -> float:
    """Relative to a tensor's gradient norm. fp32: each gradient entry is reached through dot
    products over the vocabulary (96), the hidden size (32) and the batch's 34 response tokens, once
    per layer and direction (2 layers + head, forward and backward: 6 passes); the engine sums in
    another order (chunked head, ZeRO partitions, 2 ranks x 2 micro-batches). A K-term sum rounds
    by at most K eps relative: eps32 * (96 + 32 + 34) * 6 = 1.2e-4 (measured: 4e-7), 80x below the
    1% scale error this test must catch. bf16 (products accumulated in fp32): what differs from the fp32 reference
    on the same rounded weights is each pass rounding its inputs and outputs to bf16, 2 * eps_bf16/2
    relative per pass (eps_bf16 = 2^-7), compounding over the 6 passes and the 2 ranks' partial sums:
    12 eps_bf16 = 9.4e-2 (measured: 9e-3). That guards the bf16 path against a wrong scale or term (not a 1% drift: fp32 does)."""
    passes = 2 * (LAYERS + 1)
    if dtype == torch.float32:
        return torch.finfo(torch.float32).eps * (VOCAB + HIDDEN + sum(RESPONSE_LENS)) * passes
    return torch.finfo(torch.bfloat16).eps * passes * 2


@pytest.mark.parametrize("agg,dtype,share,micro", [
    ("token-mean", "fp32", False, 2), ("seq-mean-token-mean", "fp32", False, 2), ("token-mean", "bf16", False, 2),
    ("token-mean", "fp32", True, 2), ("token-mean", "fp32", True, 4)])
def test_one_engine_step_has_the_gradient_of_the_objective(tmp_path, tiny_llama_config, agg, dtype, share, micro):
    """bf16 runs on every CPU (torch emulates it where it is not native, slowly but with the same
    rounding); on AVX512-BF16 / AMX machines and GPUs it exercises the native kernels. `share`: each
    group's prompt runs once for both responses (rlengine/shared_prompt.py), policy and reference; with
    micro-batches of 2 a row per prompt, with 4 (one micro-batch of 2 groups a rank) one row holding
    both groups with their common prefix once."""
    from transformers import LlamaForCausalLM

    from rlengine.actor import SeqBatch
    from rlengine.shared_prompt import attention_pair_cost, pack_shared_prompts

    actor_dir, ref_dir, out = tmp_path / "actor", tmp_path / "ref", tmp_path / "run"
    out.mkdir()
    _write_model(actor_dir, 0, tiny_llama_config)
    _write_model(ref_dir, 1, tiny_llama_config)
    data = _batch(LlamaForCausalLM.from_pretrained(actor_dir, dtype=torch.float32))
    torch.save(data, out / "batch.pt")
    if share:   # the layout the engine will choose for each rank's micro-batches, by the same rule
        for rank_rows in (slice(0, 4), slice(4, 8)):
            for part in torch.arange(8)[rank_rows].split(micro):
                seqs = SeqBatch(*(data[k][part] for k in ("input_ids", "attention_mask", "resp_pos", "resp_mask",
                                                          "targets")))
                pack = pack_shared_prompts(seqs.input_ids, seqs.resp_pos, seqs.resp_mask, 0,
                                           attention_pair_cost(tiny_llama_config))
                assert pack.input_ids.shape[0] == 1 and (pack.parents.numel() > 1 + micro) == (micro == 4)
    r = run_training(tmp_path, 2, [
        f"model.path={actor_dir}", f"model.ref_path={ref_dir}", f"model.dtype={dtype}", f"run.output_dir={out}",
        "rollout.prompts_per_step=4", "rollout.group_size=2", f"rollout.temperature={TEMPERATURE}",
        f"rollout.max_new_tokens={max(RESPONSE_LENS)}", f"train.micro_batch_size={micro}",   # 4 sequences a rank
        f"train.kl_coef={KL_COEF}", f"train.entropy_coef={ENTROPY_COEF}", "loss.name=grpo", f"loss.agg={agg}",
        f"loss.eps_low={EPS}", f"loss.eps_high={EPS}", f"train.share_prompt_forward={share}"],
        script="tests/hooks/one_update.py", timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    engine = torch.load(out / "grads.pt", weights_only=True)
    assert float(engine.pop("__micro_batches__")) == 4 // micro  # gradient accumulation over the micro-batches
    engine_loss = float(engine.pop("__loss__"))
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    want_loss, want = _reference(actor_dir, ref_dir, data, agg, torch_dtype)
    tol = _tolerance(torch_dtype)
    assert dtype == "bf16" or tol < 0.01 / 10
    assert set(engine) == set(want)
    total = math.sqrt(sum(float(g.norm()) ** 2 for g in want.values()))
    for name, g in want.items():
        err = float((engine[name].float() - g).norm())
        assert err <= tol * max(float(g.norm()), 1e-3 * total), (name, err, float(g.norm()))
    assert abs(engine_loss - want_loss) <= tol * max(abs(want_loss), 1.0), (engine_loss, want_loss)
