"""The HF `generate` sampler on the real embedded SmolLM2 (short generations, fp32).

Measured agreement of the sampler's log-probs (recorded during incremental, KV-cached, left-padded
decoding) with a fresh full forward (`score`, a manual forward): max |diff| ~1.5e-5 in fp32. The
bound is the rounding of two different fp32 forwards of a 30-layer model, 2 L eps32 S / T
(tests/engine_helpers.py, fp32_logprob_tol: 1.3e-3 at T = 1, 1.8e-3 at T = 0.7), far below the
~0.1-1 differences between distinct tokens' log-probs. With top_p < 1 the sampler reports
the log-probs of the renormalised nucleus instead: tests/test_sampling_logprobs.py.
"""
from __future__ import annotations

import pytest
import torch

from rlengine.rollout import SamplingParams, build_sampler
from rlengine.rollout.hf_sampler import HFSampler
from tests.engine_helpers import fp32_logprob_tol

QUESTIONS = ["What is the capital of France?", "12+7?", "Name a colour."]


@pytest.fixture(scope="module")
def sampler(embedded_model_dir):
    return build_sampler("hf", embedded_model_dir, dtype="fp32", batch_size=4)


@pytest.fixture(scope="module")
def prompts(sampler):
    tok = sampler.tokenizer
    return [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
            for q in QUESTIONS]


@pytest.fixture(scope="module")
def prompt_ids(sampler, prompts):
    ids = [sampler.tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
    assert len({len(p) for p in ids}) > 1  # different lengths: left padding is exercised
    return ids


def manual_greedy(model, prompt, steps):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def manual_logprobs(model, prompt, response, temperature):
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].double()
    return torch.log_softmax(logits / temperature, -1).gather(1, ids[0, len(prompt):, None]).squeeze(1)


def test_greedy_is_deterministic_and_equals_argmax_loop(sampler, prompt_ids):
    params = SamplingParams(greedy=True, max_new_tokens=6)
    first = sampler.generate(prompt_ids, 1, params)
    second = sampler.generate(prompt_ids, 1, params)
    assert first.response_ids == second.response_ids
    for row, prompt in enumerate(prompt_ids):
        expected = manual_greedy(sampler.model, prompt, 6)
        got = first.response_ids[row]
        assert got == expected[:len(got)]
        assert len(got) == 6 or got[-1] == sampler.tokenizer.eos_token_id


def test_sampled_logprobs_match_score_and_manual_forward(sampler, prompt_ids):
    temperature = 0.7
    gen = sampler.generate(prompt_ids, 2, SamplingParams(temperature=temperature, max_new_tokens=10, seed=3))
    assert len(gen) == 6
    for prompt, response, logprobs in zip(gen.prompt_ids, gen.response_ids, gen.response_logprobs):
        assert len(response) == len(logprobs) > 0
        scored = torch.tensor(sampler.score(prompt, response, temperature), dtype=torch.float64)
        manual = manual_logprobs(sampler.model, prompt, response, temperature)
        got = torch.tensor(logprobs, dtype=torch.float64)
        assert (got - scored).abs().max() < fp32_logprob_tol(temperature)
        assert (got - manual).abs().max() < fp32_logprob_tol(temperature)
        assert (got <= 0).all()
    # under a different temperature the numbers differ: the temperature really is applied (by
    # O(0.1-1); 5x the agreement bound cannot be rounding)
    p0, r0 = gen.prompt_ids[0], gen.response_ids[0]
    assert (torch.tensor(sampler.score(p0, r0, 1.0)) - torch.tensor(gen.response_logprobs[0])).abs().max() > \
        5 * fp32_logprob_tol(temperature)


def test_samples_are_grouped_by_prompt_and_seeded(sampler, prompt_ids):
    params = SamplingParams(temperature=1.0, max_new_tokens=5, seed=11)
    gen = sampler.generate(prompt_ids[:2], 3, params)
    assert gen.prompt_index == [0, 0, 0, 1, 1, 1]  # batch_size 4: prompt 1's group spans two batches
    assert gen.prompt_ids == [prompt_ids[i] for i in gen.prompt_index]
    assert len(gen.texts) == len(gen.finish_reasons) == len(gen.response_logprobs) == 6
    assert set(gen.finish_reasons) <= {"stop", "length"}
    again = sampler.generate(prompt_ids[:2], 3, params)
    assert again.response_ids == gen.response_ids and again.response_logprobs == gen.response_logprobs
    other = sampler.generate(prompt_ids[:2], 3, SamplingParams(temperature=1.0, max_new_tokens=5, seed=12))
    assert other.response_ids != gen.response_ids


