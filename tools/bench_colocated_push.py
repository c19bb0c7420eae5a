"""Benchmark: the colocated weight push into a spawned vLLM engine, streamed against copied.

`weight_sync.local_push` hands a sampler that `consumes_weights_lazily` (a spawned vLLM engine)
the trainer's own tensors one at a time, written straight into the staged safetensors file; the
copied mode (what every push did before, and what the HF sampler still gets) clones the whole
model first. Each mode runs in its own fresh process, so one mode's freed memory cannot hide the
other's growth: load the model with transformers (the "trainer"), start a spawned VLLMSampler,
push once to warm up, then time `--repeats` pushes while a thread samples this process's resident
memory every 2 ms. Growth = the highest resident memory during the pushes minus the level just
before them. After the last push the sampler scores a fixed sequence and the gap to the trainer's
own log-probs is reported (the proof the engine holds the pushed weights).

    python tools/bench_colocated_push.py [--model embedded] [--dtype fp32] [--repeats 3] [--threads 1]

Last stdout line: {"streamed": {"seconds": ..., "rss_growth_mb": ..., "probe_abs_diff": ...},
                   "copied": {...}, "model_mb": ...}
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakRss:
    """Samples this process's resident memory in a thread; `.peak` is the highest seen."""

    def __init__(self, every_s: float = 0.002):
        self.every_s, self.peak, self._stop = every_s, rss_mb(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mb())
            time.sleep(self.every_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb())


def one_mode(mode: str, model: str, dtype: str, repeats: int, threads: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from rlengine.model import resolve_model_path
    from rlengine.rollout.vllm_sampler import VLLMSampler
    from rlengine.weight_sync import iter_gathered_params, local_push, probe_gap

    torch.set_num_threads(threads)
    path = resolve_model_path(model)
    trainer = AutoModelForCausalLM.from_pretrained(path, dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[dtype])
    trainer.eval()
    cls = VLLMSampler
    if mode == "copied":
        cls = type("CopiedVLLMSampler", (VLLMSampler,), {"consumes_weights_lazily": False})
    sampler = cls(path, dtype=dtype, in_process=False, kv_cache_gb=0.5, max_model_len=512, num_threads=threads)
    try:
        with torch.no_grad():   # a new policy: the push must change what the engine holds
            for p in trainer.parameters():
                p.mul_(1.001)
        local_push(sampler, iter_gathered_params(trainer))   # warm-up
        base = rss_mb()
        seconds = []
        with PeakRss() as peak:
            for _ in range(repeats):
                t0 = time.perf_counter()
                local_push(sampler, iter_gathered_params(trainer))
                seconds.append(time.perf_counter() - t0)
        prompt, response = list(range(100, 140)), list(range(200, 224))
        sampler_lp = sampler.score(prompt, response)
        with torch.no_grad():
            ids = torch.tensor([prompt + response])
            logits = trainer(input_ids=ids).logits[0, len(prompt) - 1:-1].float()
            trainer_lp = torch.log_softmax(logits, -1).gather(1, ids[0, len(prompt):, None]).squeeze(1)
        model_mb = sum(p.numel() * p.element_size() for p in trainer.parameters()) / 2**20
        return {"seconds": statistics.median(seconds), "seconds_all": seconds,
                "rss_growth_mb": peak.peak - base, "probe_abs_diff": probe_gap(sampler_lp, trainer_lp),
                "model_mb": model_mb}
    finally:
        sampler.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--mode", choices=["streamed", "copied"], help=argparse.SUPPRESS)  # the child's job
    args = ap.parse_args()
    if args.mode:
        print(json.dumps(one_mode(args.mode, args.model, args.dtype, args.repeats, args.threads)), flush=True)
        sys.stderr.flush()
        os._exit(0)   # the engine is closed; skip interpreter teardown, where vLLM's threads may abort
    results = {}
    for mode in ("streamed", "copied"):
        cmd = [sys.executable, __file__, "--mode", mode, "--model", args.model, "--dtype", args.dtype,
               "--repeats", str(args.repeats), "--threads", str(args.threads)]
        env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
        if r.returncode != 0:
            sys.exit(f"bench_colocated_push: the {mode} run failed:\n{r.stderr[-4000:]}")
        results[mode] = json.loads(r.stdout.strip().splitlines()[-1])
        print(f"{mode:9s} push {results[mode]['seconds']:.3f} s (median of {args.repeats}), resident memory "
              f"+{results[mode]['rss_growth_mb']:.0f} MB, probe gap {results[mode]['probe_abs_diff']:.2e}",
              file=sys.stderr)
    model_mb = results["streamed"].pop("model_mb")
    results["copied"].pop("model_mb")
    print(json.dumps({**results, "model_mb": model_mb, "dtype": args.dtype}))


if __name__ == "__main__":
    main()
