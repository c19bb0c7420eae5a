"""The prompt plan (rlengine/prompt_plan.py) on the real prompt stream, without a model or ranks:
which steps are requested when, with which min_version (the staleness bound at the source), and
the data state a checkpoint records (the trained step's, not the draws made ahead). The placement
here is a recorder of the plan's calls (the plan's own interface, not a library's); the real
placements run in tests/test_engine_async.py. Also the rollout ranks' idle meter."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from rlengine.config import load_config
from rlengine.data import build_prompt_stream
from rlengine.model import load_tokenizer, resolve_model_path
from rlengine.placement import IdleMeter, RolloutPiece
from rlengine.prompt_plan import PromptPlan
from rlengine.rollout.base import Generation, SamplingParams

CTX = SimpleNamespace(num_trainers=1, trainer_index=0, rank=0)


class Recorder:
    def __init__(self):
        self.requests, self.taken, self.generated = [], [], []

    def request(self, step, prompts, n, sampling, min_version):
        self.requests.append((step, min_version, sampling.seed))

    def take(self, step):
        self.taken.append(step)
        return Generation([], [], [], [], [], [])

    def generate(self, prompts, n, sampling):
        self.generated.append(sampling.seed)
        return Generation([], [], [], [], [], [])


def _plan(k: int, start: int = 0, total: int = 6):
    placement = "separate" if k else "colocated"
    cfg = load_config("configs/default.yaml", [f"rollout.max_staleness={k}", f"rollout.placement={placement}",
                                               f"rollout.num_ranks={1 if k else 0}", f"run.total_steps={total}",
                                               "rollout.prompts_per_step=2"])
    stream = build_prompt_stream(cfg.data, load_tokenizer(resolve_model_path(cfg.model.path)))
    recorder = Recorder()
    return PromptPlan(cfg, CTX, stream, recorder, SamplingParams(), start), recorder, stream, cfg


def test_async_plan_requests_k_steps_ahead_with_the_bound_as_min_version():
    plan, rec, _, _ = _plan(k=2)
    requested_by_step = {}
    for step in range(1, 7):
        before = len(rec.requests)
        plan.next(step)
        requested_by_step[step] = [r[0] for r in rec.requests[before:]]
    assert requested_by_step == {1: [1, 2, 3], 2: [4], 3: [5], 4: [6], 5: [], 6: []}   # never past the last step
    assert rec.taken == [1, 2, 3, 4, 5, 6]
    # step t trains with weights t - 1: at most 2 versions older means at least t - 3 (and >= start)
    assert [(t, v) for t, v, _ in rec.requests] == [(1, 0), (2, 0), (3, 0), (4, 1), (5, 2), (6, 3)]
    assert len({seed for _, _, seed in rec.requests}) == 6                              # a seed per step


def test_a_checkpoint_records_the_trained_steps_data_state_not_the_draws_ahead():
    plan, _, stream, cfg = _plan(k=2)
    planned = [plan.next(step)[0] for step in range(1, 4)]
    assert stream.state_dict()["draws"] == 5 * 2                          # drawn up to step 5
    assert [p.data_state["draws"] for p in planned] == [2, 4, 6]          # what steps 1..3 trained
    # resuming from step 2's state draws exactly what the uninterrupted plan drew for step 3 on
    resumed, _, stream2, _ = _plan(k=2, start=2)
    stream2.load_state_dict(planned[1].data_state)
    assert resumed.next(3)[0].ids() == planned[2].ids()


def test_resume_requests_start_from_the_resumed_version():
    plan, rec, _, _ = _plan(k=2, start=4, total=8)
    plan.next(5)
    assert [(t, v) for t, v, _ in rec.requests] == [(5, 4), (6, 4), (7, 4)]   # never below the pushed version


def test_the_synchronous_plan_generates_each_step_with_the_same_seed_as_async():
    sync, rec_sync, _, _ = _plan(k=0)
    asyn, rec_async, _, _ = _plan(k=1)
    for step in (1, 2, 3):
        assert sync.next(step)[0].ids() == asyn.next(step)[0].ids()
    assert rec_sync.generated == [seed for _, _, seed in rec_async.requests[:3]]


def test_idle_meter_measures_each_window_on_the_rollout_ranks_clock():
    meter, gen = IdleMeter(), Generation([], [], [], [], [], [])
    meter.add([RolloutPiece(gen, 0, busy_s=3.0, clock_s=4.0)])
    assert meter.metrics() == {"rollout/idle_frac": pytest.approx(0.25)}
    meter.add([RolloutPiece(gen, 1, busy_s=5.0, clock_s=12.0)])          # 2 s busy of the next 8 s
    assert meter.metrics() == {"rollout/idle_frac": pytest.approx(0.75)}
    meter.add([RolloutPiece(gen, 2, busy_s=6.0, clock_s=14.0), RolloutPiece(gen, 2, busy_s=14.0, clock_s=14.0)])
    # two rollout ranks: the second one's first window is busy all along
    assert meter.metrics() == {"rollout/idle_frac": pytest.approx((0.5 + 0.0) / 2)}
