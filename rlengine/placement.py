"""Where the sampler lives, and how prompts, responses and weights travel to it.

colocated  every trainer rank holds its own sampler in-process; a weight push is a local copy
           of the gathered ZeRO-3 parameters.
separate   the last `rollout.num_ranks` ranks are rollout ranks running `rollout_rank_main`;
           trainer ranks talk to them through `RemoteSampler` (object collectives on the world
           group for prompts/responses) and `WeightBroadcaster` (bucketed broadcast on the
           dedicated sync group for weights).

Every command is a collective over the world group: trainer rank 0 broadcasts it, every rank
takes part, so no rank can wait on a message nobody sends.
"""
from __future__ import annotations

import time
import warnings

import torch
import torch.distributed as dist

from rlengine.config import Config
from rlengine.rollout.base import Generation, Sampler, SamplingParams


def build_local_sampler(cfg: Config, model_path: str, tokenizer) -> Sampler:
    """This process's own sampler, with the options its backend takes."""
    from rlengine.rollout import build_sampler

    dtype = cfg.rollout.dtype or cfg.model.dtype
    if cfg.rollout.backend == "vllm":
        from rlengine.rollout.vllm_sampler import in_process_possible

        return build_sampler("vllm", model_path, dtype=dtype, seed=cfg.run.seed,
                             kv_cache_gb=cfg.rollout.vllm_kv_cache_gb,
                             gpu_memory_utilization=cfg.rollout.vllm_gpu_memory_utilization,
                             max_model_len=cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens,
                             in_process=in_process_possible(), num_threads=torch.get_num_threads())
    from rlengine.runtime import local_device

    return build_sampler(cfg.rollout.backend, model_path, dtype=dtype, tokenizer=tokenizer, device=local_device())


def make_sampler(cfg: Config, ctx, model_path: str, tokenizer) -> Sampler:
    if cfg.rollout.placement == "separate":
        return RemoteSampler(ctx)
    return build_local_sampler(cfg, model_path, tokenizer)


# --------------------------------------------------------------------------- weight push

def _probe_gap(actor, sampler_logprobs: list[float], probe, temperature: float) -> float:
    """`probe_gap` of the sampler's log-probs of the probe against the actor's recomputation."""
    from rlengine.actor import make_batch
    from rlengine.weight_sync import probe_gap

    prompt, response = probe
    batch = make_batch([prompt], [response], pad_id=0)
    with torch.no_grad():
        logp, _ = actor.logprobs(batch, temperature, with_entropy=False)
    return probe_gap(sampler_logprobs[:len(response)], logp[0, :len(response)])


def probe_threshold(cfg: Config) -> float:
    """The probe gap above which a push is suspicious: `rollout.probe_threshold`, or by precision.

    Measured on the embedded default: fp32 on both sides 1e-5 to 1e-4 (the default tests assert
    < 1e-3); bf16 0.024-0.070 per step over the 32-step main job (rounding, not staleness), while a
    sampler that kept a stale output layer showed 1.7."""
    if cfg.rollout.probe_threshold is not None:
        return cfg.rollout.probe_threshold
    sampler_dtype = cfg.rollout.dtype or cfg.model.dtype
    return 0.005 if cfg.model.dtype == "fp32" and sampler_dtype == "fp32" else 0.1


class ProbeFailure(RuntimeError):
    """The sampler still disagrees with the trainer after a retried push (every trainer rank raises it)."""


def push_weights(actor, sampler, ctx, cfg: Config, probe=None) -> dict:
    """Push the actor's current weights into the sampler(s), checksummed, then probe; a gap above
    `probe_threshold` retries the push once, and a second one stops the run (ProbeFailure) or
    warns (`rollout.on_probe_failure`). The gap is the largest over the trainer ranks, so every
    rank takes the same decision.

    Collective over the trainer ranks (the ZeRO-3 gather) and, for `separate`, the world."""
    from rlengine.distributed import all_reduce

    threshold = probe_threshold(cfg)
    first_gap = None
    for attempt in (0, 1):
        if attempt:
            actor.release_params()                        # the probe's forward left gathers in flight
        metrics = _push_once(actor, sampler, cfg, probe)
        gap = all_reduce([metrics.get("sync/probe_abs_diff", -1.0)], op="max", group=ctx.trainer_group)[0]
        if gap < 0:                                        # no probe on any rank
            return {**metrics, "sync/retries": 0.0}
        metrics["sync/probe_abs_diff"], metrics["sync/retries"] = gap, float(attempt)
        if gap <= threshold:
            return metrics
        first_gap = gap if first_gap is None else first_gap
    message = (f"sampler/trainer log-prob gap {gap:.4g} > rollout.probe_threshold {threshold} after a retried "
               f"push (first gap {first_gap:.4g}): the sampler does not hold the trainer's weights (or "
               "rollout.dtype differs from model.dtype)")
    if cfg.rollout.on_probe_failure == "stop":
        raise ProbeFailure(message)
    if ctx.is_main:
        warnings.warn(message + "; rollout.on_probe_failure=warn: training on")
    return metrics


def _push_once(actor, sampler, cfg: Config, probe) -> dict:
    if isinstance(sampler, RemoteSampler):
        return sampler.push(actor, cfg, probe)
    from rlengine.weight_sync import local_push

    metrics = local_push(sampler, actor.named_parameters_gathered())
    if probe is not None:
        t0 = time.perf_counter()
        lp = sampler.score(probe[0], probe[1], temperature=cfg.rollout.temperature)
        t1 = time.perf_counter()
        metrics["sync/probe_abs_diff"] = _probe_gap(actor, lp, probe, cfg.rollout.temperature)
        metrics["sync/probe_sampler_seconds"] = t1 - t0
        metrics["sync/probe_trainer_seconds"] = time.perf_counter() - t1
    return metrics


