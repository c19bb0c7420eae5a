"""Shared-prompt packing (rlengine/shared_prompt.py): the layouts (a row per prompt; one row with the
groups' common prefix once), the mask, the choice between them, and that a packed forward gives the
padded forward's log-probs, entropies and gradients on tiny random Llama and Qwen2 models.

The model checks run in float64 so that the comparison tests the layout, not the rounding (HF's RMSNorm
computes in float32 whatever the input: the test swaps in a float64 one, else each prompt copy's
gradient is rounded to float32 separately in one layout and their sum once in the other, 1e-7
apart). The two
layouts compute every hidden state from the same terms (a masked key contributes an exact zero to
the softmax), in a different reduction order, so they agree to a few float64 ulps of the largest
magnitude summed. With |logits| and |logp| of order 10 and ~100-term sums, 1e-10 is 10^5 times that
rounding (eps 2.2e-16) and 10^5 times smaller than any layout error (a token seeing a sibling or a
position off moves log-probs by > 1e-4 here: the mutation tests below show it).
"""
from __future__ import annotations

import pytest
import torch

from rlengine.actor import make_batch, response_logprobs
from rlengine.shared_prompt import (PAD, PROMPT, allowed_attention, attention_mask_4d, attention_pair_cost,
                                    pack_shared_prompts)

TOL64 = 1e-10
# Eager attention takes its softmax in float32 whatever the input: a score that differs in its last
# float64 bits between layouts can round to a neighbouring float32, eps32 = 1.2e-7 relative. Through
# 2 layers into logits and log-probs of order 10: 2 x 10 x eps32 = 2.4e-6 (measured: 1.1e-9), still
# 40x below the > 1e-4 a layout error moves them.
TOL_EAGER = 2 * 10 * torch.finfo(torch.float32).eps


def _batch():
    """Two groups (prompts of 5 and 3 tokens, 1 token in common), one empty response, uneven lengths: [B=6]."""
    p1, p2 = [1, 11, 12, 13, 14], [1, 21, 22]
    prompts = [p1, p1, p1, p2, p2, p2]
    responses = [[30, 31, 32], [40], [50, 51], [60, 61, 62, 63], [], [70, 2]]
    return make_batch(prompts, responses, pad_id=2), prompts, responses


def _check_scored_tokens(pack, batch, prompts, responses):
    """Every scored token is the source batch's token at that place, predicted from the state before it
    (for a first token: the last state of its own prompt, shared by the group)."""
    flat = pack.input_ids.reshape(-1)
    assert torch.equal(pack.targets, batch.targets[pack.seq_index, pack.tok_index])
    for row, i, t in zip(pack.rows.tolist(), pack.seq_index.tolist(), pack.tok_index.tolist()):
        before = prompts[i][-1] if t == 0 else responses[i][t - 1]
        assert flat[row] == before, (i, t)
        if t == 0:                                     # the prompt's last position, not just its last token
            assert pack.position_ids.reshape(-1)[row] == len(prompts[i]) - 1, i
    assert sorted(zip(pack.seq_index.tolist(), pack.tok_index.tolist())) == \
        [(i, t) for i, r in enumerate(responses) for t in range(len(r))]


def test_pack_layout_positions_segments_and_targets():
    batch, prompts, responses = _batch()
    pack = pack_shared_prompts(batch.input_ids, batch.resp_pos, batch.resp_mask, pad_id=2)
    assert pack.input_ids.tolist() == [[1, 11, 12, 13, 14, 30, 31, 32, 40, 50, 51],
                                       [1, 21, 22, 60, 61, 62, 63, 70, 2, 2, 2]]
    assert pack.position_ids.tolist() == [[0, 1, 2, 3, 4, 5, 6, 7, 5, 5, 6],
                                          [0, 1, 2, 3, 4, 5, 6, 3, 4, 0, 0]]
    assert pack.segments.tolist() == [[0, 0, 0, 0, 0, 1, 1, 1, 2, 3, 3],
                                      [0, 0, 0, 4, 4, 4, 4, 5, 5, -1, -1]]
    assert pack.parents.tolist() == [0, 0, 0, 0, 0, 0]               # every response hangs off its row's prompt
    _check_scored_tokens(pack, batch, prompts, responses)


