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

The groups of a micro-batch usually share more: the system prompt and chat template (175 of ~207
tokens in the bundled job). One row can then hold every group, the common prefix once,

    [ prefix (P0) | rest of prompt 1 | its responses... | rest of prompt 2 | its responses... ]

as a tree: a segment sees its ancestors and itself (a response: its prompt's rest and the prefix).
That removes tokens from every linear layer but lengthens the row, and attention grows with the
square of a row's length (a dense mask: the masked pairs are computed too). `pack_shared_prompts`
puts k groups in a row for the k of fewest multiply-adds (`attention_pair_cost`): all of them for
short answers, one (the row per prompt) for long ones.

Pure tensor code; the model call is `rlengine.logprobs.scored_logprobs`. The mask is dense [R, 1, L, L],
so this is for the lengths of CPU and small-GPU jobs; attention kernels that ignore a custom 4D mask
(flash-attention) cannot run it, and `attention_mask_4d` says so.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

PROMPT, PAD = 0, -1   # segment ids: 0 a row's shared prefix (the prompt of a one-group row), -1 padding


@dataclass
class SharedPromptPack:
    """Rows of [prefix | prompt rests and responses...] and where every scored token of the source batch lies in them."""

    input_ids: torch.Tensor      # [R, L]
    position_ids: torch.Tensor   # [R, L] as each sequence alone would have them: 0..P-1, then P..P+L_j-1; padding 0
    segments: torch.Tensor       # [R, L] PROMPT, a prompt rest or response (1.., unique in the pack), or PAD
    rows: torch.Tensor           # [N] flat index into [R * L] of the hidden state predicting each scored token
    targets: torch.Tensor        # [N] the token it scores
    seq_index: torch.Tensor      # [N] its sequence in the source batch (row of [B, T])
    tok_index: torch.Tensor      # [N] its response position in the source batch (column of [B, T])
    parents: torch.Tensor        # [S] each segment's parent (PROMPT is its own)


def _prompt_length(resp_pos: torch.Tensor, resp_mask: torch.Tensor, i: int) -> int | None:
    """Sequence i's prompt length (its first response token's index), None when the response is empty."""
    if resp_mask[i, 0] <= 0:
        return None
    if int(resp_pos[i, 0]) < 1:
        raise ValueError(f"sequence {i} has an empty prompt: no state predicts its first response token")
    return int(resp_pos[i, 0])


def _common_prefix(prompts: list[tuple[int, ...]]) -> int:
    first = prompts[0]
    n = min(len(p) for p in prompts)
    for other in prompts[1:]:
        n = next((k for k in range(n) if other[k] != first[k]), n)
    return n


def attention_pair_cost(config) -> float | None:
    """Multiply-adds of one (query, key) pair of attention relative to one token through the linear
    layers, per layer, of a Llama-style decoder (q, k, v, o and a gated MLP): 2 x heads x head_dim
    (scores and values) over d (q + 2 kv + o) + 3 d ff. SmolLM2-135M: 3.3e-4, so a row of 1,000 tokens
    spends a third as much on attention as on its linear layers. None when the config lacks a size."""
    try:
        d, heads, ff = config.hidden_size, config.num_attention_heads, config.intermediate_size
        kv = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or d // heads
    except AttributeError:
        return None
    if not all(isinstance(v, int) and v > 0 for v in (d, heads, ff, kv, head_dim)):
        return None
    linear = d * head_dim * (2 * heads + 2 * kv) + 3 * d * ff
    return 2 * heads * head_dim / linear


def _layout_cost(widths: list[int], pair_cost: float) -> float:
    """A layout's multiply-adds in token units: R rows padded to the longest, R L tokens through the
    linear layers and R L^2 attention pairs."""
    R, L = len(widths), max(widths)
    return R * L * (1.0 + pair_cost * L)


def pack_shared_prompts(input_ids: torch.Tensor, resp_pos: torch.Tensor, resp_mask: torch.Tensor,
                        pad_id: int, pair_cost: float | None = None) -> SharedPromptPack:
    """Pack the sequences of a `SeqBatch` (input_ids [B, S], resp_pos [B, T], resp_mask [B, T]) that share
    identical prompt tokens into one row each, in first-appearance order; with `pair_cost`
    (`attention_pair_cost`) k consecutive groups into a row with their common prefix once, for the
    k of fewest estimated multiply-adds (k = 1 is the row per prompt). Sequences with an empty
    response have nothing to score and are left out."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i in range(input_ids.shape[0]):
        p = _prompt_length(resp_pos, resp_mask, i)
        if p is not None:
            groups.setdefault(tuple(input_ids[i, :p].tolist()), []).append(i)
    lengths = resp_mask.sum(dim=1).long()                                   # [B] response lengths
    answers = {prompt: sum(int(lengths[i]) for i in members) for prompt, members in groups.items()}

    def width(row: list[tuple[int, ...]]) -> int:
        shared = _common_prefix(row)
        return shared + sum(len(p) - shared + answers[p] for p in row)

    prompts = list(groups)
    layout = [[prompt] for prompt in prompts]                               # per row: its prompts
    if pair_cost is not None and len(prompts) > 1:      # k consecutive groups a row, the cheapest k
        candidates = [[prompts[i:i + k] for i in range(0, len(prompts), k)] for k in range(1, len(prompts) + 1)]
        layout = min(candidates, key=lambda rows: _layout_cost([width(row) for row in rows], pair_cost))
    R, L = max(1, len(layout)), max([width(row) for row in layout] or [1])
    ids = torch.full((R, L), pad_id, dtype=torch.long)
    pos = torch.zeros((R, L), dtype=torch.long)
    seg = torch.full((R, L), PAD, dtype=torch.long)
    parents = [PROMPT]
    rows, seq_index, tok_index = [], [], []
    for r, row in enumerate(layout):
        P0 = _common_prefix(row)
        ids[r, :P0] = torch.tensor(row[0][:P0], dtype=torch.long)
        pos[r, :P0] = torch.arange(P0)
        seg[r, :P0] = PROMPT
        at = P0
        for prompt in row:
            P, rest = len(prompt), len(prompt) - P0
            parent = PROMPT
            if rest:                         # this prompt's own tokens after the row's prefix
                parent = len(parents)
                parents.append(PROMPT)
                ids[r, at:at + rest] = torch.tensor(prompt[P0:], dtype=torch.long)
                pos[r, at:at + rest] = torch.arange(P0, P)
                seg[r, at:at + rest] = parent
            # the prompt's last state predicts every first response token: its rest's last, or (a prompt
            # that is the row's whole prefix, possibly after longer ones) the prefix's last
            last = r * L + (at + rest - 1 if rest else P0 - 1)
            at += rest
            for i in groups[prompt]:
                n, s = int(lengths[i]), len(parents)
                parents.append(parent)
                ids[r, at:at + n] = input_ids[i, resp_pos[i, :n]]
                pos[r, at:at + n] = torch.arange(P, P + n)
                seg[r, at:at + n] = s
                rows.append(torch.cat([torch.tensor([last]), r * L + torch.arange(at, at + n - 1)]))   # [n]
                seq_index.append(torch.full((n,), i, dtype=torch.long))
                tok_index.append(torch.arange(n))
                at += n
    cat = (lambda xs: torch.cat(xs) if xs else torch.zeros(0, dtype=torch.long))
    seq_index, tok_index = cat(seq_index), cat(tok_index)
    targets = input_ids[seq_index, resp_pos[seq_index, tok_index]] if len(seq_index) else seq_index
    return SharedPromptPack(ids, pos, seg, cat(rows), targets, seq_index, tok_index,
                            torch.tensor(parents, dtype=torch.long))


def _ancestors(parents: torch.Tensor) -> torch.Tensor:
    """[S] parents -> [S + 1, S + 1] bool, [s, t] True where t is s or an ancestor of s; the last
    index stands for PAD, whose only ancestor is PROMPT."""
    S = parents.shape[0]
    anc = torch.zeros((S + 1, S + 1), dtype=torch.bool)
    node = torch.arange(S)
    for _ in range(S):                       # a tree of depth < S: walk every segment up to the root
        anc[torch.arange(S), node] = True
        if torch.equal(parents[node], node):
            break
        node = parents[node]
    anc[S, S] = anc[S, PROMPT] = True
    return anc


def allowed_attention(segments: torch.Tensor, parents: torch.Tensor | None = None) -> torch.Tensor:
    """[R, L] segments -> [R, 1, L, L] bool, True where query q may attend key k: causal, and the key's
    segment is the query's or one of its ancestors (`parents`; None: every segment hangs off PROMPT).
    Padding attends to earlier padding and the prefix only, so no row of the mask is empty and nothing
    real ever reads padding."""
    L = segments.shape[1]
    if parents is None:
        parents = torch.zeros(int(segments.max().clamp(min=0)) + 1, dtype=torch.long)
    anc = _ancestors(parents)
    index = torch.where(segments == PAD, parents.shape[0], segments)        # [R, L] PAD -> the last index
    causal = torch.ones((L, L), dtype=torch.bool).tril()                    # [L, L]
    return (causal & anc[index[:, :, None], index[:, None, :]])[:, None]     # [R, 1, L, L]


def attention_mask_4d(segments: torch.Tensor, attn_implementation: str | None, dtype: torch.dtype,
                      parents: torch.Tensor | None = None) -> torch.Tensor:
    """The block mask in the form the model's attention takes a custom 4D mask: bool for SDPA (True =
    attend), additive for eager (0 or the dtype's minimum). Other kernels are refused by name."""
    allowed = allowed_attention(segments, parents)
    impl = attn_implementation or "sdpa"
    if impl == "sdpa":
        return allowed
    if impl == "eager":
        return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    raise ValueError(f"train.share_prompt_forward: attention implementation {impl!r} does not take a custom "
                     "block mask (sdpa and eager do); set train.share_prompt_forward=false")
