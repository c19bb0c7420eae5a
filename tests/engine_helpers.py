"""Shared helpers for the engine tests: run rlengine/train.py through the real deepspeed launcher."""
from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# small enough to take seconds per step on 2 CPU cores, big enough to exercise every phase
TINY = [
    "model.dtype=fp32", "rollout.prompts_per_step=2", "rollout.group_size=4", "rollout.max_new_tokens=12",
    "train.num_iterations=2", "train.micro_batch_size=4", "train.mini_batch_prompts=2",
    "data.max_prompt_tokens=512", "reward.num_workers=1", "run.token_dump_every=1",
    "run.tensorboard=true", "train.lr=1e-5", "reward.name=tests.rewards_for_tests:digit_fraction",
]



def on_tiny_model(model_dir: str) -> list[str]:
    """Overrides (after TINY) that train the random tiny model of tests/conftest.py `tiny_model_dir`:
    its tokens are near-uniform over the 49k vocabulary, so the reward is the vowel fraction (digits
    are too rare to vary within a group), and lr 1e-3 moves its small logits (|z| < 1) enough that
    a second pass over a batch sees ratios off 1 by far more than ratio_left_one's fp32 bound."""
    return [f"model.path={model_dir}", "reward.name=tests.rewards_for_tests:vowel_fraction", "train.lr=1e-3"]


# ----------------------------------------------------------------------------- tolerances
EPS64 = 2.0 ** -52          # torch.finfo(torch.float64).eps (this module does not import torch)
EPS32 = 2.0 ** -23          # torch.finfo(torch.float32).eps

# The five frac_<region> of a metrics line are token-weighted float64 means over a step's
# micro-batches (every rank's): count / n rounded once per micro-batch, weighted by n, summed and
# divided by the total, <= M + 2 roundings of each fraction for M micro-batches; the five then sum
# with 4 more roundings of values <= 1. The TINY runs have M = 4 a step (2 iterations x 8 samples
# in micro-batches of 4): <= ~10 eps64, and 32 eps64 leaves 3x (measured: exactly 1).
FRAC_SUM_TOL = 32 * EPS64

# fp32 log-probs of the same weights from two different forward implementations (KV-cached decode vs
# a full forward, vLLM vs HF, a padded batch vs one sequence: the sampler vs the trainer) for the
# embedded SmolLM2-135M. Per token the head alone differs by 2 eps32 S + 4 eps32 (|logp| + max|z|),
# S = max_v sum_i |h_i w_vi| / T (tests/test_logprobs_model.py). The L = 30 decoder layers before it
# round differently too, each moving the residual stream by up to ~eps32 of itself, which the head
# turns into S times that: 2 L eps32 S for the two sides when every layer's rounding adds up. S at
# T = 1 is 127-176 over the tests' tokens (FP32_S_MAX = 180): 1.3e-3 / T. Measured: ~1.5e-5 (HF
# KV-cached decode vs a full forward; a real run's sync/probe_abs_diff), 6e-5 (vLLM vs HF), up to
# ~5e-4 (a padded batch vs one sequence); bf16 on either side gives 0.024-0.07 and a sampler with
# stale weights 1.7 (rlengine/placement.py), so the bound still tells those apart.
FP32_LAYERS, FP32_S_MAX = 30, 180.0


def fp32_logprob_tol(temperature: float = 1.0) -> float:
    """Bound on |sampler log-prob - trainer log-prob| (and on their mean, the probe gap), fp32 both."""
    return 2 * FP32_LAYERS * EPS32 * FP32_S_MAX / temperature


def ratio_left_one(row: dict) -> bool:
    """A metrics line whose token ratios left 1 by more than fp32 recomputation noise: an unchanged
    policy recomputed on another micro-batch layout (padding, so kernels) moves a log-prob by at
    most fp32_logprob_tol(), so its ratio stays within exp(+-tol) of 1."""
    tol = fp32_logprob_tol()
    return row["ratio_max"] > math.exp(tol) or row["ratio_min"] < math.exp(-tol)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_prefix(tmp: Path, nproc: int, ssh: bool = False) -> list[str]:
    """The deepspeed launcher on a localhost hostfile (written into `tmp`) with `nproc` slots,
    up to (not including) the training script."""
    hosts = tmp / "hosts"
    hosts.write_text(f"localhost slots={nproc}\n")
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hosts),
           "--master_port", str(free_port())]
    if not ssh:
        cmd += ["--no_ssh", "--node_rank", "0", "--master_addr", "127.0.0.1"]
    return cmd


def launch_cmd(tmp: Path, nproc: int, overrides: list[str], config: str | list[str] = "configs/default.yaml",
               ssh: bool = False, script: str = "rlengine/train.py") -> list[str]:
    """`script` is rlengine/train.py, or a test's wrapper of it that injects a fault (tests/hooks/)."""
    configs = [a for c in ([config] if isinstance(config, str) else config) for a in ("--config", str(REPO / c))]
    return launcher_prefix(tmp, nproc, ssh) + [str(REPO / script), *configs, *overrides]


def run_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("OMP_NUM_THREADS", None)   # the program sizes its own thread pools
    return env


def run_training(tmp: Path, nproc: int, overrides: list[str], timeout: float = 900, pythonpath: str | None = None,
                 **kw):
    env = run_env()
    if pythonpath:
        env["PYTHONPATH"] = pythonpath + os.pathsep + env["PYTHONPATH"]
    cmd = launch_cmd(tmp, nproc, overrides, **kw)
    # its own process group: on a timeout the launcher AND its ranks are killed, no orphan keeps waiting
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def read_metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
