"""Benchmark: chunked log-probs + entropy (rlengine.logprobs) against naive full-logits log_softmax.

Workload (both variants): random hidden states [N, H] and a random LM head [V, H] (both requiring
grad), log-prob of a random target per token and the entropy at temperature T, loss
`-mean(logp) - 1e-3 * mean(entropy)`, forward + backward.
  naive:    logits = hidden @ W.T (fp32, [N, V]); log_softmax(logits / T); gather; -(p * logp).sum(-1)
  rlengine: chunked_logprobs_entropy(hidden, W, targets, T, chunk_size)

Peak memory method: every variant runs in its own fresh subprocess. After the inputs are allocated
and touched, the child reads its peak RSS so far (`getrusage(RUSAGE_SELF).ru_maxrss`); after the first
forward+backward it reads it again; `peak_mb` is the growth, i.e. the extra memory the computation
needed at its peak (gradients of hidden and W included, for both variants). Time: best of `--repeats`
forward+backward passes, wall clock (`ms`) and process CPU time (`cpu_ms`; with one thread it is the
compute time even when other processes compete for the cores, which makes wall time noisy).

The issue's shape is 8 x 4096 tokens at V = 152k: the naive variant alone would need 20 GB per
[N, V] fp32 tensor, more than this 24 GiB machine, so the default measures N = 2048 tokens
(8 x 256) for both variants at V = 152064, H = 896 (Qwen2.5-0.5B-like head); `--tokens` changes it.
The JSON's "shape" says what was measured.

  OMP_NUM_THREADS=1 python tools/bench_logprobs.py [--tokens 2048] [--hidden 896] [--vocab 152064]
      [--dtype fp32|bf16] [--chunk-size auto] [--threads 1] [--repeats 2] [--sweep 256,512,1024]
Last stdout line: {"naive": {"ms": ..., "peak_mb": ...}, "rlengine": {"ms": ..., "peak_mb": ...}, ...}
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def _max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _child(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from rlengine.logprobs import chunked_logprobs_entropy, default_chunk_size

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    generator = torch.Generator().manual_seed(0)
    # filled in place: a temporary here would inflate the baseline peak RSS and hide real growth
    hidden = torch.empty(args.tokens, args.hidden, dtype=dtype).normal_(generator=generator).requires_grad_()  # [N, H]
    weight = torch.empty(args.vocab, args.hidden, dtype=dtype).normal_(0, 0.05, generator=generator).requires_grad_()  # [V, H]
    targets = torch.randint(0, args.vocab, (args.tokens,), generator=generator)  # [N]
    chunk = args.chunk_size or default_chunk_size(args.vocab)

    def naive():
        logp_all = torch.log_softmax((hidden.float() @ weight.float().t()) / args.temperature, dim=-1)  # [N, V]
        logp = logp_all.gather(1, targets[:, None]).squeeze(-1)
        entropy = -(logp_all.exp() * logp_all).sum(-1)
        return logp, entropy

    def chunked():
        return chunked_logprobs_entropy(hidden, weight, targets, args.temperature, chunk)

    compute = naive if args.child == "naive" else chunked
    base_mb = _max_rss_mb()
    wall, cpu = [], []
    peak_mb = None
    for _ in range(args.repeats):
        hidden.grad = weight.grad = None
        start, start_cpu = time.perf_counter(), time.process_time()
        logp, entropy = compute()
        loss = -logp.mean() - 1e-3 * entropy.mean()
        loss.backward()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
        if peak_mb is None:
            peak_mb = _max_rss_mb() - base_mb
        del logp, entropy, loss
    result = {"ms": round(min(wall) * 1000, 1), "cpu_ms": round(min(cpu) * 1000, 1), "peak_mb": round(peak_mb, 1)}
    if args.child != "naive":
        result["chunk_size"] = chunk
    return result


def _run_child(variant: str, args, chunk_size: int | None = None) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", variant, "--tokens", str(args.tokens),
           "--hidden", str(args.hidden), "--vocab", str(args.vocab), "--dtype", args.dtype,
           "--threads", str(args.threads), "--repeats", str(args.repeats), "--temperature", str(args.temperature)]
    if chunk_size:
        cmd += ["--chunk-size", str(chunk_size)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"{variant} child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=896)
    parser.add_argument("--vocab", type=int, default=152064)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--chunk-size", type=int, default=0, help="0 = rlengine's default for the vocab")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--sweep", default="", help="comma-separated chunk sizes to time as well")
    parser.add_argument("--skip-naive", action="store_true", help="e.g. for shapes naive cannot fit")
    parser.add_argument("--child", choices=["naive", "rlengine"], help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        print(json.dumps(_child(args)))
        return
    result = {"shape": {"tokens": args.tokens, "hidden": args.hidden, "vocab": args.vocab, "dtype": args.dtype,
                        "threads": args.threads, "temperature": args.temperature,
                        "note": "forward+backward of logp and entropy; peak_mb = peak RSS growth in a fresh process"}}
    if not args.skip_naive:
        result["naive"] = _run_child("naive", args)
        print("naive", json.dumps(result["naive"]), flush=True)
    result["rlengine"] = _run_child("rlengine", args, args.chunk_size or None)
    print("rlengine", json.dumps(result["rlengine"]), flush=True)
    if args.sweep:
        result["sweep"] = {}
        for size in (int(s) for s in args.sweep.split(",") if s):
            result["sweep"][size] = _run_child("rlengine", args, size)
            print("chunk", size, json.dumps(result["sweep"][size]), flush=True)
    if "naive" in result:
        result["speed_vs_naive"] = round(result["naive"]["ms"] / result["rlengine"]["ms"], 3)
        result["speed_vs_naive_cpu"] = round(result["naive"]["cpu_ms"] / result["rlengine"]["cpu_ms"], 3)
        result["memory_vs_naive"] = round(result["rlengine"]["peak_mb"] / max(result["naive"]["peak_mb"], 1e-9), 4)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
