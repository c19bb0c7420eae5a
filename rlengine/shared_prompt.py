"""Shared-prompt packing: each prompt of a micro-batch runs through the model once for all its responses.

A GRPO group is G responses to one prompt. The padded layout (`SeqBatch`) repeats the prompt in each of
the G rows, so a micro-batch of whole groups spends G x P prompt tokens of forward and backward where P
would do; with the papers' short answers and long system prompts the prompt is most of the tokens.
Here the sequences that share a prompt become one row,

    [ prompt (P) | response 1 (L1) | response 2 (L2) | ... ]      right-padded to the longest row,

with each response's positions restarting at P (as if it followed the prompt alone) and a block
attention mask: a response token sees the prompt and the earlier tokens of its own response, never a
sibling. The hidden state that predicts a response's first token is the prompt's last one, shared by
every sibling; the gradient of the shared prompt is then the sum over the group, the same sum the
padded layout accumulates over G copies. So every log-prob, entropy and gradient is the padded
layout's up to floating-point rounding (a different reduction order in attention), which
tests/test_shared_prompt.py bounds.

Pure tensor code; the model call is `rlengine.logprobs.scored_logprobs`. The mask is dense [R, 1, L, L],
so this is for the lengths of CPU and small-GPU jobs; attention kernels that ignore a custom 4D mask
(flash-attention) cannot run it, and `attention_mask_4d` says so.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

PROMPT, PAD = 0, -1   # segment ids: 0 the prompt, 1.. the responses, -1 padding


@dataclass
class SharedPromptPack:
    """Rows of [prompt | responses...] and where every scored token of the source batch lies in them."""

    input_ids: torch.Tensor      # [R, L]
    position_ids: torch.Tensor   # [R, L] prompt 0..P-1, each response P..P+L_j-1, padding 0
    segments: torch.Tensor       # [R, L] PROMPT, response number (1..), or PAD
    rows: torch.Tensor           # [N] flat index into [R * L] of the hidden state predicting each scored token
    targets: torch.Tensor        # [N] the token it scores
    seq_index: torch.Tensor      # [N] its sequence in the source batch (row of [B, T])
    tok_index: torch.Tensor      # [N] its response position in the source batch (column of [B, T])


def _prompt_length(resp_pos: torch.Tensor, resp_mask: torch.Tensor, i: int) -> int | None:
    """Sequence i's prompt length (its first response token's index), None when the response is empty."""
    return int(resp_pos[i, 0]) if resp_mask[i, 0] > 0 else None


def pack_shared_prompts(input_ids: torch.Tensor, resp_pos: torch.Tensor, resp_mask: torch.Tensor,
                        pad_id: int) -> SharedPromptPack:
    """Pack the sequences of a `SeqBatch` (input_ids [B, S], resp_pos [B, T], resp_mask [B, T]) that share
    identical prompt tokens into one row each, in first-appearance order. Sequences with an empty
    response have nothing to score and are left out."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i in range(input_ids.shape[0]):
        p = _prompt_length(resp_pos, resp_mask, i)
        if p is not None:
            groups.setdefault(tuple(input_ids[i, :p].tolist()), []).append(i)
    lengths = resp_mask.sum(dim=1).long()                                   # [B] response lengths
    layout = []                                                             # per row: (prompt, members)
    for prompt, members in groups.items():
        layout.append((prompt, members, len(prompt) + int(sum(int(lengths[i]) for i in members))))
    R, L = max(1, len(layout)), max([width for *_, width in layout] or [1])
    ids = torch.full((R, L), pad_id, dtype=torch.long)
    pos = torch.zeros((R, L), dtype=torch.long)
    seg = torch.full((R, L), PAD, dtype=torch.long)
    rows, seq_index, tok_index = [], [], []
    for r, (prompt, members, _) in enumerate(layout):
        P = len(prompt)
        ids[r, :P] = torch.tensor(prompt, dtype=torch.long)
        pos[r, :P] = torch.arange(P)
        seg[r, :P] = PROMPT
        at = P
        for j, i in enumerate(members, start=1):
            n = int(lengths[i])
            ids[r, at:at + n] = input_ids[i, resp_pos[i, :n]]
            pos[r, at:at + n] = torch.arange(P, P + n)
            seg[r, at:at + n] = j
            # token t of the response is predicted by the state before it: the prompt's last for t = 0
            before = torch.cat([torch.tensor([P - 1]), torch.arange(at, at + n - 1)])   # [n]
            rows.append(r * L + before)
            seq_index.append(torch.full((n,), i, dtype=torch.long))
            tok_index.append(torch.arange(n))
            at += n
    cat = (lambda xs: torch.cat(xs) if xs else torch.zeros(0, dtype=torch.long))
    seq_index, tok_index = cat(seq_index), cat(tok_index)
    targets = input_ids[seq_index, resp_pos[seq_index, tok_index]] if len(seq_index) else seq_index
    return SharedPromptPack(ids, pos, seg, cat(rows), targets, seq_index, tok_index)


def allowed_attention(segments: torch.Tensor) -> torch.Tensor:
    """[R, L] segments -> [R, 1, L, L] bool, True where query q may attend key k: causal, and the key is
    prompt or in the query's own segment (padding attends to earlier padding and the prompt only, so
    no row of the mask is empty and nothing real ever reads padding)."""
    L = segments.shape[1]
    causal = torch.ones((L, L), dtype=torch.bool).tril()                    # [L, L]
    q, k = segments[:, :, None], segments[:, None, :]                      # [R, L, 1], [R, 1, L]
    return (causal & ((k == PROMPT) | (k == q)))[:, None]                    # [R, 1, L, L]


def attention_mask_4d(segments: torch.Tensor, attn_implementation: str | None, dtype: torch.dtype) -> torch.Tensor:
    """The block mask in the form the model's attention takes a custom 4D mask: bool for SDPA (True =
    attend), additive for eager (0 or the dtype's minimum). Other kernels are refused by name."""
    allowed = allowed_attention(segments)
    impl = attn_implementation or "sdpa"
    if impl == "sdpa":
        return allowed
    if impl == "eager":
        return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    raise ValueError(f"train.share_prompt_forward: attention implementation {impl!r} does not take a custom "
                     "block mask (sdpa and eager do); set train.share_prompt_forward=false")
