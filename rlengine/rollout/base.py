"""The sampler interface every rollout backend implements (HF `generate`, vLLM).

A sampler turns tokenised prompts into sampled responses *with the sampler's own per-token
log-probs* (after temperature, so they are comparable with the trainer's temperature-scaled
log-probs), and accepts new policy weights after every optimizer step.
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
    response_logprobs: list[list[float]]  # [N][T_i] sampler log-prob of each sampled token
    texts: list[str]                    # [N] decoded responses (special tokens skipped)
    finish_reasons: list[str]           # [N] "stop" (EOS or a stop string) or "length"

    def __len__(self) -> int:
        return len(self.response_ids)


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
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
        """Load new policy weights (HF checkpoint names). Returns the names actually loaded."""

    @abstractmethod
    def score(self, prompt_ids: list[int], response_ids: list[int], temperature: float = 1.0) -> list[float]:
        """Log-probs the sampler assigns to `response_ids` after `prompt_ids` (the sync probe)."""

    def sleep(self) -> None:
        """Free generation memory (KV cache) while the trainer runs; no-op where unsupported."""

    def wake(self) -> None:
        """Undo `sleep()`."""

    def close(self) -> None:
        """Release the engine."""
