"""Checkpoint bookkeeping that needs no model: RNG state without pickle, dropping an abandoned
branch, and refusing to start a fresh run over another run's checkpoints."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from rlengine.checkpoint import CheckpointManager, rng_state, set_rng_state
from rlengine.config import ConfigError, load_config
from rlengine.train import check_inputs


def fake_checkpoint(root, step):
    d = root / f"step_{step:06d}"
    d.mkdir(parents=True)
    (d / "state.json").write_text(json.dumps({"step": step}))
    return d


def test_rng_state_round_trips_through_weights_only_load(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist(), np.random.randn())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))   # no pickle of arbitrary objects
    assert (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist(), np.random.randn()) == expected


def test_drop_after_removes_an_abandoned_branch_and_repoints_latest(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        fake_checkpoint(root, step)
    (root / "latest").write_text("step_000006")
    CheckpointManager(root, keep_last=2, rank=1, barrier=lambda: None).drop_after(2)   # rank 1: nothing
    assert len(CheckpointManager.find_complete(root)) == 3
    ckpt = CheckpointManager(root, keep_last=2, rank=0, barrier=lambda: None)
    ckpt.drop_after(2)
    assert [p.name for p in ckpt.complete_checkpoints()] == ["step_000002"]
    assert ckpt.latest().name == "step_000002" and (root / "latest").read_text() == "step_000002"


@pytest.mark.parametrize("resume", ["never", "elsewhere"])
def test_a_fresh_run_refuses_a_directory_with_another_runs_checkpoints(tmp_path, resume):
    out = tmp_path / "run"
    fake_checkpoint(out / "checkpoints", 4)
    other = fake_checkpoint(tmp_path / "other" / "checkpoints", 2)
    value = "never" if resume == "never" else str(other)
    cfg = load_config(None, [f"run.output_dir={out}", f"run.resume={value}"])
    with pytest.raises(ConfigError) as e:
        check_inputs(cfg)
    assert f"run.resume={value}" in str(e.value) and "step_000004" in str(e.value) and "run.resume=auto" in str(e.value)
    check_inputs(load_config(None, [f"run.output_dir={out}", "run.resume=auto"]))               # continue it
    check_inputs(load_config(None, [f"run.output_dir={out}", f"run.resume={out / 'checkpoints' / 'step_000004'}"]))
    check_inputs(load_config(None, [f"run.output_dir={tmp_path / 'new'}", "run.resume=never"]))  # a new directory