def test_eos_ends_a_row_and_padding_is_removed(sampler, prompt_ids):
    # "capital of France" ends quickly with <|im_end|>; in the same batch "12+7?" runs on, so the
    # first row gets pad (== EOS) tokens after its end that must not show up in its response.
    gen = sampler.generate(prompt_ids[:2], 1, SamplingParams(greedy=True, max_new_tokens=16))
    eos = sampler.tokenizer.eos_token_id
    lengths = [len(r) for r in gen.response_ids]
    assert gen.finish_reasons[0] == "stop" and gen.response_ids[0][-1] == eos
    assert gen.response_ids[0].count(eos) == 1 and lengths[0] < max(lengths)
    assert "Paris" in gen.texts[0] and "<|im_end|>" not in gen.texts[0]
    assert len(gen.response_logprobs[0]) == lengths[0]
    for response, reason in zip(gen.response_ids, gen.finish_reasons):
        assert (reason == "length") == (len(response) == 16 and response[-1] != eos)


def test_stop_strings_cut_at_the_first_match(sampler, prompt_ids):
    free = sampler.generate(prompt_ids, 1, SamplingParams(greedy=True, max_new_tokens=16))
    tok = sampler.tokenizer
    for row in range(len(prompt_ids)):
        full = free.response_ids[row]
        stop = tok.decode(full[3:4]).strip() or tok.decode(full[3:4])  # a string the response contains
        cut = sampler.generate([prompt_ids[row]], 1, SamplingParams(greedy=True, max_new_tokens=16, stop=[stop]))
        # expected: the shortest prefix of the free response whose text contains the stop string
        k = next(k for k in range(1, len(full) + 1) if stop in tok.decode(full[:k]))
        assert cut.response_ids[0] == full[:k], (stop, tok.decode(full))
        assert cut.finish_reasons[0] == "stop"
        assert cut.texts[0].endswith(stop) and cut.texts[0].count(stop) == 1
        assert len(cut.response_logprobs[0]) == k


def test_load_weights_changes_output_and_restores_exactly(sampler, prompt_ids):
    params = SamplingParams(greedy=True, max_new_tokens=8)
    before = sampler.generate(prompt_ids, 1, params)
    originals = {name: t.detach().clone() for name, t in sampler.model.state_dict().items()
                 if name in ("model.norm.weight", "lm_head.weight")}
    gen = torch.Generator().manual_seed(0)
    perturbed = originals["lm_head.weight"] + 0.05 * torch.randn(originals["lm_head.weight"].shape, generator=gen)
    # lm_head.weight is tied to the embedding: loading it by that name changes the embedding too
    report = sampler.load_weights([("lm_head.weight", perturbed)])
    assert report.names == ["lm_head.weight"]
    # the digest is read back from the model: the tied embedding now holds the pushed tensor
    from rlengine.weight_sync import weights_digest

    assert report.digest == weights_digest([("lm_head.weight", perturbed)])
    assert "model.norm.weight" in report.unmatched and "model.embed_tokens.weight" not in report.unmatched
    assert torch.equal(sampler.model.model.embed_tokens.weight, perturbed)
    changed = sampler.generate(prompt_ids, 1, params)
    assert changed.response_ids != before.response_ids
    loaded = sampler.load_weights(iter(originals.items()))
    assert sorted(loaded.names) == sorted(originals)
    after = sampler.generate(prompt_ids, 1, params)
    assert after.response_ids == before.response_ids and after.response_logprobs == before.response_logprobs


def test_load_weights_rejects_unknown_names_and_shapes(sampler):
    with pytest.raises(ValueError, match="model.layers.99.mlp.up_proj.weight"):
        sampler.load_weights([("model.layers.99.mlp.up_proj.weight", torch.zeros(3))])
    with pytest.raises(ValueError, match=r"'model.norm.weight' has shape \(5,\)"):
        sampler.load_weights([("model.norm.weight", torch.zeros(5))])


def test_bad_arguments(sampler, prompt_ids):
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        sampler.generate([prompt_ids[0], []], 1, SamplingParams())
    with pytest.raises(ValueError, match="n must be"):
        sampler.generate(prompt_ids, 0, SamplingParams())
    with pytest.raises(ValueError, match="unknown"):
        build_sampler("nope", "embedded")
    assert isinstance(sampler, HFSampler) and sampler.score(prompt_ids[0], []) == []
