"""What the trainer does with a broken reward, through the real launcher (one trainer rank, fp32,
short prompts, the random tiny Llama of tests/conftest.py). The reward parts and data counters of metrics.jsonl are checked in
tests/test_engine_losses.py's plug-in run."""
from __future__ import annotations

from tests.engine_helpers import TINY, on_tiny_model, read_metrics, run_training

QUICK = TINY + ["run.export_final=false", "run.tensorboard=false", "run.token_dump_every=0",
                "data.system_prompt=none"]


def test_a_nan_reward_stops_the_run_naming_the_reward_and_the_sample(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    r = run_training(tmp_path, 1, QUICK + on_tiny_model(tiny_model_dir) + [f"run.output_dir={out}", "run.total_steps=2",
                                           "reward.name=tests.rewards_for_tests:nan_when_long"])
    assert r.returncode != 0
    line = next((ln for ln in (r.stdout + r.stderr).splitlines() if "rlengine: training stopped: reward" in ln), None)
    assert line is not None, r.stderr[-4000:]
    assert "'tests.rewards_for_tests:nan_when_long' returned nan (its total)" in line
    assert "sample" in line and "of step 1" in line and "source 'arithmetic', row" in line
    assert not (out / "metrics.jsonl").exists() or read_metrics(out) == []   # nothing was trained on it
