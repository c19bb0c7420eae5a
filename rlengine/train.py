"""The rlengine training loop, top to bottom.

    deepspeed --hostfile launch/hosts rlengine/train.py --config configs/default.yaml [key=value ...]

One training step = one rollout batch (`RolloutBatch`) and all its optimizer updates:
    rollout -> old / reference log-probs -> reward -> shape_advantages
    -> num_iterations x mini-batches of `Actor.update` with the configured loss
    -> placement.push of the new weights (verified: names, digest, probe) -> log -> checkpoint
Every phase is named and timed (`time/<phase>` in metrics.jsonl); docs/architecture.md draws it.
"""
from __future__ import annotations

import json
import math
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
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


def main(argv: list[str] | None = None) -> int:
    # 0. config first: every config error is reported before anything heavy starts ----------
    try:
        cfg, _ = parse_cli(argv, "rlengine training loop")
        check_inputs(cfg)
    except ConfigError as e:
        print(f"rlengine: config error: {e}", file=sys.stderr)
        return 2
    from rlengine.distributed import finish_distributed, init_distributed
    from rlengine.async_rollout import StaleBatch
    from rlengine.placement import PushFailure
    from rlengine.watchdog import collective_failure, stop_now

    from rlengine.network import NetworkSetupError

    try:
        ctx = init_distributed(cfg)
    except NetworkSetupError as e:
        print(f"rlengine: network set-up: {e}", file=sys.stderr, flush=True)
        return 2
    warn_emulated_bf16(cfg, ctx.is_main)
    try:
        if ctx.is_trainer:
            code = train(cfg, ctx)
        else:
            from rlengine.placement import serve

            code = serve(cfg, ctx)
    except (TrainingStopped, PushFailure, StaleBatch) as e:  # every trainer rank stops at the same step
        if ctx.is_main:
            print(f"rlengine: training stopped: {e}", file=sys.stderr)
        code = 3
    except RewardError as e:      # this rank's samples only: exit now, the launcher stops the others
        print(f"rlengine: training stopped: {e}", file=sys.stderr, flush=True)
        return 4
    except Exception as e:
        if (why := collective_failure(e)) is None:
            raise
        # a peer died or hangs: say so once and go, without a clean-up that would wait on it again
        stop_now(f"a collective with the other ranks failed: {why}")
    # no barrier after an exception: a rank that raised exits at once with its traceback and the
    # launcher stops the others (a barrier there hung forever beside a rank inside a collective)
    finish_distributed()
    return code


# --------------------------------------------------------------------------- the run's parts

@dataclass
class Run:
    """Everything a training run holds, built once (`build`)."""

    cfg: Config
    ctx: object
    tokenizer: object
    prompts: object                 # data.PromptStream
    rewards: object                 # rewards.RewardPool
    reward_parts: tuple             # logged as reward/<part>, as the reward declares them
    loss_fn: object                 # losses.LossFn, resolved and validated once
    actor: object                   # actor.Actor
    ref: object                     # actor.ReferenceModel or None
    placement: object               # placement.Colocated / Separate
    ckpt: object                    # checkpoint.CheckpointManager
    logger: object                  # logger.MetricsLogger
    num_minibatches: int


