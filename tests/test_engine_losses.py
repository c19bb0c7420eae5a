"""The new losses and a plug-in loss train through the real launcher, from the shipped overlays.

One trainer rank (ZeRO-3 group of one), fp32, 2 steps of 2 prompts x 4 samples, two passes over
each batch (so the second pass sees ratios off 1). The model is the random tiny Llama with the
embedded tokenizer (tests/conftest.py `tiny_model_dir`): what is tested is the loss's wiring
through config, engine and metrics, and each loss's math is tested against its closed form in
tests/test_losses*.py; the embedded 135M model took ~120 s a run here, the tiny one ~38 s (mostly
start-up). The overlays are the shipped ones: configs/default.yaml + configs/losses/<name>.yaml.
"""
from __future__ import annotations

import math

import pytest

from rlengine.losses import REGIONS
from tests.engine_helpers import (EPS32, FRAC_SUM_TOL, REPO, TINY, on_tiny_model, ratio_left_one, read_metrics,
                                  run_training)

QUICK = TINY + ["run.total_steps=2", "run.export_final=false", "run.tensorboard=false", "run.token_dump_every=0",
                "data.system_prompt=none"]


def check_trained(r, out, loss_name):
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    rows = read_metrics(out)
    assert [x["step"] for x in rows] == [1, 2]
    for row in rows:
        assert math.isfinite(row["loss"]) and row["n_tokens"] > 0
        assert sum(row[f"frac_{k}"] for k in REGIONS) == pytest.approx(1.0, abs=FRAC_SUM_TOL)
        assert row["nonfinite_updates"] == 0
    # the second pass over a batch sees the first pass's update: ratios left 1 by more than fp32
    # recomputation noise (engine_helpers.ratio_left_one)
    assert any(ratio_left_one(x) for x in rows), rows
    assert (out / "config.yaml").read_text().count(f"name: {loss_name}") == 1
    return rows


@pytest.mark.parametrize("overlay, loss_name", [("gspo", "gspo"), ("gspo_token", "gspo_token"), ("gmpo", "gmpo"),
                                                ("dppo", "dppo"), ("aspo_top_entropy", "aspo")])
def test_new_loss_trains_through_the_engine(tmp_path, tiny_model_dir, overlay, loss_name):
    out = tmp_path / "run"
    r = run_training(tmp_path, 1, QUICK + on_tiny_model(tiny_model_dir) + [f"run.output_dir={out}"],
                     config=["configs/default.yaml", f"configs/losses/{overlay}.yaml"])
    rows = check_trained(r, out, loss_name)
    if loss_name in ("gspo", "gspo_token"):
        # weights are s_i or 0 (clipped), so the relative weight w / s_i is 1 or 0 per token. w comes
        # from a float32 sum over the response's T <= 12 tokens: |w / s_i - 1| <= ~T ulps, so the mean
        # is within 2 T eps32 = 2.9e-6 of 1 - zero_weight_frac (measured <= 1 eps32 on the same loss)
        max_new = 12                                      # TINY's rollout.max_new_tokens
        for row in rows:
            assert row["eur"] == pytest.approx(1.0 - row["zero_weight_frac"], abs=2 * max_new * EPS32)


PLUGIN = '''
import torch


def scaled_is(ctx, *, eps_low=0.2, eps_high=0.2, scale=2.0):
    """l = -A * scale * r (plain importance sampling, scaled): w / r = scale on every token"""
    return scale * ctx.ratio
'''


def test_plugin_loss_trains_from_the_config(tmp_path, tiny_model_dir):
    """Also the reward and data lines of metrics.jsonl: a reward with two declared parts, and a
    prompt-length limit that drops some of the bundled prompts (60 tokens: 543 of the 3000 measured)."""
    (tmp_path / "lab_losses.py").write_text(PLUGIN)
    out = tmp_path / "run"
    r = run_training(tmp_path, 1, QUICK + on_tiny_model(tiny_model_dir) + [f"run.output_dir={out}", "loss.name=lab_losses:scaled_is",
                                           "loss.scale=3.0", "reward.name=tests.rewards_for_tests:digits_and_brevity",
                                           "data.max_prompt_tokens=60"], pythonpath=str(tmp_path))
    rows = check_trained(r, out, "lab_losses:scaled_is")
    rows_in_file = sum(1 for line in (REPO / "rlengine" / "data_files" / "arithmetic_train.jsonl").open() if line.strip())
    # float32 sums of n positive terms round by <= n / 2 eps32 relative, plus a couple of ulps per term
    tokens, samples = 4 * 12, 2 * 4                   # TINY: micro-batches of 4 x <= 12 tokens; 2 prompts x 4
    for row in rows:
        # the plug-in, with the config's scale, was the loss: w / r = 3 up to float32 rounding (2 ulps
        # a token: the product and the division), summed over a micro-batch's tokens in float32
        assert row["eur"] == pytest.approx(3.0, rel=(tokens / 2 + 2) * EPS32)
        # reward/<part> for each part the reward declares, and no parts it does not have
        assert 0 <= row["reward/digits"] <= 1 and 0 < row["reward/brevity"] <= 1
        # reward/mean is the float32 mean of the float32-rounded rewards; the parts are float64 means
        assert row["reward/mean"] == pytest.approx(row["reward/digits"] + row["reward/brevity"], rel=(samples / 2 + 2) * EPS32)
        assert "reward/answer" not in row and "reward/format" not in row
        # every row of the bundled training file is a usable prompt or was dropped as too long
        assert row["data/dropped_too_long"] > 0 and row["data/bad_rows"] == 0
        assert row["data/prompts"] + row["data/dropped_too_long"] == rows_in_file
