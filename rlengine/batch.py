"""`RolloutBatch`: one trainer rank's share of a step, from the sampler's responses to the advantages.

Every tensor is [B, T] over response tokens (B sequences, T the longest response) or [B]; the
sequences are grouped by prompt (group_size responses of prompt 0 first). Fields are filled phase
by phase: the generation (`from_generation`), then `old_logp` / `ref_logp`, then the reward, then
`advantages` and `loss_mask` (`advantages.shape_advantages`). `resp_mask` never changes after
construction: what the loss sees is `loss_mask` (the DAPO filter zeroes it, `tokens_per_s` keeps
counting what was generated).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

from rlengine.actor import SeqBatch, make_batch
from rlengine.rollout.base import Generation


@dataclass
class RolloutBatch:
    seqs: SeqBatch                               # ids, attention mask, response positions / mask / targets
    sampler_logp: torch.Tensor                   # [B, T] the behaviour policy: the sampler's log-probs
    group_size: int
    old_logp: torch.Tensor | None = None         # [B, T] pi_old recomputed by the trainer; None: on-policy
    ref_logp: torch.Tensor | None = None         # [B, T] the frozen reference (KL)
    reward: torch.Tensor | None = None           # [B] the reward function's value (before any KL term)
    reward_parts: list[dict] = field(default_factory=list)   # [B] each sample's declared parts
    advantages: torch.Tensor | None = None       # [B] or [B, T] (TIS makes them per token)
    loss_mask: torch.Tensor | None = None        # [B, T] tokens the loss sees

    @classmethod
    def from_generation(cls, gen: Generation, pad_id: int, group_size: int) -> "RolloutBatch":
        seqs = make_batch(gen.prompt_ids, gen.response_ids, pad_id)
        sampler_logp = torch.zeros(seqs.resp_mask.shape)                       # [B, T]
        for i, lp in enumerate(gen.response_logprobs):
            sampler_logp[i, :len(lp)] = torch.tensor(lp)
        return cls(seqs, sampler_logp, group_size, loss_mask=seqs.resp_mask.clone())

    @property
    def resp_mask(self) -> torch.Tensor:
        return self.seqs.resp_mask

    def __len__(self) -> int:
        return self.seqs.input_ids.shape[0]

    def select(self, idx: torch.Tensor) -> "RolloutBatch":
        """The sequences `idx` (a micro-batch), every per-sequence field cut alike."""
        def cut(value):
            return value[idx] if isinstance(value, torch.Tensor) else value

        seqs = SeqBatch(*(getattr(self.seqs, f.name)[idx] for f in fields(SeqBatch)))
        parts = [self.reward_parts[i] for i in idx.tolist()] if self.reward_parts else []
        return RolloutBatch(seqs, cut(self.sampler_logp), self.group_size, cut(self.old_logp), cut(self.ref_logp),
                            cut(self.reward), parts, cut(self.advantages), cut(self.loss_mask))

    def minibatches(self, num_minibatches: int, generator: torch.Generator):
        """Whole groups shuffled by `generator`, split into `num_minibatches`; yields sequence-index
        tensors."""
        num_groups = len(self) // self.group_size
        order = torch.randperm(num_groups, generator=generator)
        per = num_groups // num_minibatches
        for k in range(num_minibatches):
            groups = order[k * per:(k + 1) * per]
            yield (groups.unsqueeze(1) * self.group_size + torch.arange(self.group_size)).flatten()

    def probe(self, probe_tokens: int) -> tuple[list[int], list[int]] | None:
        """The fixed sequence both the sampler and the trainer score after a push: the tail of the
        first prompt and the head of its response, `probe_tokens` in all (None without a response).
        Any sequence proves the sampler holds the trainer's weights; a short one keeps it cheap."""
        n = int(self.resp_mask[0].sum())
        if n == 0:
            return None
        response = self.seqs.targets[0, :min(n, max(1, probe_tokens // 2))].tolist()
        start = int(self.seqs.resp_pos[0, 0])                                   # the prompt's length
        prompt = self.seqs.input_ids[0, max(0, start - max(1, probe_tokens - len(response))):start].tolist()
        return prompt, response
