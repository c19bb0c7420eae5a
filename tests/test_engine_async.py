"""Asynchronous rollout (`rollout.max_staleness` >= 1, placement=separate, rlengine/async_rollout.py)
through the real launcher, on the random tiny Llama of tests/conftest.py: 1 trainer + 1 rollout rank.

  * the staleness bound holds and is logged, with the correction metrics, on every line; the
    loads the rollout rank makes between generations are verified by digest and probe;
  * kill -9 in the middle of a max_staleness=2 run and resume: the prompts trained, step by step,
    are exactly the prompt stream's draws (what the uninterrupted run trains), none skipped or twice;
  * a load corrupted after its transfer was verified stops the run naming it (exit code 3).
"""
from __future__ import annotations

import re

import pytest

from tests.engine_helpers import TINY, fp32_logprob_tol, on_tiny_model, read_metrics, run_training
from tests.test_engine_resume import _run_until_killed

SEPARATE = ["rollout.placement=separate", "rollout.num_ranks=1", "rollout.bucket_mb=1", "run.export_final=false",
            "run.token_dump_every=0", "run.tensorboard=false"]
CORRECTION_KEYS = ("staleness/mean", "staleness/max", "mismatch/kl", "correction/weight_mean",
                   "correction/masked_frac")


def expected_prompt_ids(overrides: list[str], steps: int) -> list[list[str]]:
    """The prompt stream's first `steps` batches, drawn here without a run: what an uninterrupted run
    trains, step by step (the draws depend on the data config and seed alone)."""
    from rlengine.config import load_config
    from rlengine.data import build_prompt_stream
    from rlengine.model import load_tokenizer, resolve_model_path

    cfg = load_config("configs/default.yaml", overrides)
    stream = build_prompt_stream(cfg.data, load_tokenizer(resolve_model_path(cfg.model.path)))
    return [[f"{p.source}:{p.row}" for p in stream.next_batch(cfg.rollout.prompts_per_step)] for _ in range(steps)]


@pytest.mark.parametrize("backend", ["vllm"])
def test_async_rollout_keeps_the_bound_and_verifies_every_load(tmp_path, tiny_model_dir, backend):
    out = tmp_path / "run"
    overrides = TINY + on_tiny_model(tiny_model_dir) + SEPARATE + [
        f"run.output_dir={out}", "run.total_steps=4", "rollout.max_staleness=2", f"rollout.backend={backend}",
        "train.correction=tis", "train.correction_level=geometric"]
    r = run_training(tmp_path, 2, overrides)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    rows = read_metrics(out)
    assert [x["step"] for x in rows] == [1, 2, 3, 4]
    for row in rows:
        for key in CORRECTION_KEYS:
            assert key in row, (row["step"], key)
        assert 0 <= row["staleness/mean"] <= row["staleness/max"] <= 2
        assert 0.0 <= row["rollout/idle_frac"] <= 1.0
        assert row["sync/checksum_ok"] == 1.0                       # what was staged, at every push
        assert row["sync/probe_abs_diff"] < fp32_logprob_tol()      # what the sampler loaded, at a take
    # step 1 is generated right after the first push; steps 2 and 3 are requested with it and, the
    # tiny model's generation being far quicker than its update, generated on version 0 too
    assert max(x["staleness/max"] for x in rows) >= 1
    assert sum(x["sync/loads_verified"] for x in rows) >= 2
    assert any(x["sync/loads_verified"] and x["sync/probe_abs_diff"] >= 0 for x in rows)   # a probed load
    assert rows[-1]["data/prompt_ids"] == expected_prompt_ids(overrides, 4)[-1]


def test_kill9_during_async_rollout_then_resume_trains_the_same_prompts(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    overrides = TINY + on_tiny_model(tiny_model_dir) + SEPARATE + [
        f"run.output_dir={out}", "run.total_steps=6", "run.save_every=2", "rollout.max_staleness=2",
        "rollout.backend=hf", "rollout.prompts_per_step=2", "train.mini_batch_prompts=1"]
    # kill while steps 4 and 5 are in flight: after step 3's line, before step 4's checkpoint
    _run_until_killed(tmp_path, overrides, lambda: (out / "metrics.jsonl").is_file() and len(read_metrics(out)) >= 3,
                      nproc=2)
    assert [x["step"] for x in read_metrics(out)][:3] == [1, 2, 3]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_000002"
    r = run_training(tmp_path, 2, overrides + ["run.resume=auto"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    rows = read_metrics(out)
    assert [x["step"] for x in rows] == [1, 2, 3, 4, 5, 6]                 # each step exactly once
    assert [x["data/prompt_ids"] for x in rows] == expected_prompt_ids(overrides, 6)
    assert rows[-1]["data/draws"] == 6 * 2                                   # what was trained, not drawn ahead
    assert max(x["staleness/max"] for x in rows) <= 2


def _run_with_fault(tmp_path, tiny_model_dir, hook: str):
    """4 steps, max_staleness=1, HF sampler, through `hook` (tests/hooks); (result, output dir)."""
    out = tmp_path / "run"
    r = run_training(tmp_path, 2, TINY + on_tiny_model(tiny_model_dir) + SEPARATE + [
        f"run.output_dir={out}", "run.total_steps=4", "rollout.max_staleness=1", "rollout.backend=hf"],
        script=f"tests/hooks/{hook}")
    return r, out


def test_a_load_corrupted_after_transfer_stops_the_run(tmp_path, tiny_model_dir):
    r, out = _run_with_fault(tmp_path, tiny_model_dir, "train_corrupt_load.py")
    assert r.returncode == 3, r.stdout[-3000:] + r.stderr[-6000:]
    assert "weight load on the rollout rank not verified: weights version 1: the digest of what the sampler " \
           "loaded differs" in r.stderr, r.stderr[-4000:]
    assert len(read_metrics(out)) <= 2                   # the batch generated with it was not trained


def test_a_batch_past_the_bound_is_refused_by_the_trainer(tmp_path, tiny_model_dir):
    r, out = _run_with_fault(tmp_path, tiny_model_dir, "train_overeager_plan.py")
    assert r.returncode == 3, r.stdout[-3000:] + r.stderr[-6000:]
    # step 3 is the first that can be two versions old (requested at step 1, with version 0)
    assert re.search(r"step [3-4] got samples 2 weight versions old, more than rollout.max_staleness=1", r.stderr), \
        r.stderr[-4000:]
    assert len(read_metrics(out)) < 4
