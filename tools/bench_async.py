"""Asynchronous rollout against the synchronous loop, same job, same placement, one run each.

The embedded default (SmolLM2-135M-Instruct) in placement=separate: 1 trainer rank + 1 vLLM rollout
rank, through the launcher, with rollout.max_staleness 0 (generate, then train, in turn), 1 and 2
(the rollout rank generates the next batches while the trainer updates). The job is
tools/_benchjob.py's (4 prompts x 4 x 64 tokens, one update a step). Per setting: samples/s,
the median `time/train`, the rollout rank's idle fraction (`rollout/idle_frac`, measured on the
rollout rank: 1 - seconds generating or loading weights / wall seconds between two batches),
and the staleness actually trained.

    python tools/bench_async.py [--steps 6] [--warmup 2] [--staleness 0 1 2]

Last stdout line: {"staleness": {"0": {"samples_per_s": ..., "rollout_idle_frac": ...}, "1": {...},
"2": {...}}, "speedup": {"1": ..., "2": ...}, ...}; speedup = samples/s over staleness 0's.
Target (issue 14): staleness 1 >= 1.5x staleness 0 on a 2-core box. docs/benchmarks.md has the
figures.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools._benchjob import add_job_arguments, cpu_description, job_from, run_rlengine, summary  # noqa: E402

SEPARATE = ["model.path=embedded", "model.dtype=auto", "rollout.placement=separate", "rollout.num_ranks=1",
            "rollout.backend=vllm"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_job_arguments(ap)
    ap.add_argument("--staleness", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args()
    job = job_from(args)
    results = {}
    for k in args.staleness:
        s = summary(job, run_rlengine(job, nproc=2, trainers=1, extra=SEPARATE + [f"rollout.max_staleness={k}"]))
        results[str(k)] = {"samples_per_s": s["samples_per_s"], "rollout_idle_frac": s.get("rollout/idle_frac"),
                           "time_train_s": s.get("time/train"), **s}
        print(f"max_staleness={k}: {s['s_per_step']:.2f} s/step, {s['samples_per_s']:.3f} samples/s, "
              f"train {s.get('time/train')} s, rollout idle {s.get('rollout/idle_frac')}", flush=True)
    base = results.get("0", {}).get("samples_per_s")
    speedup = {k: r["samples_per_s"] / base for k, r in results.items() if base and k != "0"}
    print(json.dumps({"staleness": results, "speedup": speedup, "target": {"1": 1.5},
                      "setup": {"job": vars(job), "placement": "separate, 1 trainer + 1 vLLM rank",
                                "cpu": cpu_description()}}))


if __name__ == "__main__":
    main()
