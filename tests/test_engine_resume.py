"""Resume is exact: 4 steps straight against 2 steps + kill -9 + resume to 4, with four mini-batches
per step (so the mini-batch shuffle matters), one trainer rank, fp32, through the real launcher, on
the random tiny Llama of tests/conftest.py (what is restored does not depend on the model's size).

The first kill lands after step 3's metrics line is written and before any step-3 checkpoint exists
(checkpoints every 2 steps). The resumed run is killed again in the middle of step 4's checkpoint
save (tests/hooks/train_slow_save.py pauses it after the shards, before the commit): `latest` must
still name step 2 and no half-written step 4 may survive. The last resume must drop the lines past
step 2 (truncation), redo steps 3 and 4 with the same samples and shuffle, and prune step 2's
checkpoint at step 4 (keep_last=1).
Tolerance: the two runs execute the same fp32 kernels in the same order on the same machine and
thread count, so every logged number and weight is expected bit-identical; the bound below
(4 fp32 ulps relative) only allows a reordered reduction, and a 1% drift fails by five orders.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
import torch

from tests.engine_helpers import REPO, TINY, launch_cmd, on_tiny_model, read_metrics, run_env, run_training

RESUME = TINY + ["run.total_steps=4", "run.save_every=2", "run.keep_last=1", "run.token_dump_every=0",
                 "run.tensorboard=false", "data.system_prompt=none", "rollout.prompts_per_step=4",
                 "train.mini_batch_prompts=1"]   # 4 mini-batches: 24 orders a pass, so a wrong shuffle shows
NOT_COMPARED = ("time/", "mem/", "tokens_per_s", "samples_per_s", "sync/seconds", "sync/gbps", "sync/probe_")
REL = 4 * torch.finfo(torch.float32).eps


def comparable(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith(NOT_COMPARED) and isinstance(v, (int, float))}


def _run_until_killed(tmp_path, overrides, ready, script="rlengine/train.py", grace_s=0.0, nproc=1):
    """Launch, wait for `ready()`, then SIGKILL the launcher and its ranks."""
    log = open(tmp_path / "killed.log", "a")
    proc = subprocess.Popen(launch_cmd(tmp_path, nproc, overrides, script=script), cwd=REPO, env=run_env(),
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 600
        while not ready():
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "killed.log").read_text()[-3000:]
            time.sleep(0.1)   # a tiny-model step takes ~1.5 s: the kill lands well inside step 4
        time.sleep(grace_s)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)          # the launcher and its rank
        proc.wait()


def test_resume_after_kill9_equals_the_straight_run(tmp_path, tiny_model_dir):
    resume = RESUME + on_tiny_model(tiny_model_dir)
    straight = tmp_path / "straight"
    r = run_training(tmp_path, 1, resume + [f"run.output_dir={straight}"])
    assert r.returncode == 0, r.stderr[-4000:]

    resumed = tmp_path / "resumed"
    # 1. kill -9 after step 3's line, before its checkpoint
    _run_until_killed(tmp_path, resume + [f"run.output_dir={resumed}"],
                      lambda: (resumed / "metrics.jsonl").is_file() and len(read_metrics(resumed)) >= 3)
    assert [x["step"] for x in read_metrics(resumed)] == [1, 2, 3]
    assert (resumed / "checkpoints" / "latest").read_text().strip() == "step_000002"
    # 2. resume; kill -9 again while step 4's checkpoint is being written
    _run_until_killed(tmp_path, resume + [f"run.output_dir={resumed}", "run.resume=auto"],
                      lambda: any((resumed / "checkpoints").glob(".tmp-step_000004")),
                      script="tests/hooks/train_slow_save.py", grace_s=2.0)
    assert (resumed / "checkpoints" / "latest").read_text().strip() == "step_000002"
    assert not (resumed / "checkpoints" / "step_000004").exists()

    # 3. resume to the end
    r = run_training(tmp_path, 1, resume + [f"run.output_dir={resumed}", "run.resume=auto"])
    assert r.returncode == 0, r.stderr[-4000:]
    assert "resumed from" in r.stdout + r.stderr and "step_000002" in r.stdout + r.stderr

    a, b = read_metrics(straight), read_metrics(resumed)
    assert [x["step"] for x in b] == [1, 2, 3, 4]                  # each step exactly once
    for row_a, row_b in zip(a, b):
        ca, cb = comparable(row_a), comparable(row_b)
        assert ca.keys() == cb.keys()
        for k in ca:
            # abs: the logged metrics are sums of terms of magnitude <= ~1 (fractions, ratios, losses,
            # norms), so a reordered reduction moves even a result near 0 by REL x 1
            assert cb[k] == pytest.approx(ca[k], rel=REL, abs=REL), (row_a["step"], k, ca[k], cb[k])
    assert a[2]["optimizer_updates"] == 8                          # 2 iterations x 4 mini-batches: shuffled
    # pruning acted: only the newest checkpoint is left
    assert sorted(p.name for p in (resumed / "checkpoints").glob("step_*")) == ["step_000004"]
    # the final weights agree tensor by tensor
    from safetensors.torch import load_file

    wa, wb = load_file(straight / "final" / "model.safetensors"), load_file(resumed / "final" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=REL, atol=0, msg=k)
