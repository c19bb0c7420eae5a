"""The rlengine training loop, top to bottom.

    deepspeed --hostfile launch/hosts rlengine/train.py --config configs/default.yaml [key=value ...]

One training step = one rollout batch and all its optimizer updates:
    rollout -> reward -> old / reference log-probs -> advantages
    -> num_iterations x mini-batches of optimizer steps with the configured loss
    -> push the new weights to the sampler (checksummed, probed) -> log -> checkpoint
Every phase is named and timed (`time/<phase>` in metrics.jsonl).
"""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from pathlib import Path

if __package__ in (None, ""):  # run as a script by the deepspeed launcher: make `rlengine` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from rlengine.config import Config, ConfigError, parse_cli, to_dict, to_yaml
from rlengine.rewards.registry import RewardError


class PhaseTimer:
    """`with timer("rollout"): ...` accumulates seconds per named phase."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0


def describe_sample(step: int, index: int, prompt, text: str) -> str:
    """Which sample, for an error message: its place in the step, its data source and row, its text."""
    head = text[:80].replace("\n", " ") + ("..." if len(text) > 80 else "")
    return f"sample {index} of step {step} on this rank (source {prompt.source!r}, row {prompt.row}): {head!r}"


def push_or_stop(actor, sampler, ctx, cfg: Config, probe) -> dict:
    """`push_weights`; when it stops the run (every trainer rank at once), the sampler is closed
    first so that rollout ranks leave their command loop instead of waiting for the next command."""
    from rlengine.placement import ProbeFailure, push_weights

    try:
        return push_weights(actor, sampler, ctx, cfg, probe=probe)
    except ProbeFailure:
        sampler.close()
        raise


class TrainingStopped(RuntimeError):
    """Raised when the run cannot continue (e.g. too many non-finite steps in a row)."""


# --------------------------------------------------------------------------- checks before loading

def check_inputs(cfg: Config) -> None:
    """Fail in one line, before any model loads, on a missing model path or dataset file."""
    from rlengine.model import EMBEDDED

    for key, path in (("model.path", cfg.model.path), ("model.ref_path", cfg.model.ref_path)):
        if path and path != EMBEDDED and not _looks_like_hub_name(path) and not Path(path).expanduser().exists():
            raise ConfigError(f"{key}: model directory {path!r} does not exist (model.path=embedded uses the "
                              "bundled SmolLM2-135M-Instruct)")
    sources = cfg.data.mixture or [cfg.data]
    for i, src in enumerate(sources):
        key = f"data.mixture.{i}.path" if cfg.data.mixture else "data.path"
        if src.path and src.path.endswith((".jsonl", ".json", ".parquet")) and not Path(src.path).expanduser().is_file():
            raise ConfigError(f"{key}: dataset file {src.path!r} does not exist")
    from rlengine.checkpoint import CheckpointManager

    ckpt_root = Path(cfg.run.output_dir) / "checkpoints"
    earlier = CheckpointManager.find_complete(ckpt_root)
    elsewhere = cfg.run.resume not in ("auto", "never") and Path(cfg.run.resume).resolve().parent != ckpt_root.resolve()
    if earlier and (cfg.run.resume == "never" or elsewhere):
        # a fresh run there would prune (by step number) or later resume the other run's checkpoints
        raise ConfigError(f"run.resume={cfg.run.resume}, but run.output_dir {cfg.run.output_dir!r} holds checkpoints of an "
                          f"earlier run ({earlier[0].name} .. {earlier[-1].name}): set run.resume=auto to continue "
                          "it, or choose another run.output_dir")


def warn_emulated_bf16(cfg: Config, is_main: bool) -> str | None:
    """A warning (printed by the main rank, returned) when bf16 was asked for where it is emulated."""
    from rlengine.runtime import detect_accelerator, native_bf16

    asked = [k for k, v in (("model.dtype", cfg.model.dtype), ("rollout.dtype", cfg.rollout.dtype)) if v == "bf16"]
    if not asked or native_bf16():
        return None
    where = ("this GPU does not support bf16" if detect_accelerator() == "cuda" else
             "this CPU has no native bf16 (AVX512-BF16 / AMX): torch emulates bf16 matmuls, 26x slower than "
             "fp32 measured on an AVX2 box")
    message = (f"rlengine: warning: {' and '.join(asked)}=bf16, but {where}. "
               "dtype=auto picks fp32 here and bf16 where it is native.")
    if is_main:
        print(message, file=sys.stderr, flush=True)
    return message


def _looks_like_hub_name(path: str) -> bool:
    """`org/name` (resolved from the local HF cache by rlengine.model), as opposed to a local path."""
    return path.count("/") == 1 and not path.startswith((".", "/", "~")) and not Path(path).exists()


# --------------------------------------------------------------------------- one training step's math

def mini_batches(num_groups: int, num_minibatches: int, group_size: int, generator: torch.Generator):
    """Shuffle whole groups, split them into mini-batches; yield sequence-index tensors."""
    order = torch.randperm(num_groups, generator=generator)
    per = num_groups // num_minibatches
    for k in range(num_minibatches):
        groups = order[k * per:(k + 1) * per]
        yield (groups.unsqueeze(1) * group_size + torch.arange(group_size)).flatten()


def probe_sequence(gen, probe_tokens: int) -> tuple[list[int], list[int]] | None:
    """The fixed sequence both the sampler and the trainer score after a push: the tail of the
    first prompt and the head of its response, `probe_tokens` in all (None without a response).
    Any sequence proves the sampler holds the trainer's weights; a short one keeps the probe cheap
    (the full 267-token default sample cost 2.4 s of a 27 s step on 2 cores, 64 tokens ~0.6 s)."""
    if not gen.response_ids or not gen.response_ids[0]:
        return None
    response = list(gen.response_ids[0][:max(1, probe_tokens // 2)])
    prompt = list(gen.prompt_ids[0][-max(1, probe_tokens - len(response)):])
    return prompt, response


def subset(batch, idx: torch.Tensor):
    from rlengine.actor import SeqBatch

    return SeqBatch(*(getattr(batch, f)[idx] for f in ("input_ids", "attention_mask", "resp_pos", "resp_mask", "targets")))


def run_updates(actor, cfg: Config, ctx, batch, old_logp, ref_logp, advantages, generator, record_tokens: bool,
                loss_fn):
    """num_iterations x mini-batches of optimizer steps on this rank's sequences.

    Aggregation is exact over the *global* mini-batch: each micro-batch's loss (aggregated over
    the micro-batch by the loss) is rescaled by its share of the global units (tokens for
    token-mean, sequences otherwise) and by grad_accum * world, which DeepSpeed divides out."""
    from rlengine.distributed import all_reduce
    from rlengine.losses import aggregate, kl_penalty

    t, lc = cfg.train, cfg.loss
    group = ctx.trainer_group
    B = batch.input_ids.shape[0]
    G = cfg.rollout.group_size
    n_groups = B // G
    n_mini = cfg.rollout.prompts_per_step // (t.mini_batch_prompts or cfg.rollout.prompts_per_step)
    world = ctx.num_trainers
    max_len = lc.max_len or cfg.rollout.max_new_tokens
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    mins, maxs = [], []
    losses, grad_norms, bad_updates = [], [], 0
    token_rows: dict[str, list] = {k: [] for k in ("update", "seq", "pos", "prob", "old_prob", "ratio", "advantage",
                                                   "weight", "rel_weight", "region", "entropy")}
    update = 0
    for _ in range(t.num_iterations):
        for idx in mini_batches(n_groups, n_mini, G, generator):
            mb_mask = batch.resp_mask[idx]
            units_local = float(mb_mask.sum()) if lc.agg == "token-mean" else float(len(idx))
            units_global = all_reduce([units_local], group=group)[0]
            micro = [idx[i:i + t.micro_batch_size] for i in range(0, len(idx), t.micro_batch_size)]
            gas = len(micro)
            mb_loss = 0.0
            for mi in micro:
                mb = subset(batch, mi)
                mask = mb.resp_mask
                logp, entropy = actor.logprobs(mb, cfg.rollout.temperature, with_entropy=True)
                old = logp.detach() if old_logp is None else old_logp[mi]   # None: on-policy single update
                out = loss_fn(logp, old, advantages[mi], mask, agg=lc.agg, max_len=max_len, entropy=entropy.detach())
                loss = out.loss
                if t.kl_coef > 0 and not t.kl_in_reward:
                    kl = kl_penalty(logp, ref_logp[mi], estimator=t.kl_estimator)
                    loss = loss + t.kl_coef * aggregate(kl, mask, lc.agg, max_len=max_len)
                if t.entropy_coef > 0:
                    loss = loss - t.entropy_coef * aggregate(entropy, mask, lc.agg, max_len=max_len)
                micro_units = float(mask.sum()) if lc.agg == "token-mean" else float(len(mi))
                share = micro_units / max(units_global, 1.0)
                actor.backward(loss * share * gas * world)
                stepped, gnorm = actor.step()
                mb_loss += float(loss.detach()) * share
                # metrics: token-weighted sums (ratio extremes kept apart)
                w = float(mask.sum())
                for k, v in out.metrics.items():
                    if k == "ratio_min":
                        mins.append(v)
                    elif k == "ratio_max":
                        maxs.append(v)
                    else:
                        sums[k] = sums.get(k, 0.0) + v * w
                        weights[k] = weights.get(k, 0.0) + w
                ent_mean = float((entropy.detach() * mask).sum() / mask.sum().clamp_min(1))
                sums["entropy"] = sums.get("entropy", 0.0) + ent_mean * w
                weights["entropy"] = weights.get("entropy", 0.0) + w
                if ref_logp is not None:
                    from rlengine.losses import kl_k3

                    klr = float((kl_k3(logp.detach(), ref_logp[mi]) * mask).sum() / mask.sum().clamp_min(1))
                    sums["kl_ref"] = sums.get("kl_ref", 0.0) + klr * w
                    weights["kl_ref"] = weights.get("kl_ref", 0.0) + w
                if record_tokens:
                    sel = mask.bool()
                    pos = torch.arange(mask.shape[1]).expand_as(mask)
                    seq = mi.unsqueeze(1).expand_as(mask)
                    adv = advantages[mi]
                    adv = adv.unsqueeze(1).expand_as(mask) if adv.dim() == 1 else adv
                    ratio = out.ratio
                    token_rows["update"].append(torch.full((int(sel.sum()),), update))
                    token_rows["seq"].append(seq[sel])
                    token_rows["pos"].append(pos[sel])
                    token_rows["prob"].append(logp.detach()[sel].exp())
                    token_rows["old_prob"].append(old[sel].exp())
                    token_rows["ratio"].append(ratio[sel])
                    token_rows["advantage"].append(adv[sel])
                    token_rows["weight"].append(out.weight[sel])
                    token_rows["rel_weight"].append(out.rel_weight[sel])
                    token_rows["region"].append(out.region[sel])
                    token_rows["entropy"].append(entropy.detach()[sel])
                if stepped:
                    grad_norms.append(gnorm)
            mb_loss = all_reduce([mb_loss], group=group)[0]
            losses.append(mb_loss)
            last_norm = grad_norms[-1] if grad_norms else float("nan")
            if not (torch.isfinite(torch.tensor(mb_loss)) and torch.isfinite(torch.tensor(last_norm))):
                bad_updates += 1
            update += 1
    # reduce metrics over the trainer ranks
    keys = sorted(sums)
    red = all_reduce([sums[k] for k in keys] + [weights[k] for k in keys], group=group)
    metrics = {k: red[i] / max(red[len(keys) + i], 1e-12) for i, k in enumerate(keys)}
    if mins:
        metrics["ratio_min"] = all_reduce([min(mins)], op="min", group=group)[0]
        metrics["ratio_max"] = all_reduce([max(maxs)], op="max", group=group)[0]
    finite_losses = [x for x in losses if x == x and abs(x) != float("inf")]
    metrics["loss"] = sum(finite_losses) / len(finite_losses) if finite_losses else float("nan")
    finite_norms = [g for g in grad_norms if g == g and abs(g) != float("inf")]
    metrics["grad_norm"] = sum(finite_norms) / len(finite_norms) if finite_norms else float("nan")
    metrics["nonfinite_updates"] = float(bad_updates)
    metrics["optimizer_updates"] = float(update)
    tokens = {k: torch.cat([torch.as_tensor(x) for x in v]) for k, v in token_rows.items() if v} if record_tokens else None
    return metrics, bad_updates, tokens


@torch.no_grad()
def batched_logprobs(fn, batch, micro: int, temperature: float) -> torch.Tensor:
    """Log-probs of every response token, micro-batch by micro-batch, without gradient."""
    B = batch.input_ids.shape[0]
    out = torch.zeros(batch.resp_mask.shape)
    for i in range(0, B, micro):
        idx = torch.arange(i, min(B, i + micro))
        out[idx] = fn(subset(batch, idx), temperature)
    return out


# --------------------------------------------------------------------------- the run

def main(argv: list[str] | None = None) -> int:
    # 0. config first: every config error is reported before anything heavy starts ----------
    try:
        cfg, _ = parse_cli(argv, "rlengine training loop")
        check_inputs(cfg)
    except ConfigError as e:
        print(f"rlengine: config error: {e}", file=sys.stderr)
        return 2
    from rlengine.distributed import barrier, init_distributed
    from rlengine.placement import ProbeFailure

    ctx = init_distributed(cfg)
    warn_emulated_bf16(cfg, ctx.is_main)
    if not ctx.is_trainer:
        from rlengine.placement import rollout_rank_main

        return rollout_rank_main(cfg, ctx)
    try:
        code = train(cfg, ctx)
    except (TrainingStopped, ProbeFailure) as e:  # every trainer rank stops at the same step
        if ctx.is_main:
            print(f"rlengine: training stopped: {e}", file=sys.stderr)
        code = 3
    except RewardError as e:      # this rank's samples only: exit now, the launcher stops the others
        print(f"rlengine: training stopped: {e}", file=sys.stderr, flush=True)
        return 4
    # no barrier after an exception: a rank that raised exits at once with its traceback and the
    # launcher stops the others (a barrier there hung forever beside a rank inside a collective)
    barrier()
    return code


def train(cfg: Config, ctx) -> int:
    import numpy as np
    from tqdm import tqdm

    from rlengine.actor import Actor, ReferenceModel, make_batch
    from rlengine.advantages import group_advantages
    from rlengine.checkpoint import CheckpointManager
    from rlengine.data import build_prompt_stream
    from rlengine.distributed import all_reduce, barrier
    from rlengine.logger import MetricsLogger, write_token_dump
    from rlengine.losses import LOSSES
    from rlengine.model import load_tokenizer, resolve_model_path
    from rlengine.placement import make_sampler
    from rlengine.rewards import RewardPool, check_finite, get_reward
    from rlengine.rollout.base import SamplingParams
    from rlengine.runtime import memory_gb

    out_dir = Path(cfg.run.output_dir)
    group = ctx.trainer_group
    trainer_barrier = lambda: barrier(group)  # noqa: E731
    torch.manual_seed(cfg.run.seed + ctx.rank)
    np.random.seed(cfg.run.seed + ctx.rank)

    # 1. the components -----------------------------------------------------------------------
    model_path = resolve_model_path(cfg.model.path) if ctx.is_main else None
    trainer_barrier()
    model_path = resolve_model_path(cfg.model.path)
    tokenizer = load_tokenizer(model_path)
    prompts = build_prompt_stream(cfg.data, tokenizer)
    rewards = RewardPool(cfg.reward.num_workers, cfg.reward.timeout_s)
    reward_parts = get_reward(cfg.reward.name).parts                # logged as reward/<part>
    loss_fn = LOSSES.build(cfg.loss.name, **cfg.loss.params)   # resolved and validated once
    R, G, T = cfg.rollout, cfg.rollout.group_size, cfg.rollout.temperature
    local_prompts = R.prompts_per_step // ctx.num_trainers
    mb_prompts = cfg.train.mini_batch_prompts or R.prompts_per_step
    n_mini = R.prompts_per_step // mb_prompts
    grad_accum = -(-(mb_prompts // ctx.num_trainers * G) // cfg.train.micro_batch_size)
    total_updates = cfg.run.total_steps * cfg.train.num_iterations * n_mini
    dp_ranks = ctx.trainer_ranks if ctx.rollout_ranks else None
    actor = Actor(cfg, model_path, grad_accum, total_updates, dp_group=group, dp_ranks=dp_ranks)
    ref = None
    if cfg.train.kl_coef > 0:
        ref = ReferenceModel(cfg, resolve_model_path(cfg.model.ref_path or cfg.model.path),
                             dp_group=group, dp_ranks=dp_ranks)
    sampler = make_sampler(cfg, ctx, model_path, tokenizer)
    ckpt = CheckpointManager(out_dir / "checkpoints", cfg.run.keep_last, ctx.rank, trainer_barrier)
    logger = MetricsLogger(out_dir, enabled=ctx.is_main, tensorboard=cfg.run.tensorboard,
                           wandb_project=cfg.run.wandb_project, wandb_run_name=cfg.run.wandb_run_name,
                           config=to_dict(cfg))
    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(to_yaml(cfg))

    # 2. resume -------------------------------------------------------------------------------
    start_step, bad_in_a_row = 0, 0
    ckpt.clean_stale()
    resume_from = None
    if cfg.run.resume == "auto":
        resume_from = ckpt.latest()
    elif cfg.run.resume != "never":
        resume_from = Path(cfg.run.resume)
    if resume_from is not None:
        state = ckpt.load(resume_from, actor.engine)
        prompts.load_state_dict(state["data"])
        start_step, bad_in_a_row = state["step"], state.get("bad_in_a_row", 0)
        if ctx.is_main:
            print(f"rlengine: resumed from {resume_from} at step {start_step}", flush=True)
    logger.truncate_after(start_step)       # every start: a killed run's lines past its checkpoint go
    ckpt.drop_after(start_step)              # and so do checkpoints of a branch abandoned by an older resume
    last_checkpoint_s = None
    sync_metrics = push_or_stop(actor, sampler, ctx, cfg, probe=None)  # the sampler starts from the actor

    sampling = SamplingParams(temperature=T, top_p=R.top_p, max_new_tokens=R.max_new_tokens, stop=list(R.stop))
    bar = tqdm(total=cfg.run.total_steps, initial=start_step, disable=not ctx.is_main, desc="rlengine",
               dynamic_ncols=True)

    # 3. the loop -----------------------------------------------------------------------------
    for step in range(start_step + 1, cfg.run.total_steps + 1):
        timer = PhaseTimer()
        t_step = time.perf_counter()

        with timer("rollout"):
            batch_prompts = prompts.next_batch(R.prompts_per_step)          # same on every rank
            mine = batch_prompts[ctx.trainer_index * local_prompts:(ctx.trainer_index + 1) * local_prompts]
            sampling.seed = cfg.run.seed * 100003 + step * 131 + ctx.rank
            gen = sampler.generate([p.prompt_ids for p in mine], G, sampling)
            batch = make_batch(gen.prompt_ids, gen.response_ids, tokenizer.pad_token_id)
            sampler_logp = torch.zeros(batch.resp_mask.shape)
            for i, lp in enumerate(gen.response_logprobs):
                sampler_logp[i, :len(lp)] = torch.tensor(lp)

        with timer("old_logprobs"):
            # a single update on the whole batch is exactly on-policy: pi_old = sg(pi_theta), no extra pass
            on_policy = cfg.train.num_iterations == 1 and n_mini == 1 and cfg.train.tis_cap is None
            old_logp = None if on_policy else batched_logprobs(
                lambda b, temp: actor.logprobs(b, temp, with_entropy=False)[0], batch, cfg.train.micro_batch_size, T)
        ref_logp = None
        if ref is not None:
            with timer("ref_logprobs"):
                ref_logp = batched_logprobs(ref.logprobs, batch, cfg.train.micro_batch_size, T)

        with timer("reward"):
            answers = [mine[i].answer for i in gen.prompt_index]
            scored = rewards.score_detailed(gen.texts, answers, reward=cfg.reward.name)
            check_finite(scored, cfg.reward.name, lambda i: describe_sample(step, i, mine[gen.prompt_index[i]],
                                                                            gen.texts[i]))
            reward = torch.tensor([s["reward"] for s in scored], dtype=torch.float32)   # [B]
            if ref_logp is not None and cfg.train.kl_in_reward:
                from rlengine.losses import kl_penalty

                seq_kl = (kl_penalty(sampler_logp if old_logp is None else old_logp, ref_logp,
                                     estimator=cfg.train.kl_estimator) * batch.resp_mask).sum(1)
                reward = reward - cfg.train.kl_coef * seq_kl
            advantages = group_advantages(reward, G, norm_std=cfg.train.adv_norm_std)
            if cfg.train.adv_batch_norm:
                s, s2, n = all_reduce([float(advantages.sum()), float((advantages ** 2).sum()), float(len(advantages))],
                                      group=group)
                mean = s / n
                std = max((s2 / n - mean ** 2), 0.0) ** 0.5
                advantages = (advantages - mean) / (std + 1e-6)
            if cfg.train.dynamic_filter:  # DAPO: groups with equal rewards carry no signal: drop their tokens
                flat = reward.view(-1, G)
                keep = (flat.max(1).values != flat.min(1).values).repeat_interleave(G)
                batch.resp_mask = batch.resp_mask * keep.unsqueeze(1).float()
            if cfg.train.tis_cap is not None:  # truncated IS for the sampler/trainer mismatch
                tis = (old_logp - sampler_logp).exp().clamp(max=cfg.train.tis_cap) * batch.resp_mask
                advantages = advantages.unsqueeze(1) * tis                    # [B, T]

        with timer("train"):
            # the mini-batch shuffle is a function of (seed, step) alone: a resumed run draws what the
            # uninterrupted run drew at that step (one generator carried across steps was re-seeded)
            shuffle_gen = torch.Generator().manual_seed(cfg.run.seed * 1000 + step)
            dump = cfg.run.token_dump_every > 0 and step % cfg.run.token_dump_every == 0 and ctx.is_main
            metrics, bad, tokens = run_updates(actor, cfg, ctx, batch, old_logp, ref_logp, advantages,
                                               shuffle_gen, record_tokens=dump, loss_fn=loss_fn)
        bad_in_a_row = bad_in_a_row + 1 if bad else 0
        if bad_in_a_row >= cfg.run.max_bad_steps:
            sampler.close()   # every trainer rank stops at this step: release the rollout ranks too
            raise TrainingStopped(
                f"{bad_in_a_row} steps in a row had a non-finite loss or gradient (step {step}). Look at: the "
                "learning rate (train.lr), advantages of degenerate groups, bf16 overflow (try model.dtype=fp32), "
                "and the ratio extremes (ratio_min/ratio_max) in metrics.jsonl.")

        with timer("sync"):
            probe = probe_sequence(gen, R.probe_tokens)
            sync_metrics = push_or_stop(actor, sampler, ctx, cfg, probe=probe)

        # 4. log ------------------------------------------------------------------------------
        n_resp_tokens = float(batch.resp_mask.sum())
        lens = torch.tensor([len(r) for r in gen.response_ids], dtype=torch.float32)
        red = all_reduce([float(reward.sum()), float((reward ** 2).sum()), float(len(reward)),
                          float(lens.sum()), n_resp_tokens] +
                         [float(sum(s.get(k, 0.0) for s in scored)) for k in reward_parts], group=group)
        n = red[2]
        step_time = time.perf_counter() - t_step
        record = {
            "reward/mean": red[0] / n, "reward/std": max(red[1] / n - (red[0] / n) ** 2, 0.0) ** 0.5,
            **{f"reward/{part}": total / n for part, total in zip(reward_parts, red[5:])},   # as the reward declares
            **metrics,
            "lr": actor.lr(),
            "response_len/mean": red[3] / n,
            "response_len/max": all_reduce([float(lens.max()) if len(lens) else 0.0], op="max", group=group)[0],
            **{f"time/{k}": v for k, v in timer.seconds.items()},
            "time/step": step_time,
            "tokens_per_s": red[4] / step_time, "samples_per_s": n / step_time,
            **sync_metrics,
            "nonfinite_skipped": float(bad),
            "reward_pool/timeouts": float(rewards.stats.get("timeouts", 0)),
            "reward_pool/errors": float(rewards.stats.get("errors", 0)),
            "data/draws": float(prompts.state_dict()["draws"]),    # prompts consumed so far
            "data/prompts": float(prompts.stats.get("num_prompts", 0)),       # usable prompts loaded
            "data/bad_rows": float(prompts.stats.get("bad_rows", 0)),          # skipped at load (skip_bad_rows)
            "data/dropped_too_long": float(prompts.stats.get("dropped_too_long", 0)),   # > max_prompt_tokens
            "data/epoch": float(prompts.state_dict()["sources"][0]["epoch"]),
            "data/index": float(prompts.state_dict()["sources"][0]["index"]),
        }
        mem = memory_gb()   # the largest trainer rank's
        record.update(zip(mem, all_reduce(list(mem.values()), op="max", group=group)))
        if tokens is not None:
            tokens["step"] = torch.full_like(tokens["seq"], step)
            write_token_dump(out_dir / "tokens" / f"step_{step:06d}.parquet", tokens, cfg.loss.name,
                             cfg.loss.params["eps_low"], cfg.loss.params["eps_high"],
                             cfg.run.token_dump_max, seed=step)

        # 5. log, then checkpoint: a step's line is written before its checkpoint commits, so a kill
        # at any moment leaves each step's line exactly once after resume's truncation ----------
        if last_checkpoint_s is not None:
            record["time/checkpoint"], last_checkpoint_s = last_checkpoint_s, None   # the previous step's save
        logger.log(step, record)
        if (cfg.run.save_every and step % cfg.run.save_every == 0) or step == cfg.run.total_steps:
            with timer("checkpoint"):
                ckpt.save(step, actor.engine, {"data": prompts.state_dict(), "bad_in_a_row": bad_in_a_row},
                          to_yaml(cfg))
            last_checkpoint_s = timer.seconds["checkpoint"]
        bar.set_postfix(reward=f"{record['reward/mean']:.3f}", s_per_step=f"{step_time:.1f}")
        bar.update(1)

    bar.close()
    if cfg.run.export_final:
        actor.save_pretrained(str(out_dir / "final"), tokenizer, is_writer=ctx.is_main)
    logger.close()
    rewards.close()
    sampler.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