def build(cfg: Config, ctx) -> Run:
    import numpy as np

    from rlengine.actor import Actor, ReferenceModel
    from rlengine.checkpoint import CheckpointManager
    from rlengine.data import build_prompt_stream
    from rlengine.distributed import barrier
    from rlengine.logger import MetricsLogger
    from rlengine.losses import LOSSES
    from rlengine.model import load_tokenizer, resolve_model_path
    from rlengine.placement import make_placement
    from rlengine.rewards import RewardPool, get_reward

    out_dir, group, R = Path(cfg.run.output_dir), ctx.trainer_group, cfg.rollout
    torch.manual_seed(cfg.run.seed + ctx.rank)
    np.random.seed(cfg.run.seed + ctx.rank)
    if ctx.is_main:
        resolve_model_path(cfg.model.path)          # one rank unpacks / resolves, the others then read
    barrier(group)
    model_path = resolve_model_path(cfg.model.path)
    tokenizer = load_tokenizer(model_path)
    mb_prompts = cfg.train.mini_batch_prompts or R.prompts_per_step
    num_minibatches = R.prompts_per_step // mb_prompts
    grad_accum = -(-(mb_prompts // ctx.num_trainers * R.group_size) // cfg.train.micro_batch_size)
    total_updates = cfg.run.total_steps * cfg.train.num_iterations * num_minibatches
    dp_ranks = ctx.trainer_ranks if ctx.rollout_ranks else None
    actor = Actor(cfg, model_path, grad_accum, total_updates, dp_group=group, dp_ranks=dp_ranks)
    ref = None
    if cfg.train.kl_coef > 0:
        ref = ReferenceModel(cfg, resolve_model_path(cfg.model.ref_path or cfg.model.path), dp_group=group,
                             dp_ranks=dp_ranks)
    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(to_yaml(cfg))
        (out_dir / "world.json").write_text(json.dumps(ctx.world, indent=1))
    return Run(cfg, ctx, tokenizer, build_prompt_stream(cfg.data, tokenizer),
               RewardPool(cfg.reward.num_workers, cfg.reward.timeout_s), get_reward(cfg.reward.name).parts,
               LOSSES.build(cfg.loss.name, **cfg.loss.params), actor, ref,
               make_placement(cfg, ctx, model_path, tokenizer),
               CheckpointManager(out_dir / "checkpoints", cfg.run.keep_last, ctx.rank, lambda: barrier(group)),
               MetricsLogger(out_dir, enabled=ctx.is_main, tensorboard=cfg.run.tensorboard,
                             wandb_project=cfg.run.wandb_project, wandb_run_name=cfg.run.wandb_run_name,
                             config=to_dict(cfg)),
               num_minibatches)


def resume(run: Run) -> tuple[int, int]:
    """(start step, non-finite steps in a row) from `run.resume`; every start then drops what a
    killed run wrote past its checkpoint: metrics lines and checkpoints of an abandoned branch."""
    cfg = run.cfg
    run.ckpt.clean_stale()
    where = run.ckpt.latest() if cfg.run.resume == "auto" else None if cfg.run.resume == "never" else Path(cfg.run.resume)
    start, bad_in_a_row = 0, 0
    if where is not None:
        state = run.ckpt.load(where, run.actor.engine)
        run.prompts.load_state_dict(state["data"])
        start, bad_in_a_row = state["step"], state.get("bad_in_a_row", 0)
        if run.ctx.is_main:
            print(f"rlengine: resumed from {where} at step {start}", flush=True)
    run.logger.truncate_after(start)
    run.ckpt.drop_after(start)
    return start, bad_in_a_row


# --------------------------------------------------------------------------- one step's phases

def rollout(run: Run, plan, step: int, metrics):
    """The step's prompts, this rank's responses, and the batch built from them."""
    from rlengine.batch import RolloutBatch

    planned, gen = plan.next(step)
    metrics.means(run.placement.rollout_metrics())
    return RolloutBatch.from_generation(gen, run.tokenizer.pad_token_id, run.cfg.rollout.group_size), gen, planned


def score(run: Run, step: int, batch, gen, mine, metrics) -> None:
    """batch.reward and batch.reward_parts; a non-finite reward stops the run naming the sample."""
    from rlengine.rewards import check_finite

    cfg = run.cfg
    answers = [mine[i].answer for i in gen.prompt_index]
    scored = run.rewards.score_detailed(gen.texts, answers, reward=cfg.reward.name)
    check_finite(scored, cfg.reward.name,
                 lambda i: describe_sample(step, i, mine[gen.prompt_index[i]], gen.texts[i]))
    batch.reward = torch.tensor([s["reward"] for s in scored], dtype=torch.float32)        # [B]
    batch.reward_parts = scored
    n = float(len(scored))
    metrics.mean("reward/mean", float(batch.reward.mean()), n)
    metrics.mean("reward/_square", float((batch.reward ** 2).mean()), n)
    for part in run.reward_parts:
        metrics.mean(f"reward/{part}", sum(s.get(part, 0.0) for s in scored) / n, n)


def optimise(run: Run, batch, step: int, metrics, recorder) -> int:
    """num_iterations x mini-batches of optimizer steps; returns how many were non-finite (skipped)."""
    cfg = run.cfg
    # the shuffle is a function of (seed, step) alone: a resumed run draws what the uninterrupted
    # run drew at that step (one generator carried across steps was re-seeded on resume)
    shuffle = torch.Generator().manual_seed(cfg.run.seed * 1000 + step)
    bad = updates = 0
    for _ in range(cfg.train.num_iterations):
        for idx in batch.minibatches(run.num_minibatches, shuffle):
            grad_norm = run.actor.update(batch, idx, run.loss_fn, cfg, metrics, recorder)
            if recorder is not None:
                recorder.next_update()
            updates += 1
            if math.isfinite(grad_norm):   # the global norm: every rank takes the same decision
                metrics.mean("grad_norm", grad_norm)
            else:
                bad += 1
    metrics.max("optimizer_updates", updates)
    return bad


def step_record(run: Run, step: int, batch, gen, planned, metrics, timer: PhaseTimer, seconds: float,
                bad: int) -> dict:
    """The step's metrics.jsonl line: `metrics` reduced over the trainer ranks, and the rank-0 views."""
    from rlengine.runtime import memory_gb

    lens = [len(r) for r in gen.response_ids]
    metrics.mean("response_len/mean", sum(lens) / max(len(lens), 1), len(lens))
    metrics.max("response_len/max", max(lens, default=0))
    metrics.total("samples", len(lens))
    metrics.total("tokens", float(batch.resp_mask.sum()))
    for key, value in memory_gb().items():       # the largest trainer rank's
        metrics.max(key, value)
    record = metrics.reduce(run.ctx.trainer_group)
    square = record.pop("reward/_square")
    record["reward/std"] = max(square - record["reward/mean"] ** 2, 0.0) ** 0.5
    record["loss"] = record.pop("loss_sum") / max(record["optimizer_updates"], 1.0)
    record["nonfinite_updates"] = record["nonfinite_skipped"] = float(bad)
    record["tokens_per_s"] = record.pop("tokens") / seconds
    record["samples_per_s"] = record.pop("samples") / seconds
    stats, data = run.prompts.stats, planned.data_state          # the trained step's, not the draws ahead
    record.update({
        "lr": run.actor.lr(), **{f"time/{k}": v for k, v in timer.seconds.items()}, "time/step": seconds,
        "reward_pool/timeouts": float(run.rewards.stats.get("timeouts", 0)),
        "reward_pool/errors": float(run.rewards.stats.get("errors", 0)),
        "data/draws": float(data["draws"]),                                   # prompts consumed so far
        "data/prompts": float(stats.get("num_prompts", 0)),                  # usable prompts loaded
        "data/bad_rows": float(stats.get("bad_rows", 0)),                    # skipped at load (skip_bad_rows)
        "data/dropped_too_long": float(stats.get("dropped_too_long", 0)),    # > max_prompt_tokens
        "data/epoch": float(data["sources"][0]["epoch"]), "data/index": float(data["sources"][0]["index"]),
        "data/prompt_ids": planned.ids(),                                     # source:row of each prompt trained
    })
    record.setdefault("staleness/mean", 0.0)          # the synchronous loop trains on the newest weights
    record.setdefault("staleness/max", 0.0)
    return record


# --------------------------------------------------------------------------- the loop

def train(cfg: Config, ctx) -> int:
    from tqdm import tqdm

    from rlengine.advantages import shape_advantages
    from rlengine.correction import correction_of
    from rlengine.logger import TokenRecorder
    from rlengine.prompt_plan import PromptPlan
    from rlengine.rollout.base import SamplingParams
    from rlengine.step_metrics import StepMetrics

    run = build(cfg, ctx)
    R, T, out_dir = cfg.rollout, cfg.rollout.temperature, Path(cfg.run.output_dir)
    start, bad_in_a_row = resume(run)
    run.placement.push(run.actor, version=start)            # the sampler starts from the actor's weights
    sampling = SamplingParams(temperature=T, top_p=R.top_p, max_new_tokens=R.max_new_tokens, stop=list(R.stop))
    plan = PromptPlan(cfg, ctx, run.prompts, run.placement, sampling, start)
    # a single update on the whole batch is exactly on-policy: pi_old = sg(pi_theta), no extra pass;
    # KL in the reward needs pi_old itself (the sampler's log-probs are after top-p, not pi_theta's)
    on_policy = (cfg.train.num_iterations == 1 and run.num_minibatches == 1 and correction_of(cfg.train).mode == "none"
                 and not (cfg.train.kl_in_reward and cfg.train.kl_coef > 0))
    bar = tqdm(total=cfg.run.total_steps, initial=start, disable=not ctx.is_main, desc="rlengine", dynamic_ncols=True)
    last_save_s = None
    for step in range(start + 1, cfg.run.total_steps + 1):
        timer, metrics, t0 = PhaseTimer(), StepMetrics(), time.perf_counter()
        dump = ctx.is_main and cfg.run.token_dump_every > 0 and step % cfg.run.token_dump_every == 0
        recorder = TokenRecorder() if dump else None
        with timer("rollout"):
            batch, gen, planned = rollout(run, plan, step, metrics)
        if not on_policy:
            with timer("old_logprobs"):
                batch.old_logp = run.actor.batch_logprobs(batch.seqs, T, cfg.train.micro_batch_size)
        if run.ref is not None:
            with timer("ref_logprobs"):
                batch.ref_logp = run.ref.batch_logprobs(batch.seqs, T, cfg.train.micro_batch_size)
        with timer("reward"):
            score(run, step, batch, gen, planned.mine, metrics)
        with timer("advantage"):
            metrics.means(shape_advantages(batch, cfg.train, ctx.trainer_group))
        with timer("train"):
            bad = optimise(run, batch, step, metrics, recorder)
        bad_in_a_row = bad_in_a_row + 1 if bad else 0
        if bad_in_a_row >= cfg.run.max_bad_steps:
            run.placement.close()   # every trainer rank stops at this step: release the rollout ranks too
            raise TrainingStopped(
                f"{bad_in_a_row} steps in a row had a non-finite loss or gradient (step {step}). Look at: the "
                "learning rate (train.lr), advantages of degenerate groups, bf16 overflow (try model.dtype=fp32), "
                "and the ratio extremes (ratio_min/ratio_max) in metrics.jsonl.")
        with timer("sync"):
            metrics.means(run.placement.push(run.actor, probe=batch.probe(R.probe_tokens), version=step))
        record = step_record(run, step, batch, gen, planned, metrics, timer, time.perf_counter() - t0, bad)
        if recorder is not None:
            recorder.write(out_dir / "tokens" / f"step_{step:06d}.parquet", step, cfg.loss.name,
                           cfg.loss.params["eps_low"], cfg.loss.params["eps_high"], cfg.run.token_dump_max)
        if last_save_s is not None:
            record["time/checkpoint"], last_save_s = last_save_s, None   # the previous step's save
        # a step's line is written before its checkpoint commits: after resume's truncation each
        # step's line is there exactly once, whatever moment a kill lands
        run.logger.log(step, record)
        if (cfg.run.save_every and step % cfg.run.save_every == 0) or step == cfg.run.total_steps:
            t_save = time.perf_counter()
            run.ckpt.save(step, run.actor.engine, {"data": planned.data_state, "bad_in_a_row": bad_in_a_row},
                          to_yaml(cfg))
            last_save_s = time.perf_counter() - t_save
        bar.set_postfix(reward=f"{record['reward/mean']:.3f}", s_per_step=f"{record['time/step']:.1f}")
        bar.update(1)
    bar.close()
    if cfg.run.export_final:
        run.actor.save_pretrained(str(out_dir / "final"), run.tokenizer, is_writer=ctx.is_main)
    for part in (run.logger, run.rewards, run.placement):
        part.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