def test_merged_layout_is_a_prefix_tree():
    """pair_cost 0 (attention free): one row, the common prefix [1] once, each prompt's rest under it
    and its responses under that, positions as each sequence alone would have them."""
    batch, prompts, responses = _batch()
    pack = pack_shared_prompts(batch.input_ids, batch.resp_pos, batch.resp_mask, pad_id=2, pair_cost=0.0)
    assert pack.input_ids.tolist() == [[1, 11, 12, 13, 14, 30, 31, 32, 40, 50, 51, 21, 22, 60, 61, 62, 63, 70, 2]]
    assert pack.position_ids.tolist() == [[0, 1, 2, 3, 4, 5, 6, 7, 5, 5, 6, 1, 2, 3, 4, 5, 6, 3, 4]]
    assert pack.segments.tolist() == [[0, 1, 1, 1, 1, 2, 2, 2, 3, 4, 4, 5, 5, 6, 6, 6, 6, 7, 7]]
    assert pack.parents.tolist() == [0, 0, 1, 1, 1, 0, 5, 5]
    _check_scored_tokens(pack, batch, prompts, responses)
    allowed = allowed_attention(pack.segments, pack.parents)[0, 0]
    sees = (lambda q: [k for k in range(q + 1) if allowed[q, k]])
    assert sees(14) == [0, 11, 12, 13, 14]          # a response of prompt 2: the prefix, its rest, itself
    assert sees(9) == [0, 1, 2, 3, 4, 9]            # a response of prompt 1: never a sibling
    assert sees(12) == [0, 11, 12]                  # prompt 2's rest never sees prompt 1's tokens


def _prefix_batch():
    """A prompt that is all of another's beginning, after it in the row: its rest is empty, so its
    answers hang off the row's prefix, whose last state is not the token before them. [B=5]"""
    p1, p2 = [1, 11, 12, 13, 14], [1, 11, 12]
    prompts = [p1, p1, p2, p2, p2]
    responses = [[30, 31], [40], [50, 51, 52], [60], [70, 71]]
    return make_batch(prompts, responses, pad_id=2), prompts, responses


def test_a_prompt_that_prefixes_another_is_scored_from_its_own_end(monkeypatch):
    batch, prompts, responses = _prefix_batch()
    pack = pack_shared_prompts(batch.input_ids, batch.resp_pos, batch.resp_mask, pad_id=2, pair_cost=0.0)
    assert pack.input_ids.shape[0] == 1
    _check_scored_tokens(pack, batch, prompts, responses)
    model = _tiny("llama", "sdpa")
    with torch.no_grad():
        padded, _ = response_logprobs(model, batch, 0.8, with_entropy=False)
        rows = _force_layout(monkeypatch, "merged")
        packed, _ = response_logprobs(model, batch, 0.8, with_entropy=False, share_prompt=True)
    assert rows == [1]
    assert (padded - packed).abs().max() < TOL64


def test_an_empty_prompt_is_refused():
    batch = make_batch([[], [], [1, 5]], [[30], [31], [32]], pad_id=2)
    with pytest.raises(ValueError, match="sequence 0 has an empty prompt"):
        pack_shared_prompts(batch.input_ids, batch.resp_pos, batch.resp_mask, pad_id=2)


def test_the_cheaper_layout_is_chosen():
    """A merged row saves the prefix's copies in the linear layers and pays attention on a longer row.
    4 groups of 4, prompts of 100 tokens with 90 in common, pair cost 0.01; cost = R L (1 + 0.01 L)
    for k groups a row:
        answers of  5: k=1 4 x 120 -> 1056, k=2 2 x 150 -> 750,  k=4 1 x 210 -> 651   (one row)
        answers of 15: k=1 4 x 160 -> 1664, k=2 2 x 230 -> 1518, k=4 1 x 370 -> 1739  (two groups a row)
        answers of 75: k=1 4 x 400 -> 8000, k=2 2 x 710 -> 11502                        (a row per prompt)"""
    def pack_for(answer_len):
        prompts = [[7] * 90 + [10 + g] * 10 for g in range(4)]
        batch = make_batch([p for p in prompts for _ in range(4)], [[50] * answer_len] * 16, pad_id=2)
        return pack_shared_prompts(batch.input_ids, batch.resp_pos, batch.resp_mask, pad_id=2, pair_cost=0.01)
    assert pack_for(5).input_ids.shape == (1, 210)
    assert pack_for(15).input_ids.shape == (2, 230)
    assert pack_for(75).input_ids.shape == (4, 400)


def test_attention_pair_cost_counts_a_llama_layer():
    """SmolLM2-135M's shapes (d 576, 9 heads of 64, 3 kv heads, ff 1536): per layer the linear layers
    take 576 x 64 x (18 + 6) + 3 x 576 x 1536 = 3,538,944 multiply-adds a token, attention 2 x 576 a pair."""
    from transformers import LlamaConfig

    smol = LlamaConfig(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536)
    assert attention_pair_cost(smol) == pytest.approx(1152 / 3_538_944)
    assert attention_pair_cost(object()) is None


