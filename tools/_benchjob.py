"""The one job the end-to-end benchmarks run, and how they run rlengine on it.

tools/bench_vs_trl.py, tools/bench_async.py and tools/bench_overhead.py all measure the same work:
the embedded SmolLM2-135M-Instruct on the bundled arithmetic set with the think/answer system
prompt, reward answer + format, `prompts` x `group` responses of up to `max_new_tokens` a step,
lr 1e-6, no KL, one optimizer step per rollout batch (num_iterations 1, one mini-batch), each group's
prompt run once for its responses in training (train.share_prompt_forward, `--no-share-prompt` to
turn it off; bench_overhead.py always does, its bare parts being plain padded forwards). A run's
first `warmup` steps are excluded (start-up, and with asynchronous rollout the pipeline filling);
a step's time is the trainer's `time/step`, which in steady state is the period of the loop in both
modes (in async mode it includes waiting for the next batch), so samples/s = samples a step /
median steady step time.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Job:
    prompts: int = 4
    group: int = 4
    max_new_tokens: int = 64
    steps: int = 6
    warmup: int = 2
    lr: float = 1e-6
    share_prompt: bool = True

    @property
    def samples_per_step(self) -> int:
        return self.prompts * self.group

    def overrides(self, trainers: int) -> list[str]:
        """rlengine config overrides (after configs/default.yaml) for this job on `trainers` ranks."""
        return [f"run.total_steps={self.steps}", "run.save_every=0", "run.token_dump_every=0",
                "run.export_final=false", "run.tensorboard=false", "run.resume=never",
                f"rollout.prompts_per_step={self.prompts}", f"rollout.group_size={self.group}",
                f"rollout.max_new_tokens={self.max_new_tokens}", "train.num_iterations=1", f"train.lr={self.lr}",
                f"train.micro_batch_size={self.samples_per_step // trainers}",
                f"train.share_prompt_forward={str(self.share_prompt).lower()}"]


def add_job_arguments(ap, share_prompt_flag: bool = True) -> None:
    """The job's command-line flags; `share_prompt_flag=False` for a tool that always trains on padded
    rows (it then has no --no-share-prompt to accept and ignore)."""
    d = Job()
    ap.add_argument("--steps", type=int, default=d.steps)
    ap.add_argument("--warmup", type=int, default=d.warmup, help="first steps left out of every figure")
    ap.add_argument("--prompts", type=int, default=d.prompts)
    ap.add_argument("--group", type=int, default=d.group)
    ap.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    if share_prompt_flag:
        ap.add_argument("--no-share-prompt", dest="share_prompt", action="store_false",
                        help="train on padded prompt+response rows (train.share_prompt_forward=false)")
    else:
        ap.set_defaults(share_prompt=False)


def job_from(args) -> Job:
    if args.steps <= args.warmup:
        raise SystemExit(f"--steps {args.steps} must exceed --warmup {args.warmup}")
    return Job(args.prompts, args.group, args.max_new_tokens, args.steps, args.warmup,
               share_prompt=args.share_prompt)


def run_rlengine(job: Job, nproc: int, trainers: int, extra: list[str]) -> list[dict]:
    """`python -m rlengine train` (the deepspeed launcher) on the job; its metrics.jsonl rows."""
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "rlengine", "train", "--config", str(REPO / "configs/default.yaml"),
               "--nproc", str(nproc), f"run.output_dir={run_dir}", *job.overrides(trainers), *extra]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
        if out.returncode != 0:
            raise RuntimeError(f"rlengine run failed ({' '.join(extra)}):\n" + out.stdout[-2000:] + out.stderr[-4000:])
        return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def steady_median(rows: list[dict], key: str, warmup: int) -> float | None:
    values = [r[key] for r in rows[warmup:] if r.get(key) is not None]
    return statistics.median(values) if values else None


def summary(job: Job, rows: list[dict]) -> dict:
    """samples/s and the medians of the phases over the steady steps."""
    step_s = steady_median(rows, "time/step", job.warmup)
    out = {"samples_per_s": job.samples_per_step / step_s, "s_per_step": step_s,
           "step_times": [round(r["time/step"], 3) for r in rows]}
    for key in sorted({k for r in rows for k in r}):
        if key.startswith(("time/", "staleness/", "rollout/", "response_len/")):
            value = steady_median(rows, key, job.warmup)
            if value is not None:
                out[key] = round(value, 4)
    return out


def cpu_description() -> dict:
    """The CPU model, its vector / matrix flags, and whether bf16 matmuls are native here."""
    from rlengine.runtime import cpu_flags, native_bf16

    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    flags = cpu_flags()
    return {"model": model, "cores": os.cpu_count(), "native_bf16": native_bf16(),
            "flags": sorted(f for f in flags if f.startswith(("avx2", "avx512", "amx")) or f == "fma")}
