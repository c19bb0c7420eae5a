"""A short real 2-rank training run through the deepspeed launcher (ZeRO-3 on gloo, HF sampler),
and the separate placement with the HF sampler.

The run is the session's `real_run` (tests/real_runs.py), which the tool tests read as well.
A 2-rank resume (each rank loading its own ZeRO-3 shards, the data position continuing) follows
every fault of tests/test_engine_faults.py; the exact 1-rank resume is tests/test_engine_resume.py."""
import json
import math

import pytest

from tests.engine_helpers import (EPS32, EPS64, FRAC_SUM_TOL, TINY, fp32_logprob_tol, on_tiny_model, ratio_left_one,
                                  read_metrics, run_training)

REQUIRED = ["step", "reward/mean", "loss", "eur", "frac_M", "frac_LN", "frac_HP", "frac_LP", "frac_HN",
            "entropy", "grad_norm", "time/step", "lr", "ratio_min", "ratio_max", "sync/seconds",
            "sync/checksum_ok", "sync/probe_abs_diff", "response_len/mean", "time/rollout", "time/train",
            "time/reward", "time/sync", "tokens_per_s", "staleness/mean", "staleness/max", "mismatch/kl",
            "correction/weight_mean", "correction/masked_frac", "data/prompt_ids"]


def test_two_ranks_train_and_log(real_run):
    out = real_run.dir
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for row in rows:
        missing = [k for k in REQUIRED if k not in row]
        assert not missing, missing
        fracs = sum(row[f"frac_{k}"] for k in ("M", "LN", "HP", "LP", "HN"))
        assert abs(fracs - 1) <= FRAC_SUM_TOL           # float64 token-weighted means (engine_helpers)
        assert row["sync/checksum_ok"] == 1.0
        # the fp32 HF sampler holds exactly the trainer's weights: the gap is two fp32 forwards' rounding
        # (engine_helpers.fp32_logprob_tol, 1.3e-3; measured ~1.5e-5), bf16 would give >= 0.024
        assert row["sync/probe_abs_diff"] < fp32_logprob_tol()
        assert row["optimizer_updates"] == 2           # 2 iterations x 1 mini-batch
        assert row["staleness/max"] == 0.0             # the synchronous loop
        # sampler and pi_old hold the same weights: per token |d| <= fp32_logprob_tol, and k3 = e^d - 1 - d
        # <= d^2 for |d| <= 1, so the mean is below tol^2 (a stale sampler gives ~1e-2 and more)
        assert 0.0 <= row["mismatch/kl"] <= fp32_logprob_tol() ** 2
        assert row["correction/weight_mean"] == 1.0 and row["correction/masked_frac"] == 0.0   # correction=none
        assert len(row["data/prompt_ids"]) == 2                                              # prompts_per_step
        assert row["lr"] == pytest.approx(1e-5, rel=EPS64)   # constant schedule: base lr x 1.0, exact
    # after the first update the policy moved: ratios leave 1 by more than fp32 recomputation noise
    assert any(ratio_left_one(r) for r in rows)


def test_run_directory_contents(real_run):
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoModelForCausalLM

    out = real_run.dir
    ckpts = out / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_000003"
    assert sorted(p.name for p in ckpts.iterdir() if p.name.startswith("step_")) == ["step_000002", "step_000003"]
    state = json.loads((ckpts / "step_000003" / "state.json").read_text())
    assert state["step"] == 3 and "data" in state
    table = pq.read_table(out / "tokens" / "step_000003.parquet").to_pandas()
    assert {"prob", "old_prob", "ratio", "advantage", "weight", "rel_weight", "region", "entropy"} <= set(table)
    assert set(table["region"]) <= {"M", "LN", "HP", "LP", "HN"}
    assert ((table["prob"] > 0) & (table["prob"] <= 1)).all()
    # ratio column = prob / old_prob, recomputed independently: all float32, exp(logp - old) against
    # exp(logp) / exp(old): the subtraction rounds at |ln r| ulps, each exp and the division at one or
    # two: 8 eps32 (1 + |ln r|) relative (measured: 1 eps32)
    rel = (table["ratio"] - table["prob"] / table["old_prob"]).abs() / table["ratio"]
    assert (rel <= 8 * EPS32 * (1 + table["ratio"].map(math.log).abs())).all()
    assert list((out / "tb").iterdir())
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert torch.isfinite(next(model.parameters())).all()


def test_separate_placement_one_trainer_one_rollout_rank(tmp_path, tiny_model_dir):
    """`launch/hosts`-style 2 slots: rank 0 trains (ZeRO-3 group of one), rank 1 is a rollout rank
    with the HF sampler; weights go over the dedicated gloo group in checksummed buckets. The random
    tiny Llama of tests/conftest.py (6.6M parameters, 26 MB in fp32) in 1 MB buckets: the path is
    the embedded model's, at a thirtieth of the cost (tests/test_engine_vllm.py sends the 135M one)."""
    from transformers import AutoModelForCausalLM

    fp32_bytes = 4 * sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_model_dir).parameters())
    out = tmp_path / "run"
    r = run_training(tmp_path, 2, TINY + on_tiny_model(tiny_model_dir) + [
        f"run.output_dir={out}", "run.total_steps=2", "rollout.placement=separate", "rollout.num_ranks=1",
        "rollout.bucket_mb=1", "run.export_final=false"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    rows = read_metrics(out)
    assert [x["step"] for x in rows] == [1, 2]
    for row in rows:
        assert row["sync/checksum_ok"] == 1.0
        assert row["sync/num_buckets"] >= fp32_bytes // (1 << 20)     # the fp32 model in 1 MB buckets
        assert row["sync/bytes"] == fp32_bytes
        assert row["sync/probe_abs_diff"] < fp32_logprob_tol()         # the rollout rank holds the new weights
        assert 0.0 <= row["rollout/idle_frac"] <= 1.0                   # measured on the rollout rank
    assert any(ratio_left_one(x) for x in rows)
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_000002"