def test_mask_blocks_siblings_and_padding():
    segments = torch.tensor([[PROMPT, PROMPT, 1, 1, 2, 2, PAD]])
    allowed = allowed_attention(segments)[0, 0]                              # [L, L]
    assert allowed[3].tolist() == [True, True, True, True, False, False, False]   # own response + prompt
    assert allowed[5].tolist() == [True, True, False, False, True, True, False]   # never sibling 1
    assert allowed[1].tolist() == [True, True, False, False, False, False, False]  # causal in the prompt
    assert allowed.any(dim=1).all()                                          # no empty row (no NaN)
    eager = attention_mask_4d(segments, "eager", torch.float64)
    assert torch.equal(eager == 0, allowed_attention(segments)) and eager.min() == torch.finfo(torch.float64).min
    with pytest.raises(ValueError, match="train.share_prompt_forward"):
        attention_mask_4d(segments, "flash_attention_2", torch.float32)


def _rms_norm_float64(self, hidden):
    return self.weight * hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)


def _tiny(kind: str, attn: str):
    import types

    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, pad_token_id=2)
    torch.manual_seed(0)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(tie_word_embeddings=True, **common))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(tie_word_embeddings=False, **common))
    model.config._attn_implementation = attn
    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm"):
            module.forward = types.MethodType(_rms_norm_float64, module)
    return model.double()


def _force_layout(monkeypatch, layout: str) -> list:
    """Make the actor pack a row per prompt ("prompt") or one merged row ("merged"); returns the row
    counts of the packs it built, so a test knows which layout it ran."""
    import rlengine.shared_prompt as sp

    monkeypatch.setattr(sp, "attention_pair_cost", lambda config: None if layout == "prompt" else 0.0)
    real, rows = sp.pack_shared_prompts, []

    def counting(*a, **k):
        pack = real(*a, **k)
        rows.append(pack.input_ids.shape[0])
        return pack
    monkeypatch.setattr(sp, "pack_shared_prompts", counting)
    return rows


@pytest.mark.parametrize("layout", ["prompt", "merged"])
@pytest.mark.parametrize("kind,attn", [("llama", "sdpa"), ("llama", "eager"), ("qwen2", "sdpa")])
def test_packed_forward_equals_padded(monkeypatch, kind, attn, layout):
    model = _tiny(kind, attn)
    batch, *_ = _batch()
    rows = _force_layout(monkeypatch, layout)
    weights = torch.randn(batch.resp_mask.shape, dtype=torch.float64)        # [B, T] an arbitrary loss

    def run(share: bool):
        model.zero_grad()
        logp, ent = response_logprobs(model, batch, 0.8, with_entropy=True, share_prompt=share)
        (-(logp * weights).sum() - 0.1 * (ent * weights).sum()).backward()
        return logp.detach(), ent.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    logp0, ent0, grads0 = run(False)
    logp1, ent1, grads1 = run(True)
    assert rows == [{"prompt": 2, "merged": 1}[layout]]
    tol = TOL_EAGER if attn == "eager" else TOL64
    assert (logp0 - logp1).abs().max() < tol
    assert (ent0 - ent1).abs().max() < tol
    assert logp0.abs().max() > 1                                             # the comparison is not of zeros
    if attn == "eager":   # eager attention takes its softmax in float32: its gradients carry fp32 rounding
        return
    for name, g in grads0.items():
        assert (g - grads1[name]).abs().max() < TOL64 * max(1.0, g.abs().max().item()), name
    assert (logp1 * (1 - batch.resp_mask)).abs().max() == 0                   # padding stays zero


@pytest.mark.parametrize("layout,mutation", [("prompt", "sibling_visible"), ("prompt", "positions_continue"),
                                             ("merged", "sibling_visible"), ("merged", "positions_continue"),
                                             ("merged", "tree_ignored")])
def test_layout_errors_are_visible(monkeypatch, layout, mutation):
    """The guards above can fail: a mask that lets a response see its siblings (and, merged, the other
    prompt), positions that run on through the row, or a merged mask that forgets the tree (a response
    no longer sees its own prompt's rest) move the log-probs far beyond TOL64."""
    import rlengine.shared_prompt as sp

    model = _tiny("llama", "sdpa")
    batch, *_ = _batch()
    with torch.no_grad():
        padded, _ = response_logprobs(model, batch, 0.8, with_entropy=False)
        _force_layout(monkeypatch, layout)
        if mutation == "sibling_visible":
            monkeypatch.setattr(sp, "allowed_attention", lambda seg, parents=None: torch.ones(
                (seg.shape[0], 1, seg.shape[1], seg.shape[1]), dtype=torch.bool).tril())
        elif mutation == "tree_ignored":
            flat = sp.allowed_attention
            monkeypatch.setattr(sp, "allowed_attention", lambda seg, parents=None: flat(seg))
        else:
            real = sp.pack_shared_prompts

            def running_positions(*a, **k):
                pack = real(*a, **k)
                pack.position_ids = torch.arange(pack.position_ids.shape[1]).expand_as(pack.position_ids).clone()
                return pack
            monkeypatch.setattr(sp, "pack_shared_prompts", running_positions)
        packed, _ = response_logprobs(model, batch, 0.8, with_entropy=False, share_prompt=True)
    assert (padded - packed).abs().max() > 1e-6