# --------------------------------------------------------------------------- separate placement

def _split(n: int, parts: int, index: int) -> tuple[int, int]:
    base, extra = divmod(n, parts)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


class RemoteSampler(Sampler):
    """The trainer ranks' handle on the rollout ranks (placement=separate)."""

    def __init__(self, ctx):
        self.ctx = ctx

    def _command(self, cmd: dict) -> dict:
        box = [cmd if self.ctx.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def generate(self, prompts: list[list[int]], n: int, sampling: SamplingParams) -> Generation:
        self._command({"op": "generate", "n": n, "sampling": sampling})
        everyone: list = [None] * self.ctx.world_size
        dist.all_gather_object(everyone, prompts)            # trainers' prompts, in trainer order
        pieces: list = [None] * self.ctx.world_size
        dist.all_gather_object(pieces, None)                 # rollout ranks answer
        gens = [pieces[r] for r in self.ctx.rollout_ranks]
        merged = Generation([], [], [], [], [], [])
        for g in gens:  # each rollout rank numbered its prompts globally (see rollout_rank_main)
            for f in ("prompt_index", "prompt_ids", "response_ids", "response_logprobs", "texts", "finish_reasons"):
                getattr(merged, f).extend(getattr(g, f))
        # keep this trainer's slice, renumbered from 0
        counts = [len(everyone[r]) for r in self.ctx.trainer_ranks]
        first = sum(counts[:self.ctx.trainer_index])
        mine = [i for i, p in enumerate(merged.prompt_index) if first <= p < first + len(prompts)]
        return Generation([merged.prompt_index[i] - first for i in mine],
                          *([getattr(merged, f)[i] for i in mine] for f in
                            ("prompt_ids", "response_ids", "response_logprobs", "texts", "finish_reasons")))

    def push(self, actor, cfg: Config, probe) -> dict:
        from rlengine.weight_sync import WeightBroadcaster

        self._command({"op": "sync", "probe": probe})
        if not hasattr(self, "_bcast"):
            self._bcast = WeightBroadcaster(self.ctx.sync_group, src_rank=0, bucket_mb=cfg.rollout.bucket_mb,
                                            timeout_s=cfg.rollout.sync_timeout_s)
        t0 = time.perf_counter()
        named = actor.named_parameters_gathered()
        if self.ctx.is_main:
            metrics = self._bcast.push(named)
        else:
            for _ in named:   # other trainer ranks take part in the layer-wise ZeRO-3 gathers
                pass
            metrics = {}
        metrics.setdefault("sync/seconds", time.perf_counter() - t0)
        answers: list = [None] * self.ctx.world_size
        dist.all_gather_object(answers, None)
        probes = [answers[r] for r in self.ctx.rollout_ranks if answers[r] is not None]
        if probe is not None and probes:
            metrics["sync/probe_abs_diff"] = _probe_gap(actor, probes[0], probe, cfg.rollout.temperature)
        metrics = {k: float(v) for k, v in metrics.items()}
        box = [metrics]
        dist.broadcast_object_list(box, src=0, group=self.ctx.trainer_group)
        return box[0]

    def load_weights(self, named_tensors):
        raise NotImplementedError("weights reach rollout ranks through push()")

    def score(self, prompt_ids, response_ids, temperature=1.0):
        raise NotImplementedError("the probe runs on the rollout ranks inside push()")

    def close(self) -> None:
        self._command({"op": "stop"})


def rollout_rank_main(cfg: Config, ctx) -> int:
    """The loop of a rollout rank: serve generate / sync commands until told to stop."""
    from rlengine.distributed import barrier
    from rlengine.model import load_tokenizer, resolve_model_path
    from rlengine.weight_sync import WeightBroadcaster

    model_path = resolve_model_path(cfg.model.path)
    tokenizer = load_tokenizer(model_path)
    sampler = build_local_sampler(cfg, model_path, tokenizer)
    bcast = WeightBroadcaster(ctx.sync_group, src_rank=0, bucket_mb=cfg.rollout.bucket_mb,
                              timeout_s=cfg.rollout.sync_timeout_s)
    my_index = ctx.rollout_ranks.index(ctx.rank)
    try:
        while True:
            box = [None]
            dist.broadcast_object_list(box, src=0)
            cmd = box[0]
            if cmd["op"] == "stop":
                break
            if cmd["op"] == "generate":
                everyone: list = [None] * ctx.world_size
                dist.all_gather_object(everyone, None)
                prompts = [p for r in ctx.trainer_ranks for p in everyone[r]]
                lo, hi = _split(len(prompts), len(ctx.rollout_ranks), my_index)
                gen = sampler.generate(prompts[lo:hi], cmd["n"], cmd["sampling"])
                gen.prompt_index = [i + lo for i in gen.prompt_index]
                out: list = [None] * ctx.world_size
                dist.all_gather_object(out, gen)
            elif cmd["op"] == "sync":
                bcast.receive(lambda named: sampler.load_weights(named))
                probe = cmd.get("probe")
                lp = sampler.score(probe[0], probe[1], temperature=cfg.rollout.temperature) if probe else None
                answers: list = [None] * ctx.world_size
                dist.all_gather_object(answers, lp)
    finally:
        sampler.close()
    barrier()
    return 0
