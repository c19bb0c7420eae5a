"""A sampler stuck on stale weights is noticed by the probe after each push: the push is retried
once, then the run stops (rollout.on_probe_failure=stop, the default) or warns (warn). The fault is
injected by a wrapper of train.py in tests/hooks/, through the real launcher (one rank, fp32, the
random tiny Llama of tests/conftest.py: the fault and its handling do not depend on the model).
lr 1e-3 makes one update move the policy far beyond the fp32 threshold (0.005): a fresh sampler
agrees to ~1e-6. 0.005 below is not a tolerance of these tests but rlengine's default fp32
rollout.probe_threshold (test_train_helpers.py checks it), which the run's own message must name."""
from __future__ import annotations

from tests.engine_helpers import TINY, on_tiny_model, read_metrics, run_training

STALE = TINY + ["run.token_dump_every=0", "run.tensorboard=false", "data.system_prompt=none", "run.export_final=false"]


def test_a_stale_sampler_stops_the_run(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    r = run_training(tmp_path, 1, STALE + on_tiny_model(tiny_model_dir) + [f"run.output_dir={out}", "run.total_steps=2"],
                     script="tests/hooks/train_stale_sampler.py")
    assert r.returncode == 3, (r.returncode, r.stderr[-4000:])
    line = next((ln for ln in (r.stdout + r.stderr).splitlines() if "rlengine: training stopped: weight push not verified: sampler/trainer log-prob gap" in ln), "")
    assert "> rollout.probe_threshold 0.005 after a retried push" in line, r.stderr[-3000:]
    gap = float(line.split("log-prob gap ")[1].split()[0])
    assert gap > 0.005
    assert not (out / "metrics.jsonl").exists() or read_metrics(out) == []   # step 1's push failed before its line


def test_warn_mode_trains_on_and_logs_the_retry(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    r = run_training(tmp_path, 1, STALE + on_tiny_model(tiny_model_dir) + [f"run.output_dir={out}", "run.total_steps=1",
                                           "rollout.on_probe_failure=warn"], script="tests/hooks/train_stale_sampler.py")
    assert r.returncode == 0, r.stderr[-4000:]
    log = r.stdout + r.stderr
    assert "after a retried push" in log and "training on" in log
    (row,) = read_metrics(out)
    assert row["sync/retries"] == 1.0 and row["sync/probe_abs_diff"] > 0.005
