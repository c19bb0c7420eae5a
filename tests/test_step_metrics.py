"""StepMetrics reduced over a real 2-process gloo group: each key reduced the way it was added,
every rank gets the same dict, and a key added two ways is an error."""
from __future__ import annotations

import json
import math
import os
import socket

import pytest
import torch.multiprocessing as mp


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    from rlengine.step_metrics import StepMetrics

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    m = StepMetrics()
    # rank 0: 3 tokens of value 1 then 1 token of value 5; rank 1: 4 tokens of value 2
    if rank == 0:
        m.mean("clip_frac", 1.0, 3)
        m.mean("clip_frac", 5.0, 1)
    else:
        m.mean("clip_frac", 2.0, 4)
    m.total("tokens", 10 + rank)
    m.max("ratio_max", [1.5, 3.25][rank])
    m.min("ratio_min", [0.5, 0.75][rank])
    if rank == 1:
        m.mean("only_on_rank_1", 7.0)
    out = m.reduce()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    dist.destroy_process_group()


def test_reduce_over_two_ranks(tmp_path):
    mp.start_processes(_worker, args=(_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0 == r1
    # (3*1 + 1*5 + 4*2) / 8 = 2 exactly in binary floating point
    assert r0 == {"clip_frac": 2.0, "tokens": 21.0, "ratio_max": 3.25, "ratio_min": 0.5, "only_on_rank_1": 7.0}


def test_a_key_added_two_ways_is_refused_and_an_unweighted_mean_is_nan():
    from rlengine.step_metrics import StepMetrics

    m = StepMetrics()
    m.mean("x", 1.0)
    with pytest.raises(ValueError, match="'x' added as max and as mean"):
        m.max("x", 2.0)
    m.mean("empty", 3.0, weight=0.0)
    assert math.isnan(m.reduce()["empty"])
