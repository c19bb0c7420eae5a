"""Samples/s of TRL's GRPOTrainer against rlengine on the same job, measured in one run.

Same model (the embedded SmolLM2-135M-Instruct), same data (the bundled arithmetic set with the
think/answer system prompt), same reward (answer + format), same group size, prompts per step,
completion length and number of steps, lr 1e-6, no KL,
one optimizer step per rollout batch (TRL's defaults: num_iterations 1). TRL generates with
Hugging Face `generate` (its only CPU option); rlengine with vLLM when it is installed
(`--rlengine-backend hf` for HF generate on both sides). TRL runs in one process
with its best CPU settings measured here (bf16, no gradient checkpointing); rlengine runs as the
user runs it (the deepspeed launcher, 2 ranks, ZeRO-3). The first step of each is warm-up and
excluded; samples/s = samples per step / median step time.

    python tools/bench_vs_trl.py [--steps 6] [--prompts 4] [--group 4] [--max-new-tokens 64]

Last stdout line: {"trl": {"samples_per_s": ...}, "rlengine": {"samples_per_s": ...}, ...}
(needs `pip install -c constraints.txt trl==1.16.0`, part of the `dev` extra).

Measured here (quiet 2-core box, 6 steps, the first excluded): TRL 38.97 s/step (0.411 samples/s);
rlengine with vLLM 24.82 s/step (0.645 samples/s: rollout 7.7 s, train 14.7 s, push + probe 2.4 s),
1.57x; with HF generate 27.7 s/step, 1.38x.
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
                         learning_rate=1e-6, beta=0.0, loss_type="dapo", use_cpu=True, bf16=True,
                         gradient_checkpointing=False, max_steps=args.steps, logging_steps=1,
                         save_strategy="no", report_to="none", seed=42, temperature=1.0)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        trainer = GRPOTrainer(model=model, reward_funcs=reward, args=cfg, train_dataset=Dataset.from_list(rows),
                              processing_class=load_tokenizer(path))
        trainer.add_callback(Timer())
        trainer.train()
    return {"step_times": step_times}


def run_trl(args) -> dict:
    out = subprocess.run([sys.executable, __file__, "--_trl-worker", "--steps", str(args.steps), "--prompts",
                          str(args.prompts), "--group", str(args.group), "--max-new-tokens", str(args.max_new_tokens)],
                         capture_output=True, text=True, cwd=REPO)
    if out.returncode != 0:
        raise RuntimeError("TRL run failed:\n" + out.stderr[-4000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_rlengine(args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "rlengine", "train", "--config", str(REPO / "configs/default.yaml"),
               "--nproc", str(args.nproc),
               f"run.output_dir={run_dir}", f"run.total_steps={args.steps}", "run.save_every=0",
               "run.token_dump_every=0", "run.export_final=false", "run.tensorboard=false", "run.resume=never",
               f"rollout.prompts_per_step={args.prompts}", f"rollout.group_size={args.group}",
               f"rollout.max_new_tokens={args.max_new_tokens}", "train.num_iterations=1", "train.lr=1e-6",
               f"model.dtype={args.rlengine_dtype}", f"rollout.backend={args.rlengine_backend}", f"train.micro_batch_size={args.prompts * args.group // args.nproc}"]
        env = dict(os.environ, PYTHONPATH=str(REPO))
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
        if out.returncode != 0:
            raise RuntimeError("rlengine run failed:\n" + out.stdout[-2000:] + out.stderr[-4000:])
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"step_times": [r["time/step"] for r in rows],
            "phases": {k: statistics.median(r[k] for r in rows[1:]) for k in rows[1]
                       if k.startswith("time/") and all(k in r for r in rows[1:])}}


def summarise(step_times: list[float], samples_per_step: int) -> dict:
    steady = step_times[1:] or step_times
    med = statistics.median(steady)
    return {"samples_per_s": samples_per_step / med, "s_per_step": med, "step_times": [round(t, 3) for t in step_times]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--nproc", type=int, default=2, help="rlengine ranks")
    ap.add_argument("--rlengine-dtype", default="auto", choices=["auto", "fp32", "bf16"],
                    help="auto = bf16 where bf16 matmuls are native, else fp32 (TRL runs in fp32)")
    ap.add_argument("--rlengine-backend", default="auto", choices=["auto", "hf", "vllm"],
                    help="rlengine's sampler; auto = vllm when installed, else hf")
    ap.add_argument("--_trl-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    from rlengine.runtime import resolve_dtype

    args.rlengine_dtype = resolve_dtype(args.rlengine_dtype)
    if args._trl_worker:
        print(json.dumps(trl_worker(args)))
        return
    if args.rlengine_backend == "auto":
        from rlengine.rollout.vllm_sampler import vllm_available

        args.rlengine_backend = "vllm" if vllm_available() else "hf"
    n = args.prompts * args.group
    trl = summarise(run_trl(args)["step_times"], n)
    print(f"trl      : {trl['s_per_step']:.2f} s/step, {trl['samples_per_s']:.2f} samples/s", flush=True)
    ours_raw = run_rlengine(args)
    ours = summarise(ours_raw["step_times"], n)
    ours["phases_median_s"] = {k: round(v, 3) for k, v in ours_raw["phases"].items()}
    print(f"rlengine : {ours['s_per_step']:.2f} s/step, {ours['samples_per_s']:.2f} samples/s", flush=True)
    result = {"trl": trl, "rlengine": ours, "speedup": ours["samples_per_s"] / trl["samples_per_s"],
              "setup": {"prompts": args.prompts, "group": args.group, "max_new_tokens": args.max_new_tokens,
                        "steps": args.steps, "trl": "1 process, bf16, HF generate",
                        "rlengine": f"{args.nproc} ranks ZeRO-3, {args.rlengine_dtype}, {args.rlengine_backend} sampler"}}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
