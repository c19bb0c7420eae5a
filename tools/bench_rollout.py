"""Benchmark: rollout tokens/s of vLLM (VLLMSampler) against HF `generate`, same prompts and lengths.

Both in this one process, one after the other, same dtype and thread count. Every response is
forced to the full length (EOS ignored) so both generate exactly prompts * n * max_new_tokens
tokens. HF runs `generate` on the left-padded batch (sampling at T = 1); vLLM runs in-process through
`VLLMSampler.generate` (log-probs included; fp32 eager, 1 GiB KV cache). The timing excludes start-up and one warm-up call.

    python tools/bench_rollout.py [--model embedded] [--dtype fp32] [--prompts 8] [--n 1]
                                  [--max-new-tokens 64] [--threads 1] [--repeats 2]

Last stdout line: {"hf": {"tokens_per_s": ...}, "vllm": {"tokens_per_s": ...}, ...}
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

QUESTIONS = ["What is 12 + 7?", "Name the capital of France.", "Write a short poem about rain.",
             "Explain what a prime number is.", "How many legs does a spider have?",
             "What is the square root of 81?", "Give me a synonym for happy.", "Why is the sky blue?"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--n", type=int, default=1, help="samples per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlengine.model import resolve_model_path

    path = resolve_model_path(args.model)
    tok = AutoTokenizer.from_pretrained(path)
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(args.prompts)]
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True)
               for q in questions]
    prompts = [list(p["input_ids"]) if isinstance(p, dict) or hasattr(p, "keys") else list(p) for p in prompts]
    expected_tokens = args.prompts * args.n * args.max_new_tokens
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]

    # ---- HF generate ----
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])  # [B, P] left-padded
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])

    def hf_run(max_new: int) -> int:
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_p=1.0,
                                 max_new_tokens=max_new, min_new_tokens=max_new, num_return_sequences=args.n,
                                 pad_token_id=pad)
        return (out.shape[1] - width) * out.shape[0]

    hf_run(4)
    hf_times, hf_tokens = [], 0
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        hf_tokens = hf_run(args.max_new_tokens)
        hf_times.append(time.perf_counter() - t0)
    del model

    # ---- vLLM ----
    from rlengine.rollout.base import SamplingParams
    from rlengine.rollout.vllm_sampler import VLLMSampler

    t0 = time.perf_counter()
    sampler = VLLMSampler(path, dtype=args.dtype, num_threads=args.threads, max_model_len=1024)
    start_s = time.perf_counter() - t0

    def vllm_run(max_new: int) -> int:
        gen = sampler.generate(prompts, args.n, SamplingParams(temperature=1.0, max_new_tokens=max_new, seed=0),
                               ignore_eos=True)
        return sum(len(r) for r in gen.response_ids)

    sampler.generate(prompts[:1], 1, SamplingParams(max_new_tokens=4))  # warm-up through the public path
    vllm_times, vllm_tokens = [], 0
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        vllm_tokens = vllm_run(args.max_new_tokens)
        vllm_times.append(time.perf_counter() - t0)
    sampler.close()

    hf_s, vllm_s = statistics.median(hf_times), statistics.median(vllm_times)
    assert hf_tokens == vllm_tokens == expected_tokens, (hf_tokens, vllm_tokens, expected_tokens)
    result = {"hf": {"tokens_per_s": hf_tokens / hf_s, "seconds": hf_s},
              "vllm": {"tokens_per_s": vllm_tokens / vllm_s, "seconds": vllm_s, "startup_s": start_s},
              "speedup": hf_s / vllm_s,
              "config": {"model": args.model, "dtype": args.dtype, "prompts": args.prompts, "n": args.n,
                         "max_new_tokens": args.max_new_tokens, "threads": args.threads, "repeats": args.repeats}}
    print(f"HF generate {result['hf']['tokens_per_s']:.1f} tok/s | vLLM {result['vllm']['tokens_per_s']:.1f} tok/s "
          f"| x{result['speedup']:.2f}", file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
