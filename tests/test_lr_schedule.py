"""The learning-rate schedule (actor.lr_multiplier): linear warmup, then constant / linear / cosine
decay to min_lr_ratio, per optimizer step, checked against the closed forms and through torch's
LambdaLR as the Actor installs it."""
from __future__ import annotations

import math

import pytest
import torch

from rlengine.actor import lr_multiplier
from rlengine.config import Config, TrainConfig

TOTAL, WARMUP, FLOOR = 20, 4, 0.1
# closed forms in float64 on both sides: a few roundings of O(1) values
TOL = 8 * torch.finfo(torch.float64).eps


def _schedule(kind: str, warmup: int = WARMUP, floor: float = FLOOR):
    cfg = Config(train=TrainConfig(lr_schedule=kind, warmup_steps=warmup, min_lr_ratio=floor))
    return lr_multiplier(cfg, TOTAL)


@pytest.mark.parametrize("kind", ["constant", "linear", "cosine"])
def test_warmup_is_linear_from_one_step(kind):
    f = _schedule(kind)
    assert [f(u) for u in range(WARMUP)] == pytest.approx([(u + 1) / WARMUP for u in range(WARMUP)], abs=TOL)


def test_decays_match_their_closed_forms():
    span = TOTAL - WARMUP
    for u in range(WARMUP, TOTAL + 3):                       # past the end it stays at the floor
        p = min(1.0, (u - WARMUP) / span)
        assert _schedule("constant")(u) == 1.0
        assert _schedule("linear")(u) == pytest.approx(FLOOR + (1 - FLOOR) * (1 - p), abs=TOL)
        assert _schedule("cosine")(u) == pytest.approx(FLOOR + (1 - FLOOR) * 0.5 * (1 + math.cos(math.pi * p)), abs=TOL)
    assert _schedule("cosine")(TOTAL) == pytest.approx(FLOOR, abs=TOL)
    assert _schedule("linear", warmup=0)(0) == 1.0          # no warmup: the first step has the full lr


def test_lambda_lr_applies_it_per_optimizer_step():
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=0.5)
    f = _schedule("cosine")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, f)
    seen = []
    for _ in range(TOTAL):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([0.5 * f(u) for u in range(TOTAL)], abs=0.5 * TOL)
