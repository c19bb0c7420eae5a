"""Process set-up: which accelerator we run on, how many CPU threads a process may use, which
torch.distributed backend to ask for.

Why threads matter: on a CPU host every torch process defaults to one OpenMP thread per core, and as
soon as two such processes (two ranks, trainer + sampler, reward workers) share the cores, each slows
down 20-50x (oversubscription). `configure_process` divides the cores among the processes the
launcher started on this host (`LOCAL_WORLD_SIZE`), and sets `DS_ACCELERATOR=cpu` when there is no
GPU so DeepSpeed never guesses.
"""
from __future__ import annotations

import os


def detect_accelerator() -> str:
    """"cuda" when torch sees a CUDA device, else "cpu"."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def dist_backend(accelerator: str | None = None) -> str:
    """torch.distributed backend for the accelerator: "nccl" on CUDA, "gloo" on CPU."""
    return "nccl" if (accelerator or detect_accelerator()) == "cuda" else "gloo"


def local_device() -> str:
    """This process's compute device: "cuda:<current device>" (set from LOCAL_RANK by
    `init_distributed`) when torch sees a GPU, else "cpu"."""
    import torch

    return f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"


def threads_per_process(local_world_size: int | None = None, cpu_count: int | None = None) -> int:
    """Cores on this host divided among its `local_world_size` processes (at least 1)."""
    if local_world_size is None:
        local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    if local_world_size < 1:
        raise ValueError(f"local_world_size must be >= 1, got {local_world_size}")
    cores = cpu_count if cpu_count is not None else _usable_cores()
    return max(1, cores // local_world_size)


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def configure_process(local_world_size: int | None = None, threads: int | None = None) -> int:
    """Prepare this process to run: on CPU set `DS_ACCELERATOR=cpu` (effective when called before
    deepspeed is imported) and limit torch / OpenMP to this process's share of the cores. `threads`
    overrides the computed share. Returns the thread count chosen (on CUDA: the same share, used by
    the CPU-side work)."""
    accelerator = detect_accelerator()
    if accelerator == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    else:
        arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
        if arch:
            from rlengine.patches import deepspeed_arch_list

            os.environ["TORCH_CUDA_ARCH_LIST"] = deepspeed_arch_list(arch)
    count = int(threads) if threads else threads_per_process(local_world_size)
    os.environ["OMP_NUM_THREADS"] = str(count)
    import torch

    torch.set_num_threads(count)
    return count


def native_bf16(accelerator: str | None = None) -> bool:
    """Whether bf16 matmuls run natively here: a CUDA device that supports bf16, or a CPU with
    AVX512-BF16 or AMX. Elsewhere (e.g. an AVX2-only CPU) torch emulates them, 26x slower than fp32
    (docs/benchmarks.md)."""
    import torch

    if (accelerator or detect_accelerator()) == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # torch's private probes moved: read the CPU flags ourselves
        return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def cpu_flags() -> set[str]:
    """The feature flags of the first CPU in /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def resolve_dtype(dtype: str | None, accelerator: str | None = None) -> str | None:
    """"auto" -> "bf16" where bf16 is native (`native_bf16`), else "fp32"; other values unchanged."""
    if dtype != "auto":
        return dtype
    return "bf16" if native_bf16(accelerator) else "fp32"


def memory_gb() -> dict[str, float]:
    """This process's memory now: resident set (`mem/rss_gb`), its peak since start
    (`mem/peak_rss_gb`) and, on CUDA, the peak of allocated device memory (`mem/gpu_peak_gb`)."""
    import resource

    import torch

    out = {"mem/peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)}  # KiB on Linux
    try:
        with open("/proc/self/statm") as f:
            out["mem/rss_gb"] = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / (1 << 30)
    except OSError:  # not Linux
        pass
    if torch.cuda.is_available():
        out["mem/gpu_peak_gb"] = torch.cuda.max_memory_allocated() / (1 << 30)
    return out


# ----------------------------------------------------------------------------- stale JIT build locks
# torch builds DeepSpeed's C++ ops (shm comm, CPU Adam) on first use under a `lock` file that the
# building process holds open (torch.utils.file_baton) and removes when done. A launch killed
# mid-build leaves the file behind, and every later launch then waits for it to vanish, silently
# and for ever. A lock that no process on this host holds open is such a leftover.

NETWORK_FS = ("nfs", "nfs4", "cifs", "smb3", "lustre", "gpfs", "beegfs", "ceph", "fuse.sshfs", "9p")
NETWORK_LOCK_GRACE_S = 600.0   # a builder on another node may hold a lock on a shared cache


def extension_build_locks(root: str | os.PathLike | None = None) -> list:
    """The `lock` files under torch's extension build root (TORCH_EXTENSIONS_DIR or
    ~/.cache/torch_extensions): <root>/<python tag>/<op>/lock, and <root>/<op>/lock."""
    from pathlib import Path

    if root is None:   # torch's own rule (cpp_extension._get_build_directory): the variable wins
        from torch.utils.cpp_extension import get_default_build_root

        root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    base = Path(root)
    return sorted(set(base.glob("*/lock")) | set(base.glob("*/*/lock")))


def lock_holders(path: str | os.PathLike) -> list[int]:
    """PIDs of the processes on this host that hold `path` open (read from /proc)."""
    target = os.path.realpath(path)
    holders = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:                                   # gone, or not ours to read
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                    holders.append(int(pid))
                    break
            except OSError:
                continue
    return holders


def filesystem_type(path: str | os.PathLike, mounts: str | None = None) -> str:
    """The type of the file system holding `path` (the longest mount point of /proc/mounts above it)."""
    real = os.path.realpath(path)
    if mounts is None:
        try:
            with open("/proc/mounts") as f:
                mounts = f.read()
        except OSError:
            return ""
    best, kind = "", ""
    for line in mounts.splitlines():
        parts = line.split()
        if len(parts) >= 3:
            point = parts[1].replace("\\040", " ")
            inside = real == point or real.startswith(point.rstrip("/") + "/")
            if inside and len(point) >= len(best):
                best, kind = point, parts[2]
    return kind


def clear_stale_build_locks(root: str | os.PathLike | None = None, now: float | None = None) -> list[str]:
    """Remove the extension build locks that no process on this host holds open and return one
    message line per lock acted on. On a network file system a builder may be on another node, so
    there a lock is removed only once it is older than NETWORK_LOCK_GRACE_S; younger, the line
    names the file to remove if no node is building."""
    import time

    now = time.time() if now is None else now
    lines = []
    for lock in extension_build_locks(root):
        try:
            age = now - lock.stat().st_mtime
        except FileNotFoundError:
            continue
        if lock_holders(lock):
            continue
        if filesystem_type(lock) in NETWORK_FS and age < NETWORK_LOCK_GRACE_S:
            lines.append(f"rlengine: the build lock {lock} ({age:.0f} s old) is held by no process on this host; "
                         "if no other node is building that op, remove it, or every launch waits for it")
            continue
        if lock_holders(lock):                           # checked again right before removing
            continue
        try:
            lock.unlink()
        except FileNotFoundError:
            continue
        lines.append(f"rlengine: removed the stale build lock {lock} ({age:.0f} s old, held by no process: "
                     "an earlier build was interrupted); torch would have waited for it for ever")
    return lines
