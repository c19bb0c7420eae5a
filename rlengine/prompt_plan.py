"""Which prompts each training step trains, when their generation is asked for, and what a
checkpoint records of the data.

Prompts are drawn in step order, one step's batch at a time, the same on every trainer rank. In the
synchronous loop a step draws its prompts and generates them at once. With asynchronous rollout
(`rollout.max_staleness` = k >= 1) the plan draws and requests up to k steps ahead of the step being
trained, so the prompt stream runs ahead of training. A checkpoint therefore records the stream's
state *after the trained step's draw* (`StepPrompts.data_state`), never the live one: on resume the
steps that were in flight are drawn again from there and regenerated, so the sequence of prompts
trained is the uninterrupted run's, none skipped, none trained twice (tests/test_engine_async.py
kills a max_staleness=2 run and compares `data/prompt_ids`, logged for every step).
"""
from __future__ import annotations

from dataclasses import dataclass

from rlengine.rollout.base import Generation, SamplingParams


@dataclass
class StepPrompts:
    step: int
    every: list             # [P] every trainer's prompts of the step (data.Prompt), in trainer order
    mine: list              # this trainer rank's share of `every`
    data_state: dict        # the prompt stream's state right after this step's draw

    def ids(self) -> list[str]:
        """`source:row` of every prompt the step trains (metrics.jsonl `data/prompt_ids`)."""
        return [f"{p.source}:{p.row}" for p in self.every]


def sampling_seed(seed: int, step: int, rank: int) -> int:
    """The sampler's seed for a step: a function of the step alone, so a regenerated step after a
    resume samples with the seed the uninterrupted run used."""
    return seed * 100003 + step * 131 + rank


class PromptPlan:
    """`next(step)` -> (the step's prompts, this trainer's responses); steps in order, from `start`+1."""

    def __init__(self, cfg, ctx, prompts, placement, sampling: SamplingParams, start: int):
        self.cfg, self.ctx, self.prompts, self.placement, self.sampling = cfg, ctx, prompts, placement, sampling
        self.ahead = cfg.rollout.max_staleness if cfg.rollout.placement == "separate" else 0
        self.start = start
        self._planned: dict[int, StepPrompts] = {}
        self._drawn = start                        # the last step whose prompts were drawn

    def _draw(self, step: int) -> StepPrompts:
        assert step == self._drawn + 1, "prompts are drawn in step order"
        cfg, ctx = self.cfg, self.ctx
        local = cfg.rollout.prompts_per_step // ctx.num_trainers
        every = self.prompts.next_batch(cfg.rollout.prompts_per_step)          # the same on every rank
        mine = every[ctx.trainer_index * local:(ctx.trainer_index + 1) * local]
        self._drawn = step
        self._planned[step] = StepPrompts(step, every, mine, self.prompts.state_dict())
        return self._planned[step]

    def _sampling(self, step: int) -> SamplingParams:
        from rlengine.async_rollout import sampling_for

        return sampling_for(self.sampling, sampling_seed(self.cfg.run.seed, step, self.ctx.rank))

    def next(self, step: int) -> tuple[StepPrompts, Generation]:
        n = self.cfg.rollout.group_size
        if not self.ahead:
            planned = self._draw(step)
            gen = self.placement.generate([p.prompt_ids for p in planned.mine], n, self._sampling(step))
            return self._planned.pop(step), gen
        # ask for every step up to `step + k` before waiting for this one: the rollout ranks then
        # always have the next generation queued (never past the run's last step)
        for t in range(self._drawn + 1, min(step + self.ahead, self.cfg.run.total_steps) + 1):
            planned = self._draw(t)
            # step t trains with weights t - 1: at most k versions older means at least t - 1 - k
            min_version = max(t - 1 - self.ahead, self.start)
            self.placement.request(t, [p.prompt_ids for p in planned.mine], n, self._sampling(t), min_version)
        return self._planned.pop(step), self.placement.take(step)
