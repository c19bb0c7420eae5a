"""How much of a training step is the engine's own overhead: the step against its bare parts.

The job of tools/_benchjob.py in placement=separate (1 trainer + 1 vLLM rank, each 1 thread, as the
launcher gives 2 ranks on 2 cores), run twice through the launcher: synchronous
(rollout.max_staleness=0) and asynchronous (1). Then the same work without the engine, each part
alone in its own process with the thread count its rank had:
  * generate: vLLM itself (`vllm.LLM`, the engine's settings: fp32, eager, prefix caching, the same
    KV-cache size), the same prompts as each steady step, n = group, every response forced to that
    step's mean response length (min_tokens = max_tokens, ignore_eos), sampled-token log-probs on;
  * train: one DeepSpeed ZeRO-3 forward + backward + optimizer step (rlengine's DeepSpeed config:
    AdamW, clipping) over those very sequences, with a plain policy-gradient loss on the response
    tokens.
The engine adds everything else: prompt transport, reward, advantages, metrics, the weight push
with its digest and probe, checkpoint-free logging.

    python tools/bench_overhead.py [--steps 6] [--warmup 2]

Last stdout line: {"sync": {"step_s": ..., "bare_sum_s": ..., "ratio": ...}, "async": {"step_s": ...,
"bare_max_s": ..., "ratio": ...}, "bare": {"generate_s": ..., "train_s": ...}, ...}. Targets
(issue 14): sync step <= 1.15x the sum of the bare parts; async step <= 1.15x the larger one.
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools._benchjob import (REPO, Job, add_job_arguments, cpu_description, job_from,  # noqa: E402
                             run_rlengine, summary)

SEPARATE = ["model.path=embedded", "model.dtype=fp32", "rollout.placement=separate", "rollout.num_ranks=1",
            "rollout.backend=vllm"]
THREADS = 1                  # what configure_process gives each of 2 ranks on a 2-core host


def steady_work(job: Job, rows: list[dict]) -> list[dict]:
    """Each steady step's prompts (token ids, drawn again from the same data config: the draws depend
    on it alone; checked against the run's `data/prompt_ids`) and its mean response length."""
    from rlengine.config import load_config
    from rlengine.data import build_prompt_stream
    from rlengine.model import load_tokenizer, resolve_model_path

    cfg = load_config(REPO / "configs/default.yaml", job.overrides(1) + SEPARATE)
    stream = build_prompt_stream(cfg.data, load_tokenizer(resolve_model_path(cfg.model.path)))
    work = []
    for row in rows:
        batch = stream.next_batch(job.prompts)
        if [f"{p.source}:{p.row}" for p in batch] != row["data/prompt_ids"]:
            raise RuntimeError(f"step {row['step']}: the prompts drawn here differ from the run's")
        if row["step"] > job.warmup:
            work.append({"prompts": [p.prompt_ids for p in batch], "length": max(1, round(row["response_len/mean"]))})
    return work


