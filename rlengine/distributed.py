"""Process-group set-up and the small collectives the loop needs.

Roles: with `rollout.placement=colocated` every rank is a trainer rank and holds its own
sampler. With `separate`, the last `rollout.num_ranks` ranks are rollout ranks; the others form
the ZeRO-3 trainer group. A dedicated `sync_group` (trainer rank 0 + rollout ranks) carries the
weight broadcast so it never blocks on trainer collectives.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from rlengine.config import Config


@dataclass
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    trainer_ranks: list[int]
    rollout_ranks: list[int]
    trainer_group: object = None          # None = the default (world) group
    sync_group: object = None             # trainer rank 0 + rollout ranks (separate placement)
    backend: str = "gloo"
    threads: int = 1
    extra: dict = field(default_factory=dict)

    @property
    def is_trainer(self) -> bool:
        return self.rank in self.trainer_ranks

    @property
    def trainer_index(self) -> int:
        return self.trainer_ranks.index(self.rank)

    @property
    def num_trainers(self) -> int:
        return len(self.trainer_ranks)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(cfg: Config) -> DistContext:
    """Detect the accelerator, size the thread pools, start torch.distributed (env:// as set by
    the deepspeed launcher; a single process without launcher gets world size 1)."""
    from rlengine.runtime import configure_process, detect_accelerator, dist_backend

    accel = detect_accelerator()
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    threads = configure_process(local_world)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    backend = dist_backend()
    import deepspeed

    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(minutes=30))
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if accel == "cuda":
        torch.cuda.set_device(local_rank)
    r = cfg.rollout
    if r.placement == "separate":
        if r.num_ranks >= world:
            raise RuntimeError(f"rollout.num_ranks={r.num_ranks} leaves no trainer rank in a world of {world} "
                               f"(launch more processes or lower rollout.num_ranks)")
        trainer_ranks = list(range(world - r.num_ranks))
        rollout_ranks = list(range(world - r.num_ranks, world))
    else:
        trainer_ranks, rollout_ranks = list(range(world)), []
    ctx = DistContext(rank, world, local_rank, trainer_ranks, rollout_ranks, backend=backend, threads=threads)
    if rollout_ranks:
        # new_group is collective over the world: every rank creates both groups in the same order
        ctx.trainer_group = dist.new_group(trainer_ranks)
        ctx.sync_group = dist.new_group([0] + rollout_ranks,
                                        timeout=timedelta(seconds=cfg.rollout.sync_timeout_s))
    n_trainers = len(trainer_ranks)
    if cfg.rollout.prompts_per_step % n_trainers:
        raise RuntimeError(f"rollout.prompts_per_step={cfg.rollout.prompts_per_step} must be divisible by the "
                           f"number of trainer ranks ({n_trainers})")
    mb = cfg.train.mini_batch_prompts or cfg.rollout.prompts_per_step
    if mb % n_trainers:
        raise RuntimeError(f"train.mini_batch_prompts={mb} must be divisible by the number of trainer ranks "
                           f"({n_trainers})")
    return ctx


def barrier(group=None) -> None:
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.barrier(group=group)


def all_reduce(values: list[float], op: str = "sum", group=None) -> list[float]:
    """Reduce a few floats across `group` (float64, one call)."""
    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        red = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op]
        dist.all_reduce(t, op=red, group=group)
    return t.tolist()
