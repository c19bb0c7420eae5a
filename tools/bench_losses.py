"""Forward + backward time and peak memory of every policy loss (and each SAPO gate).

    OMP_NUM_THREADS=1 python tools/bench_losses.py [--batch 64 --tokens 4096 --repeats 30 --device cpu]

One timed step = a call of the `LossFn` built once by `LOSSES.build` (as the trainer calls it:
surrogate, its autograd weight, aggregation, all metrics incl. the host transfer) +
`loss.backward()` to a [B, T] float32 `logp` leaf. Elementwise losses take the one-pass path;
sequence-level ones (GSPO, GSPO-token, GMPO; "elementwise": false) plain autograd of the aggregate.
Entries are timed round-robin (one step of each per round, so drift hits all alike). Reported:
"ms" = median wall clock, "cpu_ms" = median CPU time of this thread, "cpu_ms_min" = its
minimum. `ratio_to_grpo` is measured in the same run, on cpu_ms_min when torch runs one thread:
the step then runs entirely in this thread, its CPU time does not count time spent waiting for
a core, and the best of N rounds is the least disturbed by processes sharing the machine (the
estimator `timeit` recommends); with more threads or on CUDA it uses the median wall time.
"ratio_basis" names the basis; `ratio_to_grpo_wall` is always the median wall-clock ratio.

peak_mb, CPU: the peak of live bytes that torch's CPU allocator handed out during one step,
above what was allocated before it (inputs excluded, outputs and grads included), from the
allocation / free events of `torch.profiler` (profile_memory=True) summed in time order.
(tracemalloc does not see torch's allocator.) CUDA: torch.cuda.max_memory_allocated above
the pre-step level. The method is named in every entry as "peak_mb_method".

The last stdout line is JSON: {entry: {"ms", "cpu_ms", "cpu_ms_min", "peak_mb", "elementwise",
"ratio_to_grpo", "ratio_to_grpo_wall", "ratio_basis", "peak_mb_method"}}.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from rlengine.losses import GATES, LOSSES  # noqa: E402


def make_inputs(batch: int, tokens: int, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    old_logp = -3.0 * torch.rand(batch, tokens, generator=g)                 # [B, T]
    log_ratio = 0.3 * torch.randn(batch, tokens, generator=g)               # populates all 5 regions
    logp = (old_logp + log_ratio).to(device).requires_grad_(True)
    adv = torch.randn(batch, generator=g).to(device)                        # [B]
    lengths = torch.randint(tokens // 4, tokens + 1, (batch,), generator=g)
    mask = (torch.arange(tokens)[None, :] < lengths[:, None]).to(device)    # [B, T]
    return logp, old_logp.to(device), adv, mask


def entries() -> dict[str, tuple[str, dict]]:
    out = {name: (name, {}) for name in LOSSES}
    for gate in GATES:
        out[f"sapo_{gate}"] = ("sapo", {"gate": gate})
    out["aspo_top_entropy"] = ("aspo", {"top_entropy_eps": 0.4})
    out["dppo_binary_kl"] = ("dppo", {"dppo_type": "binary_kl"})
    return out


def step(loss_fn, logp, old_logp, adv, mask, entropy):
    """One trainer-side call: the LossFn built once (as the trainer does), forward and backward."""
    logp.grad = None
    out = loss_fn(logp, old_logp, adv, mask, entropy=entropy)
    out.loss.backward()
    return out


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_bytes_cpu(fn) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    del result
    events = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort()
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def peak_bytes_cuda(fn) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    result = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del result
    return peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=30, help="timed rounds (each runs every entry once)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    logp, old_logp, adv, mask = make_inputs(args.batch, args.tokens, args.device)
    entropy = torch.rand(logp.shape, generator=torch.Generator().manual_seed(1)).to(args.device) * 3.0  # [B, T]
    todo = {key: LOSSES.build(name, **params) for key, (name, params) in entries().items()}
    for _ in range(args.warmup):
        for loss_fn in todo.values():
            step(loss_fn, logp, old_logp, adv, mask, entropy)
    wall: dict[str, list[float]] = {k: [] for k in todo}
    cpu: dict[str, list[float]] = {k: [] for k in todo}
    for _ in range(args.repeats):
        for key, loss_fn in todo.items():
            sync(args.device)
            c0, t0 = time.thread_time(), time.perf_counter()
            step(loss_fn, logp, old_logp, adv, mask, entropy)
            sync(args.device)
            wall[key].append((time.perf_counter() - t0) * 1e3)
            cpu[key].append((time.thread_time() - c0) * 1e3)

    cuda = args.device.startswith("cuda")
    method = ("torch.cuda.max_memory_allocated above pre-step" if cuda
              else "torch.profiler CPU allocator events, peak live bytes above pre-step")
    result = {}
    for key, loss_fn in todo.items():
        logp.grad = None
        fn = lambda: step(loss_fn, logp, old_logp, adv, mask, entropy)  # noqa: E731
        peak = peak_bytes_cuda(fn) if cuda else peak_bytes_cpu(fn)
        result[key] = {"ms": round(statistics.median(wall[key]), 3), "cpu_ms": round(statistics.median(cpu[key]), 3),
                       "cpu_ms_min": round(min(cpu[key]), 3), "peak_mb": round(peak / 2 ** 20, 2),
                       "elementwise": loss_fn.entry.elementwise}
    # One CPU thread: best-of-N thread CPU time (see the module docstring); else median wall time.
    use_cpu = not cuda and torch.get_num_threads() == 1
    basis = "cpu_ms_min" if use_cpu else "ms"
    for key in result:
        result[key]["ratio_to_grpo"] = round(result[key][basis] / result["grpo"][basis], 3)
        result[key]["ratio_to_grpo_wall"] = round(result[key]["ms"] / result["grpo"]["ms"], 3)
        result[key]["ratio_basis"] = basis
        result[key]["peak_mb_method"] = method

    n_tok = int(mask.sum())
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# policy losses, fwd+bwd, logp [{args.batch}, {args.tokens}] float32 ({n_tok} response tokens), "
          f"device {args.device}, threads {torch.get_num_threads()}, {args.repeats} rounds, "
          f"load average {load:.1f} on {os.cpu_count()} cores")
    print(f"# {'entry':16s} {'wall ms':>9s} {'cpu ms':>9s} {'cpu min':>9s} {'x grpo':>7s} {'x grpo wall':>11s} {'peak MB':>8s}")
    for key, v in result.items():
        print(f"# {key:16s} {v['ms']:9.2f} {v['cpu_ms']:9.2f} {v['cpu_ms_min']:9.2f} {v['ratio_to_grpo']:7.3f} "
              f"{v['ratio_to_grpo_wall']:11.3f} {v['peak_mb']:8.1f}")
    worst = max(v["ratio_to_grpo"] for v in result.values() if v["elementwise"])
    print(f"# slowest elementwise entry / grpo = {worst:.3f} by {basis} (target <= 1.2); sequence-level: "
          + ", ".join(f"{k} {v['ratio_to_grpo']:.2f}x" for k, v in result.items() if not v["elementwise"]))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
