"""The Hugging Face `generate` rollout backend (works everywhere; the reference for the vLLM one).

Per call: prompts are repeated `n` times (prompt 0's samples first), cut into batches of
`batch_size` sequences, left-padded (the mask is built from lengths, since SmolLM2's pad is its EOS)
and sampled with a fresh `GenerationConfig` (temperature, top_p, top_k off, max_new_tokens) so the
checkpoint's own generation defaults never leak in.

Log-probs and finishing are recorded *while* generating by `_StepRecorder`, which is both a forward
hook on the model's `lm_head` (it keeps `log_softmax(raw_logits / T)` of the step being decoded,
[B, V], instead of `output_logits=True`'s [steps, B, V] history) and a `StoppingCriteria` (called
right after each token is appended: it stores the sampled token's log-prob and decides whether the
row ends: EOS, or a stop string in the response text). Knowing each row's exact finishing step
matters because `generate` pads finished rows with the pad token, which here equals EOS, so padding
cannot be told apart from an emitted EOS afterwards.

Semantics (shared with the vLLM backend):
  * response_ids keep the EOS token when it was emitted, and the token that completes a stop string
    (text is cut right after the stop string, which is kept);
  * response_logprobs are under the temperature-scaled *full* distribution `log_softmax(logits / T)`,
    the distribution the trainer scores. With top_p < 1 the token was actually drawn from the
    renormalised nucleus, whose log-probs are higher by -log(nucleus mass); we report the full-
    distribution value (what vLLM's processed log-probs give too). Greedy decoding reports them under
    `sampling.temperature`.
  * `SamplingParams.seed` seeds a forked RNG for the whole call (the global RNG is left untouched);
    the same seed, prompts and batch_size give the same samples.
"""
from __future__ import annotations

from typing import Iterable

import torch

from rlengine.model import eos_token_ids, load_causal_lm, load_tokenizer, pad_left
from rlengine.rollout.base import Generation, Sampler, SamplingParams


class _StepRecorder:
    """Records each row's sampled tokens' log-probs and the step at which the row finished."""

    def __init__(self, prompt_width: int, batch: int, temperature: float, eos_ids: list[int],
                 stop: list[str], tokenizer):
        self.prompt_width = prompt_width
        self.temperature = temperature
        self.eos_ids = torch.tensor(eos_ids, dtype=torch.long)
        self.stop = [s for s in stop if s]
        # a stop string of b bytes spans at most b tokens (+1 for a token that starts mid-character)
        self.window = max((len(s.encode("utf-8")) for s in self.stop), default=0) + 1
        self.tokenizer = tokenizer
        self.step_logprobs: torch.Tensor | None = None  # [B, V] of the step being decoded
        self.logprobs: list[list[float]] = [[] for _ in range(batch)]
        self.finish: list[str | None] = [None] * batch  # "stop" once the row ended
        self.length: list[int | None] = [None] * batch  # response length when it ended

    # forward hook on lm_head: output [B, S or 1, V]
    def on_logits(self, module, inputs, output) -> None:
        logits = output[:, -1].float()  # [B, V]
        self.step_logprobs = torch.log_softmax(logits / self.temperature, dim=-1)

    # StoppingCriteria protocol: called after the step's tokens were appended
    def __call__(self, input_ids: torch.Tensor, scores=None, **kwargs) -> torch.Tensor:
        batch = input_ids.shape[0]
        done = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
        last = input_ids[:, -1].cpu()  # [B]
        picked = self.step_logprobs.gather(1, input_ids[:, -1:].to(self.step_logprobs.device)).squeeze(1).cpu()
        for row in range(batch):
            if self.finish[row] is not None:
                done[row] = True
                continue
            self.logprobs[row].append(float(picked[row]))
            step = input_ids.shape[1] - self.prompt_width  # tokens generated so far
            if bool((self.eos_ids == last[row]).any()) or self._stop_string_ends(input_ids[row], step):
                self.finish[row], self.length[row] = "stop", step
                done[row] = True
        return done

    def _stop_string_ends(self, row_ids: torch.Tensor, step: int) -> bool:
        if not self.stop:
            return False
        tail = row_ids[self.prompt_width + max(0, step - self.window):].tolist()
        text = self.tokenizer.decode(tail, skip_special_tokens=False)
        return any(s in text for s in self.stop)


