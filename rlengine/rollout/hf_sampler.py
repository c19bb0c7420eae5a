"""The Hugging Face `generate` rollout backend (works everywhere; the reference for the vLLM one).

Per call: prompts are repeated `n` times (prompt 0's samples first), cut into batches of
`batch_size` sequences, left-padded (the mask is built from lengths, since SmolLM2's pad is its EOS)
and sampled with a fresh `GenerationConfig` (max_new_tokens, sampling on or off, its own warpers
neutral: temperature 1, top_p 1, top_k 0) so the checkpoint's own generation defaults for them never
leak in; temperature and top-p are applied by `_BehaviourWarper` (below).

Log-probs and finishing are recorded *while* generating, per step ([B, V] of the step being
decoded, instead of `output_scores=True`'s [steps, B, V] history), by two objects:
  * `_BehaviourWarper`, the last logits processor `generate` runs: it applies temperature and
    top-p itself (`nucleus_logprobs`, with transformers' own warpers) and keeps the log-softmax of
    what it returns, i.e. of exactly the distribution `generate` then draws the token from;
  * `_StepRecorder`, a `StoppingCriteria` (called right after each token is appended: it stores the
    sampled token's log-prob and decides whether the row ends: EOS, or a stop string in the response
    text). Knowing each row's exact finishing step matters because `generate` pads finished rows
    with the pad token, which here equals EOS, so padding cannot be told apart from an emitted EOS
    afterwards.

Semantics (shared with the vLLM backend):
  * response_ids keep the EOS token when it was emitted, and the token that completes a stop string
    (text is cut right after the stop string, which is kept);
  * response_logprobs are the behaviour policy: the log-prob of each sampled token under the
    distribution it was drawn from, i.e. after temperature, top-p masking and renormalisation:
    `log_softmax(logits / T)` restricted to the nucleus (the smallest set of most probable tokens
    whose mass reaches top_p) minus log(nucleus mass). That is what importance sampling (TIS, an
    off-policy correction) needs as the denominator, and what vLLM reports with
    `logprobs_mode="processed_logprobs"` (measured: both backends within 7e-5 of a recomputation
    in fp32, tests/test_sampling_logprobs.py). With top_p == 1 it is the trainer's
    `log_softmax(logits / T)`; with top_p < 1 it is higher than that by -log(nucleus mass) (0.17 on
    average at T = 1, top_p = 0.8 on the embedded model). Greedy decoding reports the full
    `log_softmax(logits / T)` under `sampling.temperature` (vLLM reports greedy log-probs at T = 1);
  * `score()` (the weight-push probe) reports the plain `log_softmax(logits / T)`, never top-p:
    it is compared with the trainer's recomputation, which has no top-p;
  * `SamplingParams.seed` seeds a forked RNG for the whole call (the global RNG is left untouched);
    the same seed, prompts and batch_size give the same samples.
"""
from __future__ import annotations

from typing import Iterable

import torch

from rlengine.model import eos_token_ids, load_causal_lm, load_tokenizer, pad_left
from rlengine.rollout.base import Generation, LoadReport, Sampler, SamplingParams


def nucleus_logprobs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """The log-probs HFSampler samples from (and reports): `logits / T`, then top-p masking (the
    smallest set of most probable tokens whose mass reaches top_p; the rest -inf), renormalised by
    the log-softmax. [..., V] in, [..., V] out (float32). The masking is transformers'
    `TopPLogitsWarper`, the one `generate` itself uses; vLLM's CPU and native samplers apply the same
    rule (`apply_top_k_top_p_pytorch`)."""
    return torch.log_softmax(_warp(logits.float(), temperature, top_p), dim=-1)


