"""Throughput of RewardPool against one process on the same completions.

    OMP_NUM_THREADS=1 python tools/bench_rewards.py [--items 2000] [--workers 2] [--repeats 3]

The completions are seeded, distinct, new in every repeat and varied (think/answer format or not, right and wrong
answers, integers, decimals, fractions, LaTeX, thousands separators, free text), so math-verify's
caches do not flatter either side. Both sides score the same list with the same reward; each side
runs `--repeats` times, interleaved, and the best rate of each is reported (on a shared machine
the best run is the least disturbed one). Also reported: CPU seconds per 1000 items on each side
(the pool's parent + workers), which shows the pool's overhead even when other processes take
cores, and the 1-minute load average. JSON on the last stdout line.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from rlengine.rewards import RewardPool, get_reward  # noqa: E402


def make_completions(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    texts, truths = [], []
    for i in range(n):
        value = rng.randint(1, 50_000)
        kind = i % 6
        if kind == 0:
            truth, written = str(value), str(value)
        elif kind == 1:
            truth, written = str(value), f"{value:,}"
        elif kind == 2:
            a, b = rng.randint(1, 99), rng.randint(2, 99)
            truth, written = f"\\frac{{{a}}}{{{b}}}", f"{a / b:.6f}"
        elif kind == 3:
            truth, written = str(value), f"{value + rng.randint(1, 9)}"          # wrong
        elif kind == 4:
            truth, written = f"{value}.5", f"\\frac{{{2 * value + 1}}}{{2}}"
        else:
            truth, written = str(value), f"The total is {value} dollars"
        think = f"We add {rng.randint(1, 999)} and {rng.randint(1, 999)} step by step."
        if rng.random() < 0.5:
            text = f"<think> {think} </think> <answer> {written} </answer>"
        else:
            text = f"{think} So the answer is <answer>{written}</answer> done"
        texts.append(text)
        truths.append(truth)
    return texts, truths


def _cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of processes (Linux /proc), 0 where unreadable."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            pass
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--chunk-size", type=int, default=8, help="items per message to a worker")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--reward", default="answer_format")
    args = parser.parse_args()

    texts, truths = make_completions(200, seed=0)
    spec = get_reward(args.reward)
    single_rates, pool_rates, single_cpu, pool_cpu = [], [], [], []
    with RewardPool(num_workers=args.workers, timeout_s=5.0, chunk_size=args.chunk_size) as pool:
        pool.score(texts[:50], truths[:50], reward=args.reward)  # warm the workers' caches of sympy
        for _ in range(50):
            spec(texts[0], truths[0])                              # and this process's
        for rep in range(args.repeats):
            # fresh completions every repeat (math-verify and sympy cache parses: a repeat of the
            # same texts would flatter whichever side had seen them)
            texts, truths = make_completions(args.items, seed=rep + 1)
            start, cpu = time.perf_counter(), time.process_time()
            single = [spec(t, g)["reward"] for t, g in zip(texts, truths)]
            single_rates.append(args.items / (time.perf_counter() - start))
            single_cpu.append(time.process_time() - cpu)
            pids = pool.worker_pids
            start, cpu, worker_cpu = time.perf_counter(), time.process_time(), _cpu_seconds(pids)
            pooled = pool.score(texts, truths, reward=args.reward)
            pool_rates.append(args.items / (time.perf_counter() - start))
            pool_cpu.append(time.process_time() - cpu + _cpu_seconds(pids) - worker_cpu)
            if pooled != single:
                raise SystemExit("pool and single-process scores differ")
            print(f"repeat {rep}: single {single_rates[-1]:.0f}/s  pool {pool_rates[-1]:.0f}/s  "
                  f"ratio {pool_rates[-1] / single_rates[-1]:.2f}", file=sys.stderr)
        stats = dict(pool.stats)
    result = {
        "single": {"items_per_s": round(max(single_rates), 1), "runs": [round(r, 1) for r in single_rates]},
        "pool": {"items_per_s": round(max(pool_rates), 1), "runs": [round(r, 1) for r in pool_rates],
                 "workers": args.workers},
        "speedup": round(max(pool_rates) / max(single_rates), 3),
        # CPU seconds per 1000 items (parent + workers for the pool): the pool's overhead, which
        # contention from other processes does not distort the way it distorts wall-clock rates
        "cpu_s_per_1k": {"single": round(1000 * min(single_cpu) / args.items, 3),
                         "pool": round(1000 * min(pool_cpu) / args.items, 3)},
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "items": args.items, "reward": args.reward, "mean_reward": round(sum(single) / len(single), 4),
        "timeouts": stats["timeouts"], "errors": stats["errors"], "cpus": os.cpu_count(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
