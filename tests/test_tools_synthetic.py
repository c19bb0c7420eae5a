"""A synthetic run directory in the exact notes/RUNDIR.md format, for the plotting-tool tests.

`make_synthetic_run(path, loss, params)` writes config.yaml (the real resolved config),
metrics.jsonl (every documented key), tb/ (the same scalars) and tokens/step_*.parquet whose
weights / regions come from the real loss zoo (`rlengine.losses.policy_loss`) applied to random
but plausible ratios: low-probability tokens move more, later updates of a step move further.
The tool tests read real short training runs (tests/real_runs.py); this synthetic run is for
what a tiny real run cannot show, e.g. every one of the five regions populated (the figure tests
run on both), and for tools/compare_losses.py's stand-in trainer.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

EPS64 = torch.finfo(torch.float64).eps
METRIC_KEYS = [
    "reward/mean", "reward/std", "reward/answer", "reward/format", "loss", "eur", "frac_M", "frac_LN", "frac_HP",
    "frac_LP", "frac_HN", "ratio_min", "ratio_mean", "ratio_max", "clip_frac", "kl_old", "kl_ref", "entropy",
    "grad_norm", "lr", "response_len/mean", "response_len/max", "time/step", "time/rollout", "time/reward",
    "time/old_logprobs", "time/ref_logprobs", "time/train", "time/sync", "time/checkpoint", "tokens_per_s",
    "samples_per_s", "sync/seconds", "sync/gbps", "sync/checksum_ok", "sync/probe_abs_diff", "nonfinite_skipped",
    "data/epoch", "data/index",
]
TOKEN_COLUMNS = ["step", "update", "seq", "pos", "prob", "old_prob", "ratio", "advantage", "weight", "rel_weight",
                 "region", "entropy", "loss", "eps_low", "eps_high"]


def synthetic_batch(rng: np.random.Generator, seqs: int, length: int, update: int, drift: float, group: int = 4):
    """(logp, old_logp, advantages) for one optimizer update: [B, T], [B, T], [B]."""
    high = rng.beta(25, 1, size=(seqs, length))                            # confident tokens
    low = np.exp(rng.uniform(np.log(1e-4), 0, size=(seqs, length)))       # a log-uniform tail
    old_prob = np.where(rng.random((seqs, length)) < 0.7, high, low)
    old_logp = np.log(np.clip(old_prob, 1e-6, 1 - 1e-7))
    scale = drift * (1 + update) * np.sqrt(1 - old_prob + 1e-3)            # low-prob tokens move more
    logp = np.minimum(old_logp + rng.normal(0, 1, size=old_logp.shape) * scale, -1e-7)
    rewards = (rng.random(seqs) < 0.4).astype(float).reshape(-1, group)
    std = rewards.std(axis=1, ddof=1, keepdims=True)
    adv = np.where(std > 0, (rewards - rewards.mean(axis=1, keepdims=True)) / (std + 1e-6), 0.0).reshape(-1)
    return torch.tensor(logp), torch.tensor(old_logp), torch.tensor(adv)


def make_synthetic_run(path: str | Path, loss: str = "grpo", params: dict | None = None, steps: int = 12,
                       dump_every: int = 4, updates: int = 2, seqs: int = 16, length: int = 48,
                       drift: float = 0.25, seed: int = 0, tensorboard: bool = True) -> Path:
    """Write a complete synthetic run directory and return its path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rlengine import losses
    from rlengine.config import load_config, to_yaml

    params = dict(params or {})
    run = Path(path)
    run.mkdir(parents=True, exist_ok=True)
    overrides = [f"loss.name={loss}", f"run.output_dir={run}", f"run.total_steps={steps}",
                 f"run.token_dump_every={dump_every}"] + [f"loss.{k}={v}" for k, v in params.items()]
    cfg = load_config(None, overrides)
    (run / "config.yaml").write_text(to_yaml(cfg))
    hp = cfg.loss.params
    rng = np.random.default_rng(seed)
    lines = []
    writer = None
    if tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run / "tb"))
    for step in range(1, steps + 1):
        rows: dict[str, list] = {c: [] for c in TOKEN_COLUMNS}
        step_metrics: list[dict] = []
        for update in range(updates):
            logp, old_logp, adv = synthetic_batch(rng, seqs, length, update, drift * (1 + step / steps))
            mask = torch.ones_like(logp, dtype=torch.bool)
            out = losses.policy_loss(loss, logp, old_logp, adv, mask, agg=cfg.loss.agg, **hp)
            step_metrics.append(out.metrics)
            if dump_every and step % dump_every == 0:
                b, t = torch.meshgrid(torch.arange(seqs), torch.arange(length), indexing="ij")
                prob = logp.exp()
                rows["step"] += [step] * (seqs * length)
                rows["update"] += [update] * (seqs * length)
                rows["seq"] += b.flatten().tolist()
                rows["pos"] += t.flatten().tolist()
                rows["prob"] += prob.flatten().tolist()
                rows["old_prob"] += old_logp.exp().flatten().tolist()
                rows["ratio"] += out.ratio.flatten().tolist()
                rows["advantage"] += adv.unsqueeze(1).expand_as(logp).flatten().tolist()
                rows["weight"] += out.weight.flatten().tolist()
                rows["rel_weight"] += (out.weight / out.ratio).flatten().tolist()
                rows["region"] += [losses.REGIONS[i] for i in out.region.flatten().tolist()]
                rows["entropy"] += rng.gamma(2.0, 0.5, size=seqs * length).tolist()
                rows["loss"] += [loss] * (seqs * length)
                rows["eps_low"] += [float(hp["eps_low"])] * (seqs * length)
                rows["eps_high"] += [float(hp["eps_high"])] * (seqs * length)
        if rows["step"]:
            (run / "tokens").mkdir(exist_ok=True)
            pq.write_table(pa.table(rows), run / "tokens" / f"step_{step:06d}.parquet")
        loss_keys = ["loss", "eur", "frac_M", "frac_LN", "frac_HP", "frac_LP", "frac_HN", "ratio_mean", "clip_frac",
                     "kl_old"]
        rec = {k: float(np.mean([m[k] for m in step_metrics])) for k in loss_keys}
        rec["ratio_min"] = min(m["ratio_min"] for m in step_metrics)
        rec["ratio_max"] = max(m["ratio_max"] for m in step_metrics)
        progress = step / steps
        answer = 0.1 + 0.5 * progress + rng.normal(0, 0.04)
        fmt = 0.3 + 0.6 * (1 - math.exp(-4 * progress)) + rng.normal(0, 0.03)
        rec.update({
            "reward/mean": answer + fmt, "reward/std": 0.4, "reward/answer": answer, "reward/format": fmt,
            "kl_ref": 0.001 * step, "entropy": 1.2 * math.exp(-progress) + rng.normal(0, 0.02),
            "grad_norm": abs(rng.normal(0.5, 0.1)), "lr": 1e-6, "response_len/mean": 40 + 10 * progress,
            "response_len/max": 64, "time/step": 2.0, "time/rollout": 1.0, "time/reward": 0.1,
            "time/old_logprobs": 0.2, "time/ref_logprobs": 0.2, "time/train": 0.5, "time/sync": 0.05,
            "time/checkpoint": 0.0, "tokens_per_s": 300.0, "samples_per_s": 8.0, "sync/seconds": 0.05,
            "sync/gbps": 2.5, "sync/checksum_ok": 1.0, "sync/probe_abs_diff": 1e-6, "nonfinite_skipped": 0.0,
            "data/epoch": 0.0, "data/index": float(step * seqs // 4),
        })
        lines.append(json.dumps({"step": step, **rec}))
        if writer is not None:
            for k, v in rec.items():
                writer.add_scalar(k, v, step)
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    if writer is not None:
        writer.close()
    return run


@pytest.fixture(scope="session")
def synthetic_run(tmp_path_factory) -> Path:
    return make_synthetic_run(tmp_path_factory.mktemp("runs") / "grpo_run", "grpo")


def test_synthetic_run_has_the_documented_layout(synthetic_run):
    import pandas as pd

    run_dir = synthetic_run

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 13))
    assert set(METRIC_KEYS) <= set(records[0])
    for r in records:  # the five regions partition the tokens
        # float64: each frac_k is the mean over 2 updates of count / n (one rounding each, two for the
        # mean), then 5 of them are summed: <= ~4 eps64; 8 eps64 leaves 2x
        assert abs(sum(r[f"frac_{k}"] for k in ("M", "LN", "HP", "LP", "HN")) - 1) <= 8 * EPS64
    df = pd.read_parquet(run_dir / "tokens" / "step_000004.parquet")
    assert list(df.columns) == TOKEN_COLUMNS
    assert set(df["region"]) == {"M", "LN", "HP", "LP", "HN"}  # every region is populated
    # regions agree with the ratio / advantage thresholds of papers.md
    low, high = 1 - df["eps_low"], 1 + df["eps_high"]
    pos = df["advantage"] > 0
    expected = np.select([df["ratio"] < low, df["ratio"] > high], [np.where(pos, "LP", "LN"), np.where(pos, "HP", "HN")],
                         "M")
    assert (df["region"].to_numpy() == expected).all()
    # GRPO: hard clip zeroes LN and HP weights, M keeps the IS weight r
    assert (df.loc[df["region"].isin(["LN", "HP"]), "weight"] == 0).all()
    m = df["region"] == "M"
    # float64 synthetic batches: the weight is autograd's d(r A)/d logp / A = r, to an ulp or two
    assert np.allclose(df.loc[m, "weight"], df.loc[m, "ratio"], rtol=4 * EPS64, atol=0)
