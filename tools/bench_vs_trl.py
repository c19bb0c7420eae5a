"""Samples/s of TRL's GRPOTrainer against rlengine on the same job, measured in one run.

The job is tools/_benchjob.py's, the same on both sides: the embedded SmolLM2-135M-Instruct, the
bundled arithmetic set with the think/answer system prompt, reward answer + format, 4 prompts x 4
responses of up to 64 tokens a step, lr 1e-6, no KL, one optimizer step per rollout batch (TRL's
default num_iterations 1), 6 steps of which the first 2 are left out (start-up; rlengine's
asynchronous pipeline filling). samples/s = samples a step / median steady step time.

TRL generates with Hugging Face `generate` (its only CPU option) in one process with every core,
in fp32 and, where bf16 matmuls are native (AVX512-BF16, AMX, a GPU), also with `bf16=True`; the
faster counts. Where bf16 is emulated (AVX2 only) it is 10x slower and takes hours
(docs/benchmarks.md: 701.6 s/step against 68.1 in fp32 on the AMD EPYC box), so it is left out
unless `--trl-precisions fp32 bf16` asks for it; the JSON records the CPU, its flags and why.
rlengine runs as a user runs it (`python -m rlengine train`, the deepspeed launcher) in each of
`--rlengine-configs` and the fastest counts (the JSON says which):
  colocated  2 trainer ranks (ZeRO-3), each with its own vLLM sampler, generate and train in turn
  async      placement=separate, 1 trainer + 1 vLLM rank, rollout.max_staleness=1

    python tools/bench_vs_trl.py [--steps 6] [--warmup 2] [--rlengine-configs colocated async]

Last stdout line: {"trl": {"samples_per_s": ...}, "rlengine": {"samples_per_s": ..., "config": ...},
"speedup": ..., ...} (needs `pip install -c constraints.txt trl==1.16.0`, part of the `dev` extra).
Target (issue 14): rlengine >= 2.5x TRL. Figures: docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tools._benchjob import add_job_arguments, cpu_description, job_from, run_rlengine, summary  # noqa: E402


def trl_worker(args) -> dict:
    """Runs inside its own process: TRL GRPOTrainer for `args.steps` steps."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rlengine.config import DataSource
    from rlengine.data import build_messages, load_examples
    from rlengine.model import load_tokenizer, resolve_model_path
    from rlengine.rewards import get_reward

    torch.set_num_threads(os.cpu_count() or 2)
    path = resolve_model_path("embedded")
    examples = load_examples(DataSource(preset="arithmetic", split="train"))
    rows = [{"prompt": build_messages(e.question, "think_answer"), "answer": e.answer} for e in examples[:2000]]
    reward_fn = get_reward("answer_format")

    def reward(completions, answer, **_):
        return [reward_fn(c[0]["content"] if isinstance(c, list) else c, a)["reward"] for c, a in zip(completions, answer)]

    step_times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            step_times.append(time.perf_counter() - self.t0)

    with tempfile.TemporaryDirectory() as tmp:
        cfg = GRPOConfig(output_dir=tmp, per_device_train_batch_size=args.prompts * args.group,
                         num_generations=args.group, max_completion_length=args.max_new_tokens,
                         learning_rate=1e-6, beta=0.0, loss_type="dapo", use_cpu=True, bf16=args.trl_precision == "bf16",
                         gradient_checkpointing=False, max_steps=args.steps, logging_steps=1,
                         save_strategy="no", report_to="none", seed=42, temperature=1.0)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        trainer = GRPOTrainer(model=model, reward_funcs=reward, args=cfg, train_dataset=Dataset.from_list(rows),
                              processing_class=load_tokenizer(path))
        trainer.add_callback(Timer())
        trainer.train()
    return {"step_times": step_times}


def run_trl(args, precision: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--_trl-worker", "--trl-precision", precision,
                          "--steps", str(args.steps), "--prompts", str(args.prompts), "--group", str(args.group),
                          "--max-new-tokens", str(args.max_new_tokens)], capture_output=True, text=True, cwd=REPO)
    if out.returncode != 0:
        raise RuntimeError(f"TRL run ({precision}) failed:\n" + out.stderr[-4000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


RLENGINE_CONFIGS = {
    "colocated": (2, 2, ["rollout.backend=vllm", "rollout.placement=colocated"]),
    "async": (2, 1, ["rollout.backend=vllm", "rollout.placement=separate", "rollout.num_ranks=1",
                     "rollout.max_staleness=1"]),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_job_arguments(ap)
    ap.add_argument("--rlengine-configs", nargs="+", default=list(RLENGINE_CONFIGS), choices=list(RLENGINE_CONFIGS))
    ap.add_argument("--trl-precisions", nargs="+", default=None, choices=["fp32", "bf16"],
                    help="default: fp32, plus bf16 where it is native on this CPU")
    ap.add_argument("--_trl-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--trl-precision", default="fp32", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._trl_worker:
        print(json.dumps(trl_worker(args)))
        return
    job = job_from(args)
    cpu = cpu_description()
    precisions = args.trl_precisions or (["fp32", "bf16"] if cpu["native_bf16"] else ["fp32"])
    skipped = {} if "bf16" in precisions else {"bf16": "not native on this CPU (emulated: ~10x slower than fp32)"}
    trl_runs = {}
    for precision in precisions:
        times = run_trl(args, precision)["step_times"]
        trl_runs[precision] = {"samples_per_s": job.samples_per_step / statistics.median(times[job.warmup:]),
                               "s_per_step": statistics.median(times[job.warmup:]), "step_times": times}
        print(f"trl {precision:4s}: {trl_runs[precision]['s_per_step']:.2f} s/step", flush=True)
    ours = {}
    for name in args.rlengine_configs:
        nproc, trainers, extra = RLENGINE_CONFIGS[name]
        ours[name] = summary(job, run_rlengine(job, nproc, trainers, ["model.dtype=auto"] + extra))
        print(f"rlengine {name}: {ours[name]['s_per_step']:.2f} s/step", flush=True)
    trl_best = max(trl_runs, key=lambda p: trl_runs[p]["samples_per_s"])
    best = max(ours, key=lambda n: ours[n]["samples_per_s"])
    from rlengine.runtime import resolve_dtype

    result = {"trl": {**trl_runs[trl_best], "precision": trl_best, "all": trl_runs, "skipped": skipped},
              "rlengine": {**ours[best], "config": best, "all": ours},
              "speedup": ours[best]["samples_per_s"] / trl_runs[trl_best]["samples_per_s"], "target": 2.5,
              "setup": {"job": vars(job), "cpu": cpu, "trl": "1 process, every core, HF generate",
                        "rlengine_dtype": resolve_dtype("auto"),
                        "rlengine_configs": {n: " ".join(RLENGINE_CONFIGS[n][2]) + f" on {RLENGINE_CONFIGS[n][0]} ranks"
                                             for n in ours}}}
    print(f"speedup: {result['speedup']:.2f}x (rlengine {best} against TRL {trl_best})", flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
