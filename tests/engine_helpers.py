"""Shared helpers for the engine tests: run rlengine/train.py through the real deepspeed launcher."""
from __future__ import annotations

import json
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
