"""Every push is verified from the sampler's side: faults injected between the real engine's actor
(DeepSpeed ZeRO-3) and a colocated HF sampler are each noticed, by the check meant for them, and a
transient one is cured by the retry. Also the GPU bucket digest, which must see swapped words."""
from __future__ import annotations

import json

import pytest
import torch

from tests.engine_helpers import run_training


@pytest.fixture(scope="module")
def faults(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("push_faults")
    out = tmp / "run"
    out.mkdir()
    r = run_training(tmp, 1, ["model.dtype=fp32", f"run.output_dir={out}", "rollout.backend=hf"],
                     script="tests/hooks/push_faults.py", timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return json.loads((out / "faults.json").read_text())


def test_a_clean_push_is_verified_by_digest_names_and_probe(faults):
    m = faults["clean"]["metrics"]
    assert m["sync/checksum_ok"] == 1.0 and m["sync/names_ok"] == 1.0 and m["sync/retries"] == 0.0
    assert 0.0 <= m["sync/probe_abs_diff"] < 0.005           # fp32 on both sides (rollout.probe_threshold)


def test_a_tensor_corrupted_in_transit_fails_the_digest(faults):
    assert not faults["corrupt"]["ok"]
    assert "digest of what the sampler loaded differs" in faults["corrupt"]["error"]
    assert "after a retried push" in faults["corrupt"]["error"]


def test_a_dropped_tensor_is_named(faults):
    assert not faults["drop"]["ok"]
    assert "the sampler did not load 'model.norm.weight'" in faults["drop"]["error"]


def test_a_sampler_that_keeps_its_old_weights_fails_the_probe(faults):
    # it reports the right names and digest (it lies): only the probe can tell
    assert not faults["stale"]["ok"]
    assert "log-prob gap" in faults["stale"]["error"] and "> rollout.probe_threshold 0.005" in faults["stale"]["error"]


def test_a_transient_fault_is_cured_by_the_retry(faults):
    m = faults["transient"]["metrics"]
    assert faults["transient"]["ok"] and m["sync/retries"] == 1.0 and m["sync/checksum_ok"] == 1.0


def test_the_gpu_bucket_digest_sees_two_swapped_words():
    from rlengine.weight_sync import _device_checksum

    g = torch.Generator().manual_seed(0)
    buf = torch.randint(0, 256, (4096,), dtype=torch.uint8, generator=g)
    words = buf.view(torch.int64)
    swapped = words.clone()
    swapped[[3, 200]] = words[[200, 3]]
    assert not torch.equal(swapped, words)
    assert _device_checksum(swapped.view(torch.uint8)) != _device_checksum(buf)
    # two words that differ only in the sign bit: a plain or an index-weighted sum misses this swap
    top = torch.zeros(64, dtype=torch.int64)
    top[5] = -(1 << 63)
    other = top.clone()
    other[[5, 9]] = top[[9, 5]]
    assert _device_checksum(other.view(torch.uint8)) != _device_checksum(top.view(torch.uint8))
    flipped = buf.clone()
    flipped[1000] ^= 1
    assert _device_checksum(flipped) != _device_checksum(buf)


def test_the_device_mixer_is_splitmix64():
    from rlengine.weight_sync import _mix64

    def splitmix_finaliser(z: int) -> int:
        m = (1 << 64) - 1
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 & m
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB & m
        return z ^ (z >> 31)

    values = [0, 1, 2, 12345, (1 << 63) - 1, (1 << 64) - 1, 0xDEADBEEFCAFEBABE]
    signed = torch.tensor([v - (1 << 64) if v >= 1 << 63 else v for v in values], dtype=torch.int64)
    got = [v & ((1 << 64) - 1) for v in _mix64(signed).tolist()]
    assert got == [splitmix_finaliser(v) for v in values]
