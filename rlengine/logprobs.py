"""Memory-lean per-token log-probs and entropy of sampled tokens (the trainer's hot path).

The pure part is `chunked_logprobs_entropy(hidden [N, H], weight [V, H], targets [N], temperature)`:
a custom autograd function that computes `log_softmax(hidden @ weight.T / T)` chunk by chunk over
tokens and never materialises the full [N, V] fp32 logits. It keeps only `hidden`, `weight`, the
targets and two fp32 numbers per token (logsumexp and entropy) for backward, where each chunk's logits
are recomputed to produce the gradients of `hidden` and `weight` (for the log-prob *and* the entropy
output, so an entropy bonus in the loss is differentiated exactly). Logits are always fp32: bf16
inputs are upcast (the hidden rows per chunk, the head weight once per call). Temperature is applied
as samplers do, `log_softmax(logits / T)`.

Peak extra memory is one [chunk, V] fp32 buffer and a [chunk, 8192] scratch block (plus an fp32
copy of the weight and its fp32 gradient accumulator when the weight is bf16) instead of several
[N, V] tensors; the price is one more [N, H] x [H, V] matmul (the recomputation), which the
cheaper, buffer-reusing elementwise work pays back (tools/bench_logprobs.py measures both).

Model level (`sequence_logprobs`, `token_logprobs`), and why the head is swapped *inside* the module:
the trainer runs DeepSpeed ZeRO-3, where every parameter is partitioned across ranks and gathered only
by hooks around the forward of the module that owns it. The LM head weight (tied to the input
embedding in SmolLM2) therefore exists in full only while `lm_head` itself is being called, and its
gradient is reduce-scattered by hooks on that parameter. So instead of reading `model.lm_head.weight`
from outside, `install_chunked_head(model)` replaces the forward of that one `lm_head` *instance*:
  * called normally, `lm_head(hidden)`, it still returns ordinary logits, so `model(...)`,
    `model.generate(...)` and HF losses keep working;
  * called as `lm_head(hidden_rows [N, H], targets [N], temperature)`, it returns `(logp, entropy)`
    from the chunked function using `self.weight`;
  * while a `token_logprobs` call is in flight, a request attached to the head makes the ordinary
    call inside the model's own forward return `(logp, entropy)` for the requested positions (in the
    output's `logits` field) instead of logits.
`token_logprobs` runs the *top-level* `model(...)` (an HF model or a DeepSpeed engine): ZeRO-3's
bookkeeping hooks on the root module (step reset, prefetch trace) fire as in any forward, the
pre-forward hook of `lm_head` gathers the weight, and the pre-backward hooks it puts on the head's
outputs re-gather it before our backward recomputes the chunks. Those hooks *replace* the head's
outputs with wrapped tensors, so the results are taken from what the model returns (its `logits`
field), never from the head's unwrapped tensors (tests/test_logprobs_zero3.py fails that way). The swap changes only that module
instance (the trainer's model, never the sampler's: they are separate objects).
"""
from __future__ import annotations

import types
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from rlengine.model import position_ids_from_mask

# Default budget of the [chunk, V] fp32 logits buffer. tools/bench_logprobs.py (V = 152k, H = 896,
# 2048 tokens, 1 CPU thread): chunks of 220 / 441 / 1024 tokens all run at the same speed (within 2%),
# so the smaller budget wins on memory.
CHUNK_BYTES = 128 * 1024 * 1024
MIN_CHUNK, MAX_CHUNK = 64, 4096
COLUMN_BLOCK = 8192  # vocabulary columns per elementwise block (the scratch buffer is [chunk, 8192])


