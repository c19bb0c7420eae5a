"""The `separate` placement end to end: vLLM on a rollout rank inside a 2-rank gloo world.

Rank 0 = trainer (an HF model, the source of the push), rank 1 = rollout rank holding a
VLLMSampler. Both ranks first join one default gloo group (as the deepspeed launcher makes them),
then rank 1 starts vLLM with `in_process=False`: the engine's worker lives in its own spawned
process and its scheduler in rank 1, so it neither adopts nor destroys the world group (also at
`close()`), reseeds this process's RNGs or freezes its thread count. Weights travel trainer -> rollout rank over a dedicated gloo group (WeightBroadcaster) and
into the engine through a /dev/shm safetensors file.

Checked: generation works; a push of perturbed weights changes greedy outputs, passes the bucket
checksums, and the sampler then agrees with the trainer's log-probs on the perturbed weights (the
probe); pushing the originals back restores the greedy outputs exactly; the world group still
works throughout and after the sampler is closed.
"""
from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from tests.engine_helpers import fp32_logprob_tol

pytest.importorskip("vllm")

# vLLM (fp32) and the trainer's HF forward on the same weights, T = 1: two fp32 forwards' rounding,
# 2 L eps32 S (tests/engine_helpers.py, fp32_logprob_tol: 1.3e-3); bf16 or stale weights are >= 0.024 apart
PROBE_TOL = fp32_logprob_tol(1.0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _trainer_logprobs(model, prompt_ids, response_ids) -> torch.Tensor:
    ids = torch.tensor([list(prompt_ids) + list(response_ids)])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt_ids) - 1: -1].double()  # [T, V]
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(response_ids)[:, None])[:, 0]


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    import datetime

    import torch.distributed as dist

    from rlengine.model import resolve_model_path
    from rlengine.rollout.base import SamplingParams
    from rlengine.weight_sync import WeightBroadcaster, iter_gathered_params, new_sync_group

    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=600))
    sync = new_sync_group([0, 1], timeout_s=600)
    bc = WeightBroadcaster(sync, src_rank=0, bucket_mb=16, timeout_s=600)
    path = resolve_model_path("embedded")
    out: dict = {}
    greedy = SamplingParams(greedy=True, max_new_tokens=12)

    def world_ok(tag: str) -> None:
        t = torch.tensor([rank + 1.0])
        dist.all_reduce(t)  # on the default (world) group
        out[f"world_{tag}"] = float(t)

    if rank == 0:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        originals = {n: p.detach().clone() for n, p in model.named_parameters()}
        world_ok("after_start")
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        out["push_perturbed"] = bc.push(iter_gathered_params(model))
        probe = [None]
        dist.broadcast_object_list(probe, src=1)
        prompt_ids, response_ids, sampler_lps = probe[0]
        trainer = _trainer_logprobs(model, prompt_ids, response_ids)
        out["probe_abs_diff"] = float((torch.tensor(sampler_lps, dtype=torch.float64) - trainer).abs().mean())
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(originals[n])
        out["push_originals"] = bc.push(iter_gathered_params(model))
        world_ok("after_pushes")
    else:
        from rlengine.rollout.vllm_sampler import VLLMSampler

        random_before = torch.rand(1)
        torch.manual_seed(123)
        expected_rand = torch.rand(1)
        torch.manual_seed(123)
        sampler = VLLMSampler(path, dtype="fp32", in_process=False, num_threads=1, kv_cache_gb=1.0, max_model_len=1024)
        out["rng_untouched"] = bool(torch.equal(torch.rand(1), expected_rand))
        torch.set_num_threads(1)
        out["set_num_threads_works"] = torch.set_num_threads.__module__ != "vllm.v1.worker.cpu_worker"
        world_ok("after_start")
        prompts = [sampler.tokenizer.encode(p) for p in ["The capital of France is", "12+7="]]
        before = sampler.generate(prompts, 1, greedy)
        out["recv_perturbed"] = bc.receive(sampler.load_weights)
        changed = sampler.generate(prompts, 1, greedy)
        out["changed"] = changed.response_ids != before.response_ids
        lps = sampler.score(prompts[0], changed.response_ids[0])
        dist.broadcast_object_list([(prompts[0], changed.response_ids[0], lps)], src=1)
        out["recv_originals"] = bc.receive(sampler.load_weights)
        after = sampler.generate(prompts, 1, greedy)
        out["restored"] = after.response_ids == before.response_ids
        out["texts"] = after.texts
        world_ok("after_pushes")
        sampler.close()
        del random_before
    world_ok("after_close")
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(out, f, default=str)
    print(f"rank {rank}: {json.dumps(out, default=str)}", flush=True)
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_on_a_rollout_rank_beside_the_trainer(tmp_path):
    mp.start_processes(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    trainer, rollout = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    for side in (trainer, rollout):
        assert side["world_after_start"] == side["world_after_pushes"] == side["world_after_close"] == 3.0
    assert rollout["rng_untouched"] and rollout["set_num_threads_works"]
    assert trainer["push_perturbed"]["sync/buckets_verified"] == rollout["recv_perturbed"]["sync/buckets_verified"] > 0
    assert rollout["changed"], "perturbed weights did not change greedy outputs"
    assert trainer["probe_abs_diff"] < PROBE_TOL, trainer["probe_abs_diff"]
    assert rollout["restored"], rollout["texts"]
    assert "Paris" in rollout["texts"][0]