class HFSampler(Sampler):
    """Rollouts with `transformers` `generate` on one device (CPU or one GPU)."""

    def __init__(self, model_path: str, dtype: str = "fp32", device: str = "cpu", tokenizer=None,
                 batch_size: int = 16, attn_implementation: str | None = None):
        if batch_size < 1:
            raise ValueError(f"HFSampler: batch_size must be >= 1, got {batch_size}")
        self.model_path = model_path
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model_path)
        self.model = load_causal_lm(model_path, dtype=dtype, device=device,
                                    attn_implementation=attn_implementation).eval()
        self.model.requires_grad_(False)
        self.pad_id = int(self.tokenizer.pad_token_id)
        self.eos_ids = eos_token_ids(self.model, self.tokenizer)
        if not self.eos_ids:
            raise ValueError(f"HFSampler: model {model_path!r} defines no EOS token")

    # ------------------------------------------------------------------ generation
    def generate(self, prompts: list[list[int]], n: int, sampling: SamplingParams) -> Generation:
        if n < 1:
            raise ValueError(f"generate: n must be >= 1, got {n}")
        if not sampling.greedy and not sampling.temperature > 0:
            raise ValueError(f"generate: temperature must be > 0 when sampling, got {sampling.temperature}")
        for index, prompt in enumerate(prompts):
            if len(prompt) == 0:
                raise ValueError(f"generate: prompt {index} is empty")
        order = [index for index in range(len(prompts)) for _ in range(n)]  # grouped by prompt
        out = Generation(prompt_index=[], prompt_ids=[], response_ids=[], response_logprobs=[], texts=[],
                         finish_reasons=[])
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
            for start in range(0, len(order), self.batch_size):
                batch = order[start:start + self.batch_size]
                self._generate_batch([prompts[i] for i in batch], sampling, out)
                out.prompt_index.extend(batch)
        return out

    def _generation_config(self, sampling: SamplingParams):
        from transformers import GenerationConfig

        common = dict(max_new_tokens=sampling.max_new_tokens, pad_token_id=self.pad_id,
                      eos_token_id=self.eos_ids, num_beams=1, use_cache=True)
        if sampling.greedy:
            return GenerationConfig(do_sample=False, **common)
        return GenerationConfig(do_sample=True, temperature=float(sampling.temperature), top_p=float(sampling.top_p),
                                top_k=0, **common)

    @torch.no_grad()
    def _generate_batch(self, prompts: list[list[int]], sampling: SamplingParams, out: Generation) -> None:
        from transformers import StoppingCriteriaList

        input_ids, attention_mask = pad_left(prompts, self.pad_id)  # [B, P]
        width = input_ids.shape[1]
        temperature = float(sampling.temperature) if sampling.temperature > 0 else 1.0
        recorder = _StepRecorder(width, len(prompts), temperature, self.eos_ids, list(sampling.stop), self.tokenizer)
        hook = self.model.get_output_embeddings().register_forward_hook(recorder.on_logits)
        try:
            sequences = self.model.generate(
                input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device),
                generation_config=self._generation_config(sampling),
                stopping_criteria=StoppingCriteriaList([recorder]))
        finally:
            hook.remove()
        sequences = sequences.cpu()
        generated = sequences.shape[1] - width
        for row, prompt in enumerate(prompts):
            length = recorder.length[row] if recorder.length[row] is not None else min(
                generated, len(recorder.logprobs[row]))
            response = sequences[row, width:width + length].tolist()
            text = self.tokenizer.decode(response, skip_special_tokens=True)
            if recorder.finish[row] == "stop" and sampling.stop:
                text = _cut_after_stop(text, sampling.stop)
            out.prompt_ids.append(list(prompt))
            out.response_ids.append(response)
            out.response_logprobs.append(recorder.logprobs[row][:length])
            out.texts.append(text)
            out.finish_reasons.append(recorder.finish[row] or "length")

    # ------------------------------------------------------------------ weights and scoring
    @torch.no_grad()
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
        """Copy tensors into the model in place by HF checkpoint name. `lm_head.weight` of a tied model
        is the embedding itself (either name works). A bad name or shape raises ValueError naming the
        tensor; tensors before it in the iterable are already loaded."""
        targets = self.model.state_dict(keep_vars=True)  # HF names, tied names included
        loaded = []
        for name, tensor in named_tensors:
            if name not in targets:
                raise ValueError(f"load_weights: unknown tensor {name!r} (not a parameter of {type(self.model).__name__})")
            target = targets[name]
            if tuple(target.shape) != tuple(tensor.shape):
                raise ValueError(f"load_weights: tensor {name!r} has shape {tuple(tensor.shape)}, "
                                 f"the model expects {tuple(target.shape)}")
            target.data.copy_(tensor.detach())
            loaded.append(name)
        return loaded

    @torch.no_grad()
    def score(self, prompt_ids: list[int], response_ids: list[int], temperature: float = 1.0) -> list[float]:
        """log_softmax(logits / T) of each response token after the prompt (one forward pass)."""
        if not prompt_ids:
            raise ValueError("score: prompt_ids is empty")
        if not response_ids:
            return []
        if not temperature > 0:
            raise ValueError(f"score: temperature must be > 0, got {temperature}")
        ids = torch.tensor([list(prompt_ids) + list(response_ids)], dtype=torch.long, device=self.device)  # [1, S]
        logits = self.model(input_ids=ids, use_cache=False).logits[0, len(prompt_ids) - 1:-1].float()  # [T, V]
        logprobs = torch.log_softmax(logits / temperature, dim=-1)
        picked = logprobs.gather(1, ids[0, len(prompt_ids):, None]).squeeze(1)  # [T]
        return picked.cpu().tolist()

    def close(self) -> None:
        self.model = None


def _cut_after_stop(text: str, stop: list[str]) -> str:
    """Text up to and including the earliest stop string (a token may run past it)."""
    ends = [text.find(s) + len(s) for s in stop if s and s in text]
    return text[:min(ends)] if ends else text
