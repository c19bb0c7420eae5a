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
            os.environ["TORCH_CUDA_ARCH_LIST"] = deepspeed_arch_list(arch)
    count = int(threads) if threads else threads_per_process(local_world_size)
    os.environ["OMP_NUM_THREADS"] = str(count)
    import torch

    torch.set_num_threads(count)
    return count


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


def native_bf16(accelerator: str | None = None) -> bool:
    """Whether bf16 matmuls run natively here: a CUDA device that supports bf16, or a CPU with
    AVX512-BF16 or AMX. Elsewhere (e.g. an AVX2-only CPU) torch emulates them: a [2048, 576] x
    [576, 1536] matmul with its backward took 3.84 s in bf16 against 0.146 s in fp32 (26x) on this
    project's AMD EPYC AVX2 box, 1 thread."""
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