def _warp(scores: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    from transformers import TemperatureLogitsWarper, TopPLogitsWarper

    scores = TemperatureLogitsWarper(temperature)(None, scores)
    if top_p < 1.0:
        shape = scores.shape
        scores = TopPLogitsWarper(top_p=top_p, min_tokens_to_keep=1)(None, scores.reshape(-1, shape[-1])).reshape(shape)
    return scores


class _BehaviourWarper:
    """The last logits processor of `generate` (LogitsProcessor protocol): applies temperature and
    top-p and hands `recorder` the log-softmax of its output, the distribution the token is drawn
    from. `generate` runs its own warpers *after* user processors, so the generation config keeps
    them neutral (temperature 1, top_p 1, top_k 0, ...): softmax of what this returns is exactly
    what `torch.multinomial` samples. Greedy: the scores pass unchanged (argmax) and the recorded
    log-probs are `log_softmax(logits / T)`."""

    def __init__(self, recorder: "_StepRecorder", temperature: float, top_p: float, greedy: bool):
        self.recorder, self.temperature, self.top_p, self.greedy = recorder, temperature, top_p, greedy

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.greedy:
            self.recorder.step_logprobs = torch.log_softmax(scores.float() / self.temperature, dim=-1)
            return scores
        scores = _warp(scores, self.temperature, self.top_p)
        self.recorder.step_logprobs = torch.log_softmax(scores.float(), dim=-1)
        return scores


class _StepRecorder:
    """Records each row's sampled tokens' log-probs and the step at which the row finished.

    `step_logprobs` ([B, V], the step being decoded) is set by `_BehaviourWarper` before the token
    is drawn; this StoppingCriteria reads the drawn token's entry right after it was appended."""

    def __init__(self, prompt_width: int, batch: int, eos_ids: list[int], stop: list[str], tokenizer):
        self.prompt_width = prompt_width
        self.eos_ids = torch.tensor(eos_ids, dtype=torch.long)
        self.stop = [s for s in stop if s]
        # a stop string of b bytes spans at most b tokens (+1 for a token that starts mid-character)
        self.window = max((len(s.encode("utf-8")) for s in self.stop), default=0) + 1
        self.tokenizer = tokenizer
        self.step_logprobs: torch.Tensor | None = None  # [B, V] of the step being decoded
        self.logprobs: list[list[float]] = [[] for _ in range(batch)]
        self.finish: list[str | None] = [None] * batch  # "stop" once the row ended
        self.length: list[int | None] = [None] * batch  # response length when it ended

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
        # temperature and top-p are applied by `_BehaviourWarper`, the last processor: generate's own
        # warpers (which would run after it) are all set to their neutral values
        return GenerationConfig(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, typical_p=1.0,
                                epsilon_cutoff=0.0, eta_cutoff=0.0, **common)

    @torch.no_grad()
    def _generate_batch(self, prompts: list[list[int]], sampling: SamplingParams, out: Generation) -> None:
        from transformers import LogitsProcessorList, StoppingCriteriaList

        input_ids, attention_mask = pad_left(prompts, self.pad_id)  # [B, P]
        width = input_ids.shape[1]
        temperature = float(sampling.temperature) if sampling.temperature > 0 else 1.0
        recorder = _StepRecorder(width, len(prompts), self.eos_ids, list(sampling.stop), self.tokenizer)
        warper = _BehaviourWarper(recorder, temperature, float(sampling.top_p), bool(sampling.greedy))
        sequences = self.model.generate(
            input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device),
            generation_config=self._generation_config(sampling),
            logits_processor=LogitsProcessorList([warper]), stopping_criteria=StoppingCriteriaList([recorder]))
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
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> LoadReport:
        """Copy tensors into the model in place by HF checkpoint name. `lm_head.weight` of a tied model
        is the embedding itself (either name works). A bad name or shape raises ValueError naming the
        tensor; tensors before it in the iterable are already loaded. The report's digest is read
        back from the model's own parameters after the copy: what it now computes with."""
        from rlengine.weight_sync import weights_digest

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
        held = weights_digest((name, targets[name].data) for name in loaded)
        reached = {targets[name].data_ptr() for name in loaded}     # tied names share storage
        unmatched = [n for n, p in self.model.named_parameters() if p.data_ptr() not in reached]
        return LoadReport(loaded, held, unmatched)

    @torch.no_grad()
    def score(self, prompt_ids: list[int], response_ids: list[int], temperature: float = 1.0) -> list[float]:
        """log_softmax(logits / T) of each response token after the prompt (one forward pass).

        The full distribution, never top-p (unlike `generate`'s behaviour log-probs): the weight-push
        probe compares these with the trainer's recomputation, which has no top-p."""
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
