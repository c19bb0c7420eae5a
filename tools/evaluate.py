#!/usr/bin/env python
"""Evaluate a model on math datasets: Avg@k and unbiased Pass@k from k samples per problem.

    python tools/evaluate.py MODEL [--data SPEC ...] [-n 8] [--temperature 0.7] [--greedy] \
        [--max-new-tokens 512] [--system-prompt think_answer] [--reward answer] [--limit N] \
        [--backend auto|hf|vllm] [--cache DIR] [--out results.json]

MODEL: an HF directory, `embedded`, a hub name in the local cache, a run directory (its final/
model, else its newest checkpoint), or one checkpoint `checkpoints/step_XXXXXX/` (exported once
with tools/export.py into `<checkpoint>/hf`, verified, then reused).

--data SPEC, repeatable: `PRESET[=PATH][@SPLIT]` with a preset of rlengine.data (arithmetic,
gsm8k, math, deepmath, dapo, aime, custom), e.g. `gsm8k=/data/gsm8k_test.jsonl@test`,
`math=HuggingFaceH4/MATH-500@test`. Default: the bundled arithmetic test split. A dataset is named
by its preset (or `NAME:SPEC` to name it yourself).

Each problem is chat-templated with the system prompt (default: the run's data.system_prompt,
else think_answer), sampled n times through the rollout backend (vLLM when installed, else
Hugging Face `generate`), and scored with a registered reward (default: `answer` for the
<answer> template, `boxed` for the boxed one); a sample is correct when it scores >= 1.
Reported per dataset and overall (all problems pooled): Avg@n, Pass@k for k = 1, 2, 4, ... and n,
mean response length and the share cut at max_new_tokens. `--greedy` samples once, greedily.

Generations are appended to a cache (`--cache`, default `.eval_cache/<model+settings hash>`)
after every chunk of problems, so an interrupted evaluation resumes where it stopped; chunk
seeds depend only on (seed, dataset, chunk), so a resumed run samples what an uninterrupted one
would have.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


class EvalError(ValueError):
    """Bad evaluation input (the message names the option, file or dataset)."""


@dataclass
class DataSpec:
    name: str
    preset: str
    path: str | None
    split: str

    # duck-typed DataSource for rlengine.data.load_examples
    prompt_field = None
    answer_field = None
    skip_bad_rows = False


def parse_data_spec(text: str) -> DataSpec:
    """`[NAME:]PRESET[=PATH][@SPLIT]` -> DataSpec (split defaults to test for the bundled set)."""
    from rlengine import data

    name = None
    head = text
    if ":" in text.split("=", 1)[0]:
        name, head = text.split(":", 1)
    split = None
    if "@" in head:
        head, split = head.rsplit("@", 1)
    preset, _, path = head.partition("=")
    preset = preset.strip()
    if preset not in data.PRESETS:
        raise EvalError(f"--data {text!r}: unknown preset {preset!r}; valid: {', '.join(sorted(data.PRESETS))}")
    path = path.strip() or None
    if path is None and preset != "arithmetic":
        raise EvalError(f"--data {text!r}: preset {preset!r} needs a path ({preset}=PATH); "
                        "only 'arithmetic' has a bundled set")
    return DataSpec(name=(name or preset).strip(), preset=preset, path=path,
                    split=(split or ("test" if path is None else "train")).strip())


# ----------------------------------------------------------------------------- the model

def resolve_model(model: str, export_dir: str | None = None) -> tuple[str, Path | None]:
    """(loadable model path, the run/checkpoint directory whose config.yaml gives defaults, or None)."""
    from rlengine.model import resolve_model_path

    p = Path(model).expanduser()
    if p.is_dir() and not (p / "config.json").is_file():
        if (p / "final" / "config.json").is_file():                      # a finished run
            return str(p / "final"), p
        if (p / "checkpoints").is_dir() or (p / "ds").is_dir():
            import export as E

            ckpt, _, _ = E.locate_checkpoint(p)
            if ckpt is None:
                raise EvalError(f"{p}: a bare DeepSpeed directory; export it first with tools/export.py --base-model")
            out = Path(export_dir) if export_dir else ckpt / "hf"
            meta = out / "rlengine_export.json"
            if not (meta.is_file() and (out / "config.json").is_file()):
                print(f"exporting {ckpt} -> {out} ...", file=sys.stderr, flush=True)
                report = E.export_checkpoint(ckpt, out)
                print(f"  verified, max |delta log-prob| = {report.max_abs_diff:.3g}", file=sys.stderr)
            return str(out), ckpt
        raise EvalError(f"{p}: not a model directory (no config.json), a run directory or a checkpoint")
    try:
        return resolve_model_path(model), None
    except FileNotFoundError as e:
        raise EvalError(str(e)) from None


def run_defaults(run_dir: Path | None) -> dict:
    """system_prompt, reward, max_new_tokens from a run's / checkpoint's config.yaml (if any)."""
    import yaml

    if run_dir is None or not (run_dir / "config.yaml").is_file():
        return {}
    raw = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    out = {}
    if (raw.get("data") or {}).get("system_prompt"):
        out["system_prompt"] = raw["data"]["system_prompt"]
    if (raw.get("rollout") or {}).get("max_new_tokens"):
        out["max_new_tokens"] = int(raw["rollout"]["max_new_tokens"])
    return out


def model_fingerprint(model_path: str) -> str:
    """Identity of the weights: the path plus the size and mtime of every weight file."""
    p = Path(model_path)
    items = [str(p.resolve()) if p.exists() else model_path]
    if p.is_dir():
        for f in sorted(p.glob("*.safetensors")) + sorted(p.glob("*.bin")):
            st = f.stat()
            items.append(f"{f.name}:{st.st_size}:{int(st.st_mtime)}")
    return "|".join(items)


# ----------------------------------------------------------------------------- metrics

def ks_for(n: int) -> list[int]:
    """1, 2, 4, ... up to n, plus n itself."""
    ks, k = [], 1
    while k <= n:
        ks.append(k)
        k *= 2
    if ks[-1] != n:
        ks.append(n)
    return ks


def summarize(scores: list[list[float]], lengths: list[list[int]], truncated: list[list[bool]]) -> dict:
    from rlengine.metrics import avg_at_k, mean_pass_at_k

    n = min(len(s) for s in scores)
    out = {"problems": len(scores), "samples": n, f"avg@{n}": avg_at_k(scores)}
    for k in ks_for(n):
        out[f"pass@{k}"] = mean_pass_at_k(scores, k)
    flat_len = [x for row in lengths for x in row]
    flat_trunc = [x for row in truncated for x in row]
    out["mean_response_tokens"] = sum(flat_len) / max(1, len(flat_len))
    out["truncated_frac"] = sum(flat_trunc) / max(1, len(flat_trunc))
    return out


def format_table(results: dict, greedy: bool) -> str:
    rows = list(results.items())
    keys = [k for k in rows[0][1] if k.startswith(("avg@", "pass@"))]
    if greedy:
        keys = ["avg@1"]
    head = ["dataset", "problems", "n"] + (["greedy acc"] if greedy else keys) + ["len", "cut"]
    lines = [head]
    for name, r in rows:
        lines.append([name, str(r["problems"]), str(r["samples"])] + [f"{100 * r[k]:.1f}" for k in keys]
                     + [f"{r['mean_response_tokens']:.0f}", f"{100 * r['truncated_frac']:.0f}%"])
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    text = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
            for row in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    if len(rows) > 2:
        text.insert(len(text) - 1, "  ".join("-" * w for w in widths))
    return "\n".join(text) + "\n(accuracies in %; pass@k unbiased; len = mean response tokens; cut = hit max_new_tokens)"


# ----------------------------------------------------------------------------- cache

class GenerationCache:
    """Append-only JSONL of finished problems: {"dataset", "index", "qhash", "texts", "lengths",
    "finish", "scores"}. A torn last line (a kill mid-write) is ignored."""

    def __init__(self, directory: Path, settings: dict):
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        settings_file = self.dir / "settings.json"
        if settings_file.is_file():
            old = json.loads(settings_file.read_text())
            if old != settings:
                raise EvalError(f"cache {self.dir} was made with other settings; use another --cache or delete it")
        else:
            settings_file.write_text(json.dumps(settings, indent=1, sort_keys=True))
        self.path = self.dir / "generations.jsonl"
        self.done: dict[tuple[str, int], dict] = {}
        if self.path.is_file():
            lines = self.path.read_text().splitlines()
            for i, line in enumerate(lines):
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    if i == len(lines) - 1:
                        break
                    raise EvalError(f"{self.path}, line {i + 1}: corrupt record") from None
                self.done[(rec["dataset"], rec["index"])] = rec
            # rewrite without a torn tail so appends start on a fresh line
            self.path.write_text("".join(json.dumps(r) + "\n" for r in self.done.values()))

    def add(self, records: list[dict]) -> None:
        with open(self.path, "a") as f:
            for rec in records:
                f.write(json.dumps(rec) + "\n")
                self.done[(rec["dataset"], rec["index"])] = rec
            f.flush()
            os.fsync(f.fileno())


def _qhash(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def chunk_seed(seed: int, dataset: str, chunk: int) -> int:
    return int(hashlib.sha1(f"{seed}|{dataset}|{chunk}".encode()).hexdigest()[:8], 16)


# ----------------------------------------------------------------------------- evaluation

def build_backend(backend: str, model_path: str, dtype: str, batch_size: int, seed: int, max_model_len: int):
    from rlengine.rollout import build_sampler

    if backend == "auto":
        from rlengine.rollout.vllm_sampler import in_process_possible, vllm_available

        backend = "vllm" if vllm_available() and in_process_possible() else "hf"
    if backend == "vllm":
        return build_sampler("vllm", model_path, dtype=dtype, seed=seed, max_model_len=max_model_len), backend
    return build_sampler("hf", model_path, dtype=dtype, batch_size=batch_size), backend


def evaluate(model: str, datasets: list[DataSpec], n: int = 8, temperature: float = 0.7, top_p: float = 1.0,
             greedy: bool = False, max_new_tokens: int | None = None, system_prompt: str | None = None,
             reward: str | None = None, limit: int | None = None, backend: str = "auto", dtype: str = "fp32",
             batch_size: int = 16, chunk_problems: int = 8, seed: int = 0, cache_dir: str | None = None,
             reward_workers: int = 2, progress: bool = True, export_dir: str | None = None,
             stop_after_chunks: int | None = None) -> dict:
    """Run the evaluation; returns {"model", "settings", "results": {dataset: metrics, "overall": ...}}.

    `stop_after_chunks` (tests) stops after that many newly generated chunks, as a kill would."""
    from tqdm import tqdm

    from rlengine import data
    from rlengine.model import load_tokenizer
    from rlengine.rewards import RewardPool, get_reward
    from rlengine.rollout import SamplingParams

    model_path, run_dir = resolve_model(model, export_dir)
    defaults = run_defaults(run_dir)
    system_prompt = system_prompt or defaults.get("system_prompt", "think_answer")
    max_new_tokens = max_new_tokens or defaults.get("max_new_tokens", 512)
    if reward is None:
        reward = "boxed" if system_prompt == "boxed" else "answer"
    get_reward(reward)  # unknown names fail before any model loads
    if greedy:
        n = 1
    if n < 1:
        raise EvalError(f"-n {n}: need at least one sample per problem")
    if not datasets:
        datasets = [parse_data_spec("arithmetic")]
    names = [d.name for d in datasets]
    if len(set(names)) != len(names):
        raise EvalError(f"--data: two datasets named the same ({names}); name them NAME:SPEC")

    tokenizer = load_tokenizer(model_path)
    problems: dict[str, list] = {}
    for spec in datasets:
        examples = data.load_examples(spec, name=spec.name)
        problems[spec.name] = examples[:limit] if limit else examples

    settings = {"model": model_fingerprint(model_path), "n": n, "temperature": None if greedy else temperature,
                "top_p": None if greedy else top_p, "greedy": greedy, "max_new_tokens": max_new_tokens,
                "system_prompt": system_prompt, "reward": reward, "seed": seed, "chunk": chunk_problems}
    key = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    cache = GenerationCache(Path(cache_dir) if cache_dir else Path(".eval_cache") / key, settings)

    todo = [(name, i) for name, exs in problems.items() for i in range(len(exs)) if (name, i) not in cache.done]
    sampler = pool = None
    used_backend = None
    new_chunks = 0
    bar = tqdm(total=sum(len(v) for v in problems.values()), initial=sum(len(v) for v in problems.values()) - len(todo),
               desc="problems", unit="prob", disable=not progress, file=sys.stderr)
    try:
        for name, exs in problems.items():
            prompts = [data.apply_chat_template(tokenizer, ex.messages or ex.question, system_prompt) for ex in exs]
            ids = data.encode_prompts(tokenizer, prompts)
            for chunk, start in enumerate(range(0, len(exs), chunk_problems)):
                idx = [i for i in range(start, min(start + chunk_problems, len(exs))) if (name, i) not in cache.done]
                if not idx:
                    continue
                if stop_after_chunks is not None and new_chunks >= stop_after_chunks:
                    raise KeyboardInterrupt
                if sampler is None:
                    max_len = max(len(x) for x in ids) + max_new_tokens
                    sampler, used_backend = build_backend(backend, model_path, dtype, batch_size, seed, max_len)
                    pool = RewardPool(num_workers=reward_workers, timeout_s=5.0)
                # the whole chunk is (re)generated with the chunk's seed, so resuming reproduces it
                chunk_idx = list(range(start, min(start + chunk_problems, len(exs))))
                sampling = SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                                          greedy=greedy, seed=chunk_seed(seed, name, chunk))
                gen = sampler.generate([ids[i] for i in chunk_idx], n, sampling)
                texts = gen.texts
                truths = [exs[i].answer for i in chunk_idx for _ in range(n)]
                scores = pool.score(texts, truths, reward=reward)
                records = []
                for j, i in enumerate(chunk_idx):
                    if i not in idx:
                        continue
                    sl = slice(j * n, (j + 1) * n)
                    records.append({"dataset": name, "index": i, "qhash": _qhash(prompts[i]), "texts": texts[sl],
                                    "lengths": [len(r) for r in gen.response_ids[sl]],
                                    "finish": gen.finish_reasons[sl], "scores": scores[sl],
                                    "answer": exs[i].answer})
                cache.add(records)
                new_chunks += 1
                bar.update(len(records))
    finally:
        bar.close()
        if pool is not None:
            pool.close()
        if sampler is not None:
            sampler.close()

    results, all_scores, all_len, all_cut = {}, [], [], []
    for name, exs in problems.items():
        recs = [cache.done[(name, i)] for i in range(len(exs))]
        for i, rec in enumerate(recs):
            if rec["qhash"] != _qhash(data.apply_chat_template(tokenizer, exs[i].messages or exs[i].question,
                                                               system_prompt)):
                raise EvalError(f"cache {cache.dir}: problem {i} of {name!r} changed since it was generated; "
                                "use a fresh --cache")
        scores = [r["scores"] for r in recs]
        lengths = [r["lengths"] for r in recs]
        cut = [[f == "length" for f in r["finish"]] for r in recs]
        results[name] = summarize(scores, lengths, cut)
        all_scores += scores
        all_len += lengths
        all_cut += cut
    results["overall"] = summarize(all_scores, all_len, all_cut)
    return {"model": model_path, "backend": used_backend, "cache": str(cache.dir), "settings": settings,
            "results": results}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Avg@k / Pass@k evaluation of a model, run or checkpoint.")
    ap.add_argument("model", help="HF dir | embedded | run dir | checkpoints/step_XXXXXX")
    ap.add_argument("--data", action="append", default=None, metavar="SPEC",
                    help="[NAME:]PRESET[=PATH][@SPLIT], repeatable (default: arithmetic, bundled test split)")
    ap.add_argument("-n", "--samples", type=int, default=8, help="samples per problem (default 8)")
    ap.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (default 0.7)")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--greedy", action="store_true", help="one greedy sample per problem (accuracy)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default: the run's rollout.max_new_tokens, else 512")
    ap.add_argument("--system-prompt", default=None, help="think_answer | boxed | none | literal text "
                    "(default: the run's data.system_prompt, else think_answer)")
    ap.add_argument("--reward", default=None, help="correctness reward (default: answer, or boxed with the boxed prompt)")
    ap.add_argument("--limit", type=int, default=None, help="first N problems of each dataset")
    ap.add_argument("--backend", choices=("auto", "hf", "vllm"), default="auto")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--batch-size", type=int, default=16, help="HF generate batch (sequences)")
    ap.add_argument("--chunk", type=int, default=8, help="problems per generation call / cache append")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reward-workers", type=int, default=2)
    ap.add_argument("--cache", default=None, help="cache directory (default .eval_cache/<settings hash>)")
    ap.add_argument("--export-dir", default=None, help="where a checkpoint is exported (default <checkpoint>/hf)")
    ap.add_argument("--out", default=None, help="write the JSON results here (default <cache>/results.json)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    start = time.time()
    try:
        datasets = [parse_data_spec(s) for s in (args.data or ["arithmetic"])]
        report = evaluate(args.model, datasets, n=args.samples, temperature=args.temperature, top_p=args.top_p,
                          greedy=args.greedy, max_new_tokens=args.max_new_tokens, system_prompt=args.system_prompt,
                          reward=args.reward, limit=args.limit, backend=args.backend, dtype=args.dtype,
                          batch_size=args.batch_size, chunk_problems=args.chunk, seed=args.seed,
                          cache_dir=args.cache, reward_workers=args.reward_workers, progress=not args.no_progress,
                          export_dir=args.export_dir)
    except KeyboardInterrupt:
        print("interrupted: finished chunks are cached; run the same command again to resume", file=sys.stderr)
        return 130
    except (EvalError, FileNotFoundError, ValueError) as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 2
    report["seconds"] = time.time() - start
    out = Path(args.out) if args.out else Path(report["cache"]) / "results.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    how = "greedy" if args.greedy else f"T={args.temperature}, n={report['settings']['n']}"
    print(f"model {report['model']} ({report['backend'] or 'all cached'}), {how}")
    print(format_table(report["results"], args.greedy))
    print(f"results: {out}")
    print(json.dumps(report["results"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
