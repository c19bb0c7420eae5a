"""Model-level log-probs through the swapped lm_head: against logits-based references."""
from __future__ import annotations

import pytest
import torch

from rlengine.logprobs import install_chunked_head, sequence_logprobs, token_logprobs
from rlengine.model import load_causal_lm, pad_left, position_ids_from_mask


def rollout_batch(prompts, responses, pad_id):
    """[left-padded prompt | right-padded response] and its mask, as a trainer builds it."""
    prompt_ids, prompt_mask = pad_left(prompts, pad_id)  # [B, P]
    width = max(len(r) for r in responses)
    response_ids = torch.full((len(responses), width), pad_id, dtype=torch.long)
    response_mask = torch.zeros((len(responses), width), dtype=torch.long)
    for row, resp in enumerate(responses):
        response_ids[row, :len(resp)] = torch.tensor(resp)
        response_mask[row, :len(resp)] = 1
    return torch.cat([prompt_ids, response_ids], 1), torch.cat([prompt_mask, response_mask], 1), prompt_ids.shape[1]


def reference_from_logits(model, prompt, response, temperature):
    """Unpadded single-sequence forward, full logits, log_softmax: (logp [T], entropy [T]) float64."""
    ids = torch.tensor([prompt + response])
    logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].double() / temperature  # [T, V]
    logp_all = torch.log_softmax(logits, -1)
    return logp_all.gather(1, ids[0, len(prompt):, None]).squeeze(1), -(logp_all.exp() * logp_all).sum(-1)


@pytest.fixture(scope="module")
def smollm(embedded_model_dir):
    return load_causal_lm(embedded_model_dir, dtype="fp32").eval()


