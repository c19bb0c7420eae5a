"""Every patch rlengine applies to a third-party library, each naming the version it targets.

DeepSpeed 0.19.8:
  * `confine_deepspeed_to(group)`: DeepSpeed's world-group collectives go to the trainer ranks only
    (placement=separate puts rollout ranks in the launched world).
  * `deepspeed_arch_list(...)`: a `TORCH_CUDA_ARCH_LIST` its JIT op builder can parse.
torch 2.13:
  * `default_group_timeout(seconds)`: the timeout of every process group created without one
    (DeepSpeed's own groups among them), which torch otherwise fixes at 30 minutes.
vLLM 0.32.0: its patches stay in `rlengine/rollout/vllm_sampler.py`, the one module that imports
vLLM (a module-level rule this project keeps): `RlengineWorkerExtension` (in-place reload that
reports matched parameters, the tied lm_head repack on CPU, the shm queue spin), and the restored
RNG states and `torch.set_num_threads` after an in-process engine starts.
"""
from __future__ import annotations

from datetime import timedelta

import torch.distributed as dist


def default_group_timeout(seconds: float) -> None:
    """Make `seconds` the timeout of every process group created without an explicit one.

    `new_group(timeout=None)` takes torch's module default (30 min, NCCL's 10 min), not the
    world group's: DeepSpeed's groups, and any a library creates, would wait 30 minutes for a
    dead peer whatever `run.collective_timeout_s` says."""
    import torch.distributed.distributed_c10d as c10d

    c10d.default_pg_timeout = timedelta(seconds=seconds)
    c10d.default_pg_nccl_timeout = timedelta(seconds=seconds)


def confine_deepspeed_to(group) -> None:
    """Make DeepSpeed treat `group` (the trainer ranks) as its world.

    DeepSpeed issues some collectives on the default group (`group=None`): a barrier in ZeRO-3's
    optimizer set-up, barriers around checkpoint saves, world-size queries. With rollout ranks in
    the launched world those would wait forever for ranks that never make them. Every DeepSpeed
    collective goes through its communication backend object (`deepspeed.comm.comm.cdb`), so
    there `group=None` is rewritten to the trainer group, and nowhere else."""
    import functools

    import deepspeed.comm.comm as ds_comm

    cdb = ds_comm.cdb
    if cdb is None or getattr(cdb, "_rlengine_confined", False):
        return
    for name in dir(cdb):
        if name.startswith("_"):
            continue
        fn = getattr(cdb, name)
        if not callable(fn):
            continue
        params = _parameters(fn)
        if "group" not in params:
            continue

        def confined(*args, __fn=fn, __pos=params.index("group"), **kwargs):
            if len(args) > __pos:
                if args[__pos] is None:  # group passed positionally as None
                    args = args[:__pos] + (group,) + args[__pos + 1:]
            elif kwargs.get("group") is None:
                kwargs["group"] = group
            return __fn(*args, **kwargs)

        setattr(cdb, name, functools.wraps(fn)(confined))
    # groups DeepSpeed creates for itself: only their members take part in creating them
    cdb.new_group = lambda ranks: dist.new_group(ranks, use_local_synchronization=True)
    cdb._rlengine_confined = True


def _parameters(method) -> list[str]:
    """Parameter names of a bound method, looking through decorators that hide them behind
    (*args, **kwargs) without functools.wraps (DeepSpeed's `stage_on_cpu`)."""
    import inspect

    try:
        names = list(inspect.signature(method).parameters)
    except (TypeError, ValueError):
        return []
    if "group" in names or not any(n in ("args", "kwargs") for n in names):
        return names
    for cell in getattr(getattr(method, "__func__", method), "__closure__", None) or ():
        inner = cell.cell_contents
        if inspect.isfunction(inner):
            inner_names = list(inspect.signature(inner).parameters)
            if "group" in inner_names:
                return inner_names[1:]  # drop `self`: the wrapper is called bound
    return names


def deepspeed_arch_list(arch_list: str) -> str:
    """`TORCH_CUDA_ARCH_LIST` as DeepSpeed's JIT op builder can parse it.

    DeepSpeed 0.19.8 reads each entry as integers, so an arch-specific entry such as "9.0a" (set by
    CUDA images for Hopper) fails the first JIT build, fused AdamW's, with "invalid literal for
    int() with base 10: '0a'" (seen on an H100). The suffix only enables arch-specific instructions
    that DeepSpeed's kernels do not use: "9.0a" -> "9.0", "10.0f" -> "10.0"; "+PTX" is kept."""
    ptx: dict[str, bool] = {}  # capability -> "+PTX" asked for by any of its entries (in order)
    for entry in arch_list.replace(" ", ";").split(";"):
        entry = entry.strip()
        if entry:
            cc = entry.removesuffix("+PTX").rstrip("abcdefghijklmnopqrstuvwxyz")
            ptx[cc] = ptx.get(cc, False) or entry.endswith("+PTX")
    return ";".join(cc + ("+PTX" if p else "") for cc, p in ptx.items())