def default_chunk_size(vocab_size: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Tokens per chunk so that one [chunk, V] fp32 buffer stays within `chunk_bytes`
    (V = 152k -> 220 tokens; V = 49k -> 682 tokens)."""
    return int(max(MIN_CHUNK, min(MAX_CHUNK, chunk_bytes // (4 * max(1, vocab_size)))))


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """fp32 for fp32/bf16/fp16 inputs; float64 stays float64 (exact gradient checks in tests)."""
    return torch.promote_types(torch.promote_types(hidden.dtype, weight.dtype), torch.float32)


def _column_blocks(vocab: int):
    for start in range(0, vocab, COLUMN_BLOCK):
        yield start, min(start + COLUMN_BLOCK, vocab)


class _ChunkedLogprobEntropy(torch.autograd.Function):
    """(hidden [N, H], weight [V, H], targets [N]) -> (logp [N], entropy [N]), both fp32.

    Memory per pass: one [chunk, V] logits buffer, allocated once and reused by every chunk (`out=`),
    plus a small [chunk, COLUMN_BLOCK] scratch buffer: the elementwise work that needs a second
    [chunk, V] tensor (e^z next to z) runs over column blocks of the logits instead."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, chunk_size, with_entropy):
        n_tokens, vocab = hidden.shape[0], weight.shape[0]
        compute = _compute_dtype(hidden, weight)
        weight32 = weight.to(compute)  # [V, H] (no copy when already fp32)
        logp = torch.empty(n_tokens, dtype=compute, device=hidden.device)  # [N]
        lse = torch.empty_like(logp)  # [N] logsumexp of the scaled logits
        entropy = torch.empty_like(logp) if with_entropy else None
        rows = min(chunk_size, n_tokens)
        logits_buf = torch.empty((rows, vocab), dtype=compute, device=hidden.device)  # [C, V]
        scratch = torch.empty(rows * min(COLUMN_BLOCK, vocab), dtype=compute, device=hidden.device)
        for start in range(0, n_tokens, chunk_size):
            stop = min(start + chunk_size, n_tokens)
            count = stop - start
            logits = torch.mm(hidden[start:stop].to(compute), weight32.t(), out=logits_buf[:count])  # [C, V]
            if temperature != 1.0:
                logits.div_(temperature)
            row_max = logits.amax(dim=-1, keepdim=True)  # [C, 1]
            logits.sub_(row_max)  # z: shifted logits, max 0
            row_sum = torch.zeros((count, 1), dtype=compute, device=hidden.device)  # sum e^z
            weighted = torch.zeros_like(row_sum)  # sum e^z z
            for col, col_end in _column_blocks(vocab):
                block = logits[:, col:col_end]  # [C, b] view
                exps = torch.exp(block, out=scratch[:count * (col_end - col)].view(count, col_end - col))
                row_sum += exps.sum(dim=-1, keepdim=True)
                if with_entropy:
                    weighted += exps.mul_(block).sum(dim=-1, keepdim=True)
            log_sum = row_sum.log()  # [C, 1]
            lse[start:stop] = (row_max + log_sum).squeeze(-1)
            logp[start:stop] = (logits.gather(1, targets[start:stop, None]) - log_sum).squeeze(-1)
            if with_entropy:  # H = -sum p log p = log s - sum(e^z z) / s
                entropy[start:stop] = (log_sum - weighted / row_sum).squeeze(-1)
        del logits_buf, scratch
        ctx.save_for_backward(hidden, weight, targets, lse, entropy if with_entropy else lse)
        ctx.temperature, ctx.chunk_size, ctx.with_entropy = temperature, chunk_size, with_entropy
        ctx.set_materialize_grads(False)
        if with_entropy:
            return logp, entropy
        return logp, None

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, targets, lse, entropy = ctx.saved_tensors
        temperature, chunk_size = ctx.temperature, ctx.chunk_size
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not ctx.with_entropy:
            grad_entropy = None
        if grad_logp is None and grad_entropy is None or not (want_hidden or want_weight):
            return None, None, None, None, None, None
        n_tokens, vocab = hidden.shape[0], weight.shape[0]
        compute = _compute_dtype(hidden, weight)
        weight32 = weight.to(compute)  # [V, H]
        grad_hidden = torch.empty_like(hidden) if want_hidden else None  # [N, H]
        grad_weight32 = torch.zeros_like(weight32) if want_weight else None  # [V, H] fp32 accumulator
        # With z = logits / T:  d logp_i / d z_iv = [v = t_i] - p_iv  and  d H_i / d z_iv = -p_iv (log p_iv + H_i).
        # So the gradient w.r.t. logits_iv is a_i [v = t_i] - p_iv (a_i + b_i (log p_iv + H_i)), where
        # a = g_logp / T and b = g_entropy / T.
        coef_logp = (grad_logp.to(compute) / temperature) if grad_logp is not None else None  # [N]
        coef_ent = (grad_entropy.to(compute) / temperature) if grad_entropy is not None else None  # [N]
        rows = min(chunk_size, n_tokens)
        logits_buf = torch.empty((rows, vocab), dtype=compute, device=hidden.device)  # [C, V]
        scratch = (torch.empty(rows * min(COLUMN_BLOCK, vocab), dtype=compute, device=hidden.device)
                   if coef_ent is not None else None)
        for start in range(0, n_tokens, chunk_size):
            stop = min(start + chunk_size, n_tokens)
            count = stop - start
            hidden32 = hidden[start:stop].to(compute)  # [C, H]
            logits = torch.mm(hidden32, weight32.t(), out=logits_buf[:count])  # [C, V]
            if temperature != 1.0:
                logits.div_(temperature)
            logits.sub_(lse[start:stop, None])  # [C, V] log-probs
            a = coef_logp[start:stop, None] if coef_logp is not None else None  # [C, 1]
            if coef_ent is None:
                grad_logits = logits.exp_().mul_(-a)  # -a p
            else:
                b = coef_ent[start:stop, None]  # [C, 1]
                h = entropy[start:stop, None]  # [C, 1]
                for col, col_end in _column_blocks(vocab):
                    block = logits[:, col:col_end]  # [C, b] log-probs -> gradient, in place
                    probs = torch.exp(block, out=scratch[:count * (col_end - col)].view(count, col_end - col))
                    block.add_(h).mul_(b)
                    if a is not None:
                        block.add_(a)
                    block.mul_(probs).neg_()
                grad_logits = logits
            if a is not None:
                index = torch.arange(count, device=hidden.device)
                grad_logits[index, targets[start:stop]] += a.squeeze(-1)
            if want_hidden:
                grad_hidden[start:stop] = torch.mm(grad_logits, weight32).to(hidden.dtype)
            if want_weight:
                grad_weight32.addmm_(grad_logits.t(), hidden32)
        del logits_buf, scratch
        grad_weight = grad_weight32.to(weight.dtype) if want_weight else None
        return grad_hidden, grad_weight, None, None, None, None


def chunked_logprobs_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                             temperature: float = 1.0, chunk_size: int | None = None,
                             with_entropy: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-prob of `targets` and entropy under `softmax(hidden @ weight.T / temperature)`.

    hidden [N, H] (any float dtype), weight [V, H], targets [N] (long) -> (logp [N], entropy [N]) in fp32
    (float64 if an input is float64);
    entropy is None when `with_entropy=False`. Differentiable w.r.t. hidden and weight (both outputs).
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"chunked_logprobs_entropy: need hidden [N, H] and weight [V, H], got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"chunked_logprobs_entropy: targets {tuple(targets.shape)} must be [N={hidden.shape[0]}]")
    if not temperature > 0:
        raise ValueError(f"chunked_logprobs_entropy: temperature must be > 0, got {temperature}")
    chunk = int(chunk_size) if chunk_size else default_chunk_size(weight.shape[0])
    if chunk < 1:
        raise ValueError(f"chunked_logprobs_entropy: chunk_size must be >= 1, got {chunk_size}")
    return _ChunkedLogprobEntropy.apply(hidden, weight, targets.long(), float(temperature), chunk,
                                        bool(with_entropy))


# ----------------------------------------------------------------------------- model level


@dataclass
class _HeadRequest:
    """What the head computes during the next model forward: rows of the flattened [B*S, H] hidden
    states and the token each row must score."""

    rows: torch.Tensor  # [N] indices into the flattened hidden states
    targets: torch.Tensor  # [N]
    temperature: float
    with_entropy: bool
    chunk_size: int | None
    result: tuple | None = None


def _unwrap(model):
    """The HF model inside a DeepSpeed engine (or the model itself)."""
    return getattr(model, "module", model)


def _chunked_head_forward(self, hidden_states, targets=None, temperature: float = 1.0,
                          with_entropy: bool = True, chunk_size: int | None = None):
    """Replacement `lm_head.forward`: logits as usual, or (logp, entropy) when asked (see module doc)."""
    request = self._rlengine_request
    if targets is None and request is None:
        return self._rlengine_original_forward(hidden_states)
    if getattr(self, "bias", None) is not None:
        raise NotImplementedError("chunked LM head: heads with a bias are not supported")
    if targets is not None:  # explicit call: hidden_states are already the rows [N, H]
        return chunked_logprobs_entropy(hidden_states, self.weight, targets, temperature, chunk_size, with_entropy)
    rows = hidden_states.reshape(-1, hidden_states.shape[-1]).index_select(0, request.rows)  # [N, H]
    request.result = chunked_logprobs_entropy(rows, self.weight, request.targets, request.temperature,
                                              request.chunk_size, request.with_entropy)
    return request.result


def install_chunked_head(model) -> torch.nn.Module:
    """Make the model's output-embedding module able to return chunked (logp, entropy); idempotent.
    `model` may be an HF causal LM or a DeepSpeed engine around one. Returns the head module."""
    head = _unwrap(model).get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise ValueError(f"{type(_unwrap(model)).__name__} has no output-embedding (lm_head) weight")
    if getattr(head, "_rlengine_chunked_head", False):
        return head
    head._rlengine_original_forward = head.forward
    head._rlengine_request = None
    head.forward = types.MethodType(_chunked_head_forward, head)
    head._rlengine_chunked_head = True
    return head


@contextmanager
def _pending_request(head, request: _HeadRequest):
    if head._rlengine_request is not None:
        raise RuntimeError("token_logprobs: a log-prob request is already in flight on this model")
    head._rlengine_request = request
    try:
        yield request
    finally:
        head._rlengine_request = None


def scored_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                    rows: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0, with_entropy: bool = True,
                    chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The general form under `token_logprobs`: one `model(...)` over input_ids [B, S] with the given
    attention mask ([B, S], or a custom [B, 1, S, S] one) and position_ids [B, S]; then the log-prob (and
    entropy) of targets [N] under the hidden states at flat positions rows [N] of [B * S]. Returns
    (logp [N], entropy [N] or None), fp32 (float64 for a float64 model). The shared-prompt layout
    (rlengine/shared_prompt.py) is why a row need not be the position just before its target."""
    head = install_chunked_head(model)
    request = _HeadRequest(rows=rows, targets=targets, temperature=float(temperature), with_entropy=with_entropy,
                           chunk_size=chunk_size)
    with _pending_request(head, request):
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    if request.result is None:
        raise RuntimeError(f"token_logprobs: the forward of {type(_unwrap(model)).__name__} never called its lm_head")
    # Use what the model *returned* (its `logits` field carries the head's (logp, entropy)), not
    # request.result: under ZeRO-3 the lm_head's forward hooks wrap the module's outputs so that
    # backward first re-gathers the partitioned head weight; the unwrapped tensors would reach our
    # backward with an empty weight.
    returned = getattr(out, "logits", None)
    if isinstance(returned, tuple) and len(returned) == 2:
        return returned
    if hasattr(head.weight, "ds_id"):  # ZeRO-partitioned: the unwrapped result would break backward
        raise RuntimeError(f"token_logprobs: {type(_unwrap(model)).__name__}'s forward did not return the "
                           "lm_head output in its `logits` field; cannot differentiate it under ZeRO-3")
    return request.result


def token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, target_mask: torch.Tensor,
                   temperature: float = 1.0, with_entropy: bool = True, chunk_size: int | None = None,
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-prob (and entropy of the predictive distribution) of every token where `target_mask` is set.

    input_ids, attention_mask, target_mask: [B, S]; `target_mask[:, 0]` must be False (position 0 has
    no context). Returns (logp [B, S], entropy [B, S] or None), fp32 (float64 for a float64 model), zero
    where `target_mask` is False;
    entry (b, s) scores token input_ids[b, s] given the tokens before it. Positions follow the
    attention mask (as in HF `generate` with left padding). Runs `model(...)` once: `model` may be an
    HF causal LM or a DeepSpeed engine (see the module docstring for why)."""
    if input_ids.shape != attention_mask.shape or input_ids.shape != target_mask.shape:
        raise ValueError(f"token_logprobs: input_ids {tuple(input_ids.shape)}, attention_mask "
                         f"{tuple(attention_mask.shape)} and target_mask {tuple(target_mask.shape)} must match")
    target_mask = target_mask.bool()
    if target_mask[:, 0].any():
        raise ValueError("token_logprobs: target_mask[:, 0] must be False (the first token has no context)")
    batch, seq = input_ids.shape
    predict = target_mask[:, 1:]  # [B, S-1]: position s predicts token s+1
    batch_index, pos_index = predict.nonzero(as_tuple=True)  # [N]
    logp_rows, entropy_rows = scored_logprobs(
        model, input_ids, attention_mask, position_ids_from_mask(attention_mask), batch_index * seq + pos_index,
        input_ids[batch_index, pos_index + 1], temperature, with_entropy, chunk_size)
    logp = logp_rows.new_zeros((batch, seq)).index_put((batch_index, pos_index + 1), logp_rows)  # [B, S]
    entropy = None
    if with_entropy:
        entropy = entropy_rows.new_zeros((batch, seq)).index_put((batch_index, pos_index + 1), entropy_rows)
    return logp, entropy


def sequence_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_start: int,
                      temperature: float = 1.0, with_entropy: bool = True, chunk_size: int | None = None,
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs and entropies of the response tokens in the usual rollout layout
    `input_ids = [left-padded prompt | right-padded response]`, responses starting at column
    `response_start` (>= 1). Returns (logp [B, T], entropy [B, T] or None) with T = S - response_start,
    zero where the response is padding (`attention_mask` is 0)."""
    seq = input_ids.shape[1]
    if not 1 <= response_start <= seq:
        raise ValueError(f"sequence_logprobs: response_start={response_start} must be in [1, {seq}]")
    target_mask = torch.zeros_like(attention_mask, dtype=torch.bool)  # [B, S]
    target_mask[:, response_start:] = attention_mask[:, response_start:].bool()
    logp, entropy = token_logprobs(model, input_ids, attention_mask, target_mask, temperature, with_entropy,
                                   chunk_size)
    return logp[:, response_start:], (entropy[:, response_start:] if entropy is not None else None)