def test_embedded_model_logprobs_match_logits_reference(smollm):
    torch.manual_seed(0)
    # pad == eos == 2 in SmolLM2; responses contain the EOS token on purpose (masks come from lengths)
    prompts = [[1, 4093, 198, 1780, 314], [1, 4093, 198, 28, 29, 30, 31, 32, 33], [1, 520]]
    responses = [[504, 3575, 2], [41, 42, 43, 44, 45, 2], [2]]
    input_ids, mask, start = rollout_batch(prompts, responses, pad_id=2)
    temperature = 0.7
    with torch.no_grad():
        logp, entropy = sequence_logprobs(smollm, input_ids, mask, start, temperature=temperature)
        assert logp.shape == entropy.shape == (3, 6)
        # padded batch, full logits (the same positions the trainer uses)
        logits = smollm(input_ids=input_ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
        batch_ref = torch.log_softmax(logits[:, start - 1:-1].double() / temperature, -1)  # [B, T, V]
        batch_ref_logp = batch_ref.gather(2, input_ids[:, start:, None]).squeeze(-1) * mask[:, start:]
        batch_ref_entropy = -(batch_ref.exp() * batch_ref).sum(-1) * mask[:, start:]
        # Same hidden states: only the head differs, so the tolerance is the fp32 rounding of the head,
        # per token. Both sides form each logit z_v = h . w_v / T as a 576-term fp32 dot product,
        # summed in different orders (chunked matmul vs HF's lm_head): each is within ~eps * S of the
        # exact value, S = max_v sum_i |h_i w_vi| / T (~300 here), so their difference within 2 eps S.
        # The fp32 log-softmax then loses a few ulps of the largest magnitudes it subtracts (|z| up
        # to ~46, |logp| up to ~28): 4 eps (|logp| + max|z|). That is 7e-5..9e-5 here; measured
        # |diff| 3e-6 on AMD AVX2 and 2.6e-5 on Intel AMX, where a fixed 2e-5 failed. Entropy
        # (sum_v p_v (-logp_v)) carries the logits' error with weights summing to ~1, hence 2x.
        hidden = smollm.model(input_ids=input_ids, attention_mask=mask,
                              position_ids=position_ids_from_mask(mask)).last_hidden_state[:, start - 1:-1]
        weight = smollm.lm_head.weight.double()
        S = (hidden.double().abs() @ weight.abs().t()).amax(-1) / temperature                 # [B, T]
        z_max = (hidden.double() @ weight.t()).abs().amax(-1) / temperature                   # [B, T]
        eps = torch.finfo(torch.float32).eps
        bound = (eps * (2 * S + 4 * (batch_ref_logp.abs() + z_max))) * mask[:, start:]
        assert ((logp.double() - batch_ref_logp).abs() <= bound).all(), ((logp.double() - batch_ref_logp).abs() / bound.clamp_min(1e-30)).max()
        assert ((entropy.double() - batch_ref_entropy).abs() <= 2 * bound + 4 * eps * batch_ref_entropy.abs()).all()
        # unpadded single sequences: padding / positions handled right. Another shape runs every
        # layer with other fp32 kernels, not just the head: each of the L layers may move the
        # residual stream by ~eps of itself, which the head turns into S times that, 2 L eps S for
        # the two sides (tests/engine_helpers.py, fp32_logprob_tol): 1.3e-3..1.8e-3 here; measured
        # 1.5e-5 on AMD AVX2, up to ~5e-4 elsewhere
        deep = 2 * smollm.config.num_hidden_layers * eps * S                                # [B, T]
        for row, (prompt, resp) in enumerate(zip(prompts, responses)):
            ref_logp, ref_entropy = reference_from_logits(smollm, prompt, resp, temperature)
            bound = deep[row, :len(resp)]
            assert ((logp[row, :len(resp)].double() - ref_logp).abs() <= bound).all()
            assert ((entropy[row, :len(resp)].double() - ref_entropy).abs() <= 2 * bound + 4 * eps * ref_entropy.abs()).all()
            assert (logp[row, len(resp):] == 0).all() and (entropy[row, len(resp):] == 0).all()


def test_normal_forward_and_generate_still_work_after_install(smollm):
    ids = torch.tensor([[1, 4093, 198, 1780, 314, 260]])
    with torch.no_grad():
        before = smollm(input_ids=ids).logits
        generated_before = smollm.generate(ids, max_new_tokens=4, do_sample=False)
        head = install_chunked_head(smollm)
        assert install_chunked_head(smollm) is head  # idempotent
        after = smollm(input_ids=ids).logits
        generated_after = smollm.generate(ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(before, after) and torch.equal(generated_before, generated_after)
    # explicit call of the head with targets
    hidden = torch.randn(5, smollm.config.hidden_size)
    targets = torch.tensor([0, 5, 9, 2, 7])
    logp, entropy = head(hidden, targets, 1.0)
    ref = torch.log_softmax((hidden @ smollm.lm_head.weight.t()).double(), -1).gather(1, targets[:, None]).squeeze(1)
    # both sides form the logits in fp32 (the reference's matmul too): the head bound of the test
    # above, 2 eps S + 4 eps (|logp| + max|z|) per row, with T = 1
    weight, eps = smollm.lm_head.weight.double(), torch.finfo(torch.float32).eps
    S = (hidden.double().abs() @ weight.abs().t()).amax(-1)
    z_max = (hidden.double() @ weight.t()).abs().amax(-1)
    assert ((logp.double() - ref).abs() <= eps * (2 * S + 4 * (ref.abs() + z_max))).all()


def test_grads_of_every_parameter_match_logits_path(tiny_llama_config):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    chunked_model = LlamaForCausalLM(tiny_llama_config).double()
    naive_model = LlamaForCausalLM(tiny_llama_config).double()
    naive_model.load_state_dict(chunked_model.state_dict())
    input_ids, mask, start = rollout_batch([[1, 5, 6, 7], [1, 9]], [[10, 11, 12, 2], [13, 2]], pad_id=2)
    weights = torch.randn(2, input_ids.shape[1] - start, dtype=torch.float64)
    temperature = 0.9

    logp, entropy = sequence_logprobs(chunked_model, input_ids, mask, start, temperature=temperature, chunk_size=3)
    ((logp * weights).sum() + 0.1 * (entropy * weights).sum()).backward()

    logits = naive_model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    logp_all = torch.log_softmax(logits[:, start - 1:-1] / temperature, -1)
    ref_logp = logp_all.gather(2, input_ids[:, start:, None]).squeeze(-1) * mask[:, start:]
    ref_entropy = -(logp_all.exp() * logp_all).sum(-1) * mask[:, start:]
    ((ref_logp * weights).sum() + 0.1 * (ref_entropy * weights).sum()).backward()

    # float64, two implementations of the same 2-layer model (the chunked head vs full logits); the
    # head bound of the first test at eps64 (tests/test_logprobs.py derives the same for gradients)
    eps64 = torch.finfo(torch.float64).eps
    with torch.no_grad():
        hidden = naive_model.model(input_ids=input_ids, attention_mask=mask,
                                   position_ids=position_ids_from_mask(mask)).last_hidden_state[:, start - 1:-1]
        w = naive_model.lm_head.weight
        S = (hidden.abs() @ w.abs().t()).amax(-1) / temperature
        z_max = (hidden @ w.t()).abs().amax(-1) / temperature
    assert ((logp - ref_logp).abs() <= eps64 * (2 * S + 4 * (ref_logp.abs() + z_max)) * mask[:, start:]).all()
    # every parameter's gradient sums over <= N = B x S_len positions and V or H terms of magnitude
    # at most the largest gradient entry's terms: a relative 2 (N + V + H) eps64 of the largest
    # |grad| of that parameter, each way (the 2 layers add a few roundings per term)
    n_acc = input_ids.numel() + tiny_llama_config.vocab_size + tiny_llama_config.intermediate_size
    naive_params = dict(naive_model.named_parameters())
    for name, param in chunked_model.named_parameters():
        want = naive_params[name].grad
        assert ((param.grad - want).abs() <= 4 * n_acc * eps64 * want.abs().max()).all(), name
    assert chunked_model.lm_head.weight is chunked_model.model.embed_tokens.weight  # tied: one grad for both uses


def test_token_logprobs_rejects_bad_masks(tiny_llama_config):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(tiny_llama_config)
    ids = torch.tensor([[1, 5, 6]])
    with pytest.raises(ValueError, match="target_mask\\[:, 0\\]"):
        token_logprobs(model, ids, torch.ones_like(ids), torch.ones_like(ids))
    with pytest.raises(ValueError, match="response_start"):
        sequence_logprobs(model, ids, torch.ones_like(ids), 0)
