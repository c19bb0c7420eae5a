"""Process-group set-up and the small collectives the loop needs.

Roles: with `rollout.placement=colocated` every rank is a trainer rank and holds its own
sampler. With `separate`, the last `rollout.num_ranks` ranks are rollout ranks; the others form
the ZeRO-3 trainer group. A dedicated `sync_group` (trainer rank 0 + rollout ranks) carries the
weight broadcast so it never blocks on trainer collectives.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

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
    world: list = None                    # every rank's {"rank", "role", "address"} (world_map)

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
    from rlengine.network import configure_sockets
    from rlengine.runtime import clear_stale_build_locks, configure_process, detect_accelerator, dist_backend

    accel = detect_accelerator()
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    threads = configure_process(local_world)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    backend = dist_backend()
    configure_sockets(cfg.run.socket_ifname)
    for line in clear_stale_build_locks():   # DeepSpeed JIT-builds its C++ ops below and in initialize()
        print(line, file=sys.stderr, flush=True)
    import deepspeed

    from rlengine.patches import default_group_timeout

    default_group_timeout(cfg.run.collective_timeout_s)
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=cfg.run.collective_timeout_s))
    rank, world = dist.get_rank(), dist.get_world_size()
    if accel == "cpu":
        release_deepspeed_shm(rank, world)
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
        ctx.trainer_group = dist.new_group(trainer_ranks, timeout=timedelta(seconds=cfg.run.collective_timeout_s))
        ctx.sync_group = dist.new_group([0] + rollout_ranks,
                                        timeout=timedelta(seconds=cfg.rollout.sync_timeout_s))
        if rank in trainer_ranks:
            from rlengine.patches import confine_deepspeed_to

            confine_deepspeed_to(ctx.trainer_group)
    ctx.world = world_map(ctx)
    if ctx.is_main:
        print("rlengine: world: " + ", ".join(f"rank {w['rank']} {w['role']} @ {w['address']}" for w in ctx.world),
              flush=True)
    n_trainers = len(trainer_ranks)
    if cfg.rollout.prompts_per_step % n_trainers:
        raise RuntimeError(f"rollout.prompts_per_step={cfg.rollout.prompts_per_step} must be divisible by the "
                           f"number of trainer ranks ({n_trainers})")
    mb = cfg.train.mini_batch_prompts or cfg.rollout.prompts_per_step
    if mb % n_trainers:
        raise RuntimeError(f"train.mini_batch_prompts={mb} must be divisible by the number of trainer ranks "
                           f"({n_trainers})")
    return ctx


def world_map(ctx: DistContext) -> list[dict]:
    """Every rank's role and the address its sockets use (one all_gather at start-up): which
    node did what, for the log and `<output_dir>/world.json`."""
    from rlengine.network import my_address

    mine = {"rank": ctx.rank, "role": "trainer" if ctx.is_trainer else "rollout", "address": my_address()}
    if ctx.world_size == 1:
        return [mine]
    everyone: list = [None] * ctx.world_size
    dist.all_gather_object(everyone, mine)
    return everyone


def deepspeed_shm_path(rank: int) -> Path:
    """The /dev/shm segment DeepSpeed's CPU all-reduce creates for `rank` of this run
    (ops/csrc/cpu/comm/shm.cpp: `deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>`)."""
    return Path("/dev/shm") / (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
                               f"{os.environ.get('MASTER_PORT', '')}_{rank}")


def release_deepspeed_shm(rank: int, world: int) -> None:
    """Unlink this rank's DeepSpeed shared-memory segment once every rank has mapped it.

    DeepSpeed's CPU backend creates one ~69 MB /dev/shm segment per local rank and never unlinks
    it: every run (a killed one too) left them behind, RAM that only a reboot returned (3.4 GB
    after a day of test runs here). Each rank maps all segments inside `init_distributed`, so
    after a barrier the names are no longer needed; the mappings stay valid and the memory is
    freed when the last process of the run exits."""
    if world > 1:
        dist.barrier()
    try:
        deepspeed_shm_path(rank).unlink()
    except FileNotFoundError:  # single process, ranks on other hosts, or a DeepSpeed without shm
        pass


def finish_distributed() -> None:
    """End a clean run on every rank: a barrier, then destroy the process groups while the
    interpreter is still whole. A gloo group left to interpreter teardown can abort the process
    (SIGABRT, "terminate called without an active exception": its worker threads are still
    joinable when their C++ objects are destroyed) and the launcher then reports a finished run
    as failed; 2 processes with async all-reduces and no destroy aborted 17 times in 40 here.
    The barrier waits at most run.collective_timeout_s (the groups' timeout)."""
    if not dist.is_initialized():
        return
    barrier()
    dist.destroy_process_group()


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
