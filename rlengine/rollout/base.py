"""The sampler interface every rollout backend implements (HF `generate`, vLLM).

A sampler turns tokenised prompts into sampled responses *with the sampler's own per-token
log-probs*, and accepts new policy weights after every optimizer step. Those log-probs are the
behaviour policy: each token's log-prob under the distribution it was drawn from, after temperature
and top-p (masked to the nucleus and renormalised). With top_p == 1 that is the trainer's
`log_softmax(logits / T)`; with top_p < 1 it is higher by -log(nucleus mass), which is what
importance sampling against the behaviour policy needs. `score` stays on the full
`log_softmax(logits / T)` (the probe compares it with the trainer, which has no top-p). Both
backends agree on this (tests/test_sampling_logprobs.py).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Iterable

import torch


@dataclass
class SamplingParams:
    """How to sample. `greedy=True` ignores temperature / top_p (argmax decoding)."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    stop: list[str] = field(default_factory=list)  # stop strings; the stop text is kept in the response
    greedy: bool = False
    seed: int | None = None


@dataclass
class Generation:
    """Responses for len(prompts) * n samples, grouped by prompt: prompt 0's n samples first."""

    prompt_index: list[int]             # [N] index into the prompts list
    prompt_ids: list[list[int]]         # [N][P_i] prompt token ids
    response_ids: list[list[int]]       # [N][T_i] sampled tokens (EOS included when emitted)
    response_logprobs: list[list[float]]  # [N][T_i] behaviour log-prob of each sampled token (after T, top-p)
    texts: list[str]                    # [N] decoded responses (special tokens skipped)
    finish_reasons: list[str]           # [N] "stop" (EOS or a stop string) or "length"

    def __len__(self) -> int:
        return len(self.response_ids)


@dataclass
class LoadReport:
    """What a sampler says of one `load_weights` call, computed on the sampler's side."""

    names: list[str]       # HF names of the tensors it took in
    digest: int            # weight_sync.WeightsDigest of those tensors as it received / holds them
    unmatched: list[str] = field(default_factory=list)   # its own parameters no pushed tensor reached


class Sampler(ABC):
    """One rollout engine. Backends: `hf` (rollout/hf_sampler.py), `vllm` (rollout/vllm_sampler.py)."""

    # True when `load_weights` copies each tensor out before it asks for the next one and applies
    # nothing until the iterable is exhausted: the colocated push may then hand over the trainer's
    # gathered ZeRO-3 tensors themselves, one layer alive at a time, instead of a copy of the model.
    consumes_weights_lazily: bool = False

    @abstractmethod
    def generate(self, prompts: list[list[int]], n: int, sampling: SamplingParams) -> Generation:
        """Sample `n` responses for each tokenised prompt."""

    @abstractmethod
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> LoadReport:
        """Load new policy weights (HF checkpoint names). Reports what was loaded, with the digest
        of it computed here (not what the trainer meant to send): `placement.verify_push` compares."""

    @abstractmethod
    def score(self, prompt_ids: list[int], response_ids: list[int], temperature: float = 1.0) -> list[float]:
        """log_softmax(logits / T) the sampler assigns to `response_ids` after `prompt_ids` (the sync
        probe): the full distribution, no top-p."""

    def health(self) -> str | None:
        """None while the sampler can answer; otherwise why it cannot (polled by the deadline that
        guards each call, rlengine/watchdog.py). In-process samplers cannot die apart from us."""
        return None

    def sleep(self) -> None:
        """Free generation memory (KV cache) while the trainer runs; no-op where unsupported."""

    def wake(self) -> None:
        """Undo `sleep()`."""

    def close(self) -> None:
        """Release the engine."""
