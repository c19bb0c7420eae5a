"""Faults end the job, fast and clearly, and resume continues after them; each through the real
launcher on the random tiny Llama of tests/conftest.py (the faults do not depend on the model).

  * one trainer rank of two is killed (colocated): the launcher sees it and ends the other;
  * the rollout rank is killed (separate): the trainer's next collective fails and it stops;
  * a sampler hangs instead of dying: only rollout.generate_timeout_s can end it;
  * a reward function hangs: the killing pool cuts it off at reward.timeout_s and the run goes on.

Bounds: a job must end within END_BOUND_S of the fault. What it takes: the launcher polls its
ranks every second and then terminates the others (SIGTERM); a rank whose peer died sees its
collective fail at once (gloo: 'Connection closed by peer'); a deadline fires within one poll
(1 s) of passing. 20 s covers those seconds and a loaded 2-core box; a hang would run to the
test's own 300 s timeout.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from tests.engine_helpers import REPO, TINY, launch_cmd, on_tiny_model, read_metrics, run_env, run_training

END_BOUND_S = 20.0
FAST = TINY + ["run.token_dump_every=0", "run.tensorboard=false", "data.system_prompt=none", "run.export_final=false",
               "run.total_steps=4", "run.save_every=1", "run.keep_last=1"]


class Job:
    """A training job through the launcher, in its own process group, with its output in a file."""

    def __init__(self, tmp: Path, nproc: int, overrides: list[str], script: str = "rlengine/train.py"):
        self.log_path = tmp / f"job-{time.monotonic_ns()}.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(launch_cmd(tmp, nproc, overrides, script=script), cwd=REPO, env=run_env(),
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_for(self, ready, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            assert self.proc.poll() is None, self.text()[-4000:]
            assert time.monotonic() < deadline, self.text()[-4000:]
            time.sleep(0.2)

    def rank_process(self, rank: int) -> psutil.Process:
        for p in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                if f"--local_rank={rank}" in " ".join(p.cmdline()):
                    return p
            except psutil.NoSuchProcess:
                continue
        raise AssertionError(f"no process of rank {rank} under the launcher")

    def ended_within(self, seconds: float, since: float) -> float:
        """Seconds from `since` until the launcher exited; kills the job and fails past `seconds`."""
        try:
            self.proc.wait(timeout=max(0.0, since + 300 - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            raise AssertionError("the job did not end within 300 s of the fault:\n" + self.text()[-4000:])
        took = time.monotonic() - since
        print(f"measured: the job ended {took:.1f} s after the fault")     # for docs/benchmarks.md (pytest -s)
        assert took <= seconds, (took, self.text()[-4000:])
        return took

    def text(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.log.close()


def _lines(text: str) -> list[str]:
    """The stop lines (rank 0's progress bar may share a line with them: no newline after a bar)."""
    key = "rlengine: training stopped:"
    return [ln[ln.index(key):] for ln in text.splitlines() if key in ln]


def _checkpointed(out: Path, step: int):
    return lambda: (out / "checkpoints" / "latest").is_file() and \
        (out / "checkpoints" / "latest").read_text().strip() == f"step_{step:06d}"


def _resume_completes(tmp: Path, nproc: int, overrides: list[str], out: Path) -> None:
    latest = (out / "checkpoints" / "latest").read_text().strip()
    kept = [x for x in read_metrics(out) if x["step"] <= int(latest.split("_")[1])]
    r = run_training(tmp, nproc, overrides + ["run.resume=auto"], timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "resumed from" in r.stdout + r.stderr
    rows = read_metrics(out)
    assert [x["step"] for x in rows] == [1, 2, 3, 4]                  # each step exactly once
    # the data position continued from the checkpoint instead of restarting (2 prompts a step)
    assert [x["data/draws"] for x in rows] == [2, 4, 6, 8]
    assert rows[:len(kept)] == kept                                    # the checkpointed steps' lines stay as they were


def test_a_killed_trainer_rank_ends_the_job_and_resume_continues(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    overrides = FAST + on_tiny_model(tiny_model_dir) + [f"run.output_dir={out}"]
    job = Job(tmp_path, 2, overrides)
    try:
        job.wait_for(_checkpointed(out, 2))
        victim = job.rank_process(1)
        t0 = time.monotonic()
        victim.kill()
        job.ended_within(END_BOUND_S, t0)
        assert job.proc.returncode != 0
        # whichever the launcher polls first names the fault: the killed rank (-9), or rank 0 that
        # saw its collective fail at once and said so (measured both ways on this box)
        text = job.text()
        assert "exits with return code = -9" in text or any(
            "rank 0 on" in ln and "a collective with the other ranks failed" in ln for ln in _lines(text)), text[-3000:]
    finally:
        job.close()
    _resume_completes(tmp_path, 2, overrides, out)


def test_a_killed_rollout_rank_ends_the_job_and_resume_continues(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    overrides = FAST + on_tiny_model(tiny_model_dir) + [f"run.output_dir={out}", "rollout.placement=separate",
                                                        "rollout.num_ranks=1"]
    job = Job(tmp_path, 2, overrides)
    try:
        job.wait_for(_checkpointed(out, 2))
        victim = job.rank_process(1)                                 # the last rank serves rollouts
        t0 = time.monotonic()
        victim.kill()
        job.ended_within(END_BOUND_S, t0)
        assert job.proc.returncode != 0
    finally:
        job.close()
    _resume_completes(tmp_path, 2, overrides, out)


def test_a_hung_sampler_ends_the_job_within_generate_timeout(tmp_path, tiny_model_dir):
    """The rollout rank's sampler blocks for ever in its second generate (tests/hooks/
    train_hung_sampler.py); with rollout.generate_timeout_s=5 the rank says so and exits 5, and
    the trainer, waiting for its answer, stops too."""
    out = tmp_path / "run"
    overrides = FAST + on_tiny_model(tiny_model_dir) + [
        f"run.output_dir={out}", "rollout.placement=separate", "rollout.num_ranks=1",
        "rollout.generate_timeout_s=5", "rollout.sync_timeout_s=60", "run.collective_timeout_s=120"]
    job = Job(tmp_path, 2, overrides, script="tests/hooks/train_hung_sampler.py")
    try:
        job.wait_for(lambda: (out / "metrics.jsonl").is_file() and len(read_metrics(out)) >= 1)
        t0 = time.monotonic()                        # step 2's generate starts right after step 1's line
        job.ended_within(5 + END_BOUND_S, t0)
        assert job.proc.returncode != 0
        line = next(iter(_lines(job.text())), "")
        assert line.startswith("rlengine: training stopped: rank 1 on "), job.text()[-3000:]
        assert line.endswith(": sampler generate (hf) did not finish within 5 s (rollout.generate_timeout_s)")
    finally:
        job.close()
    assert [x["step"] for x in read_metrics(out)] == [1]
    _resume_completes(tmp_path, 2, overrides, out)                  # plain train.py: nothing hangs now


def test_a_hanging_reward_is_cut_off_and_counted(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    r = run_training(tmp_path, 1, FAST + on_tiny_model(tiny_model_dir) + [
        f"run.output_dir={out}", "run.total_steps=1", "reward.name=tests.rewards_for_tests:hangs",
        "reward.timeout_s=1"], timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    (row,) = read_metrics(out)
    assert row["reward_pool/timeouts"] == 8                          # 2 prompts x 4 samples, each cut off
    assert row["reward/mean"] == 0.0


@pytest.mark.slow
@pytest.mark.vllm
def test_a_killed_vllm_engine_ends_the_job_and_resume_continues(tmp_path, tiny_model_dir):
    """The run the issue saw hang for good: rollout.backend=vllm, colocated, 2 ranks, the spawned
    engine of rank 1 killed after step 2. `-m slow`: two vLLM engines start twice (~4 min here);
    CI covers the same detection on one spawned engine (tests/test_vllm_sampler.py
    test_a_killed_engine_ends_its_owner_in_one_line) and the job's end on the other faults above."""
    pytest.importorskip("vllm")
    out = tmp_path / "run"
    overrides = FAST + on_tiny_model(tiny_model_dir) + [f"run.output_dir={out}", "rollout.backend=vllm",
                                                        "rollout.vllm_kv_cache_gb=0.25"]
    job = Job(tmp_path, 2, overrides)
    try:
        job.wait_for(_checkpointed(out, 2), timeout=600)
        rank1 = job.rank_process(1)
        # vLLM's worker: spawned by multiprocessing (titled VllmWorker where setproctitle works)
        engines = [p for p in rank1.children(recursive=True)
                   if "VllmWorker" in p.name() + " ".join(p.cmdline()) or "spawn_main" in " ".join(p.cmdline())]
        assert engines, [(p.pid, p.name()) for p in rank1.children(recursive=True)]
        t0 = time.monotonic()
        engines[0].kill()
        job.ended_within(END_BOUND_S, t0)
        assert job.proc.returncode != 0
        line = next((ln for ln in _lines(job.text()) if "rank 1 on" in ln), "")
        assert line.endswith(f"sampler generate (vllm): the spawned vLLM engine process {engines[0].pid} is gone "
                             "(exit code -9)") or f"vLLM engine process {engines[0].pid} is gone" in line, job.text()[-3000:]
    finally:
        job.close()
    _resume_completes(tmp_path, 2, overrides, out)