def bare_generate(spec: dict) -> dict:
    """vLLM alone: each step's prompts to each step's length."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    import torch

    torch.set_num_threads(THREADS)
    import vllm
    from vllm.inputs import TokensPrompt

    from rlengine.model import resolve_model_path

    llm = vllm.LLM(model=resolve_model_path("embedded"), dtype=torch.float32, seed=42, enforce_eager=True,
                   max_model_len=spec["max_model_len"], enable_prefix_caching=True,
                   distributed_executor_backend="uni", kv_cache_memory_bytes=1 << 30)
    times, tokens = [], []
    for step in spec["work"]:
        params = vllm.SamplingParams(n=spec["group"], temperature=1.0, max_tokens=step["length"],
                                     min_tokens=step["length"], ignore_eos=True, logprobs=0)
        t0 = time.perf_counter()
        out = llm.generate([TokensPrompt(prompt_token_ids=p) for p in step["prompts"]], params, use_tqdm=False)
        times.append(time.perf_counter() - t0)
        tokens.append([[list(p), list(c.token_ids)] for p, o in zip(step["prompts"], out) for c in o.outputs])
    return {"times": times, "sequences": tokens}


def bare_train(spec: dict) -> dict:
    """DeepSpeed ZeRO-3 alone: one forward + backward + step a step over the generated sequences."""
    from rlengine.runtime import configure_process

    configure_process(threads=THREADS)         # before deepspeed is imported: DS_ACCELERATOR=cpu
    import deepspeed
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from rlengine.actor import deepspeed_config, make_batch
    from rlengine.config import load_config
    from rlengine.model import resolve_model_path

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(spec["port"]), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")
    dist.init_process_group("gloo", rank=0, world_size=1)
    cfg = load_config(REPO / "configs/default.yaml", spec["overrides"])
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path("embedded"), dtype=torch.float32)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                      config=deepspeed_config(cfg, dp_world_size=1, grad_accum=1))
    times = []
    for sequences in spec["sequences"]:
        batch = make_batch([p for p, _ in sequences], [r for _, r in sequences], pad_id=0)
        advantages = torch.randn(len(sequences), 1)
        t0 = time.perf_counter()
        # the body once, the LM head only where a response token is predicted (as any careful loop does)
        hidden = engine.module.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)[0]   # [B, S, H]
        before = (batch.resp_pos - 1).clamp_min(0)                                                       # [B, T]
        picked = hidden.gather(1, before[..., None].expand(-1, -1, hidden.shape[-1]))                   # [B, T, H]
        logits = engine.module.lm_head(picked).float()                                                   # [B, T, V]
        logp = torch.log_softmax(logits, -1).gather(-1, batch.targets[..., None])[..., 0]                # [B, T]
        resp = batch.resp_mask
        loss = -(logp * advantages * resp).sum() / resp.sum()
        engine.backward(loss)
        engine.step()
        times.append(time.perf_counter() - t0)
    dist.destroy_process_group()
    return {"times": times}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_part(part: str, spec: dict) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    try:
        out = subprocess.run([sys.executable, __file__, f"--_{part}", f.name], capture_output=True, text=True,
                             cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(THREADS)))
    finally:
        os.unlink(f.name)
    if out.returncode != 0:
        raise RuntimeError(f"bare {part} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_job_arguments(ap, share_prompt_flag=False)   # the bare training part is a plain padded forward+backward
    ap.add_argument("--_generate", help=argparse.SUPPRESS)
    ap.add_argument("--_train", help=argparse.SUPPRESS)
    args = ap.parse_args()
    for part, fn in (("_generate", bare_generate), ("_train", bare_train)):
        if getattr(args, part):
            print(json.dumps(fn(json.loads(Path(getattr(args, part)).read_text()))))
            return
    job = job_from(args)
    runs = {}
    for mode, k in (("sync", 0), ("async", 1)):
        runs[mode] = run_rlengine(job, nproc=2, trainers=1, extra=SEPARATE + [f"rollout.max_staleness={k}"])
        print(f"engine {mode}: {summary(job, runs[mode])['s_per_step']:.2f} s/step", flush=True)
    work = steady_work(job, runs["sync"])
    from rlengine.config import load_config

    cfg = load_config(REPO / "configs/default.yaml", job.overrides(1) + SEPARATE)
    gen = _run_part("generate", {"work": work, "group": job.group,
                                 "max_model_len": cfg.data.max_prompt_tokens + job.max_new_tokens})
    train = _run_part("train", {"sequences": gen["sequences"], "overrides": job.overrides(1) + SEPARATE,
                                "port": _free_port()})
    bare_gen, bare_train_s = statistics.median(gen["times"]), statistics.median(train["times"])
    sync_s, async_s = summary(job, runs["sync"])["s_per_step"], summary(job, runs["async"])["s_per_step"]
    result = {
        "sync": {"step_s": sync_s, "bare_sum_s": bare_gen + bare_train_s, "ratio": sync_s / (bare_gen + bare_train_s),
                 "phases": summary(job, runs["sync"])},
        "async": {"step_s": async_s, "bare_max_s": max(bare_gen, bare_train_s),
                  "ratio": async_s / max(bare_gen, bare_train_s), "phases": summary(job, runs["async"])},
        "bare": {"generate_s": bare_gen, "train_s": bare_train_s, "generate_times": gen["times"],
                 "train_times": train["times"]},
        "target": {"sync": 1.15, "async": 1.15},
        "setup": {"job": vars(job), "placement": "separate, 1 trainer + 1 vLLM rank, 1 thread each",
                  "cpu": cpu_description()},
    }
    print(f"sync  : step {sync_s:.2f} s vs bare {bare_gen:.2f} + {bare_train_s:.2f} s: "
          f"{result['sync']['ratio']:.3f}x", flush=True)
    print(f"async : step {async_s:.2f} s vs bare max {max(bare_gen, bare_train_s):.2f} s: "
          f"{result['async']['ratio']:.3f}x", flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
