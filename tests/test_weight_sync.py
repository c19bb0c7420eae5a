"""WeightBroadcaster over a real 2-process gloo group (spawned processes, 1 thread each).

One pair of processes runs the scenarios in order (the group survives every clean failure, which
is itself part of what is tested); the hang scenario runs last because it breaks the group.
Rank 0 = trainer (source), rank 1 = rollout rank (receiver). Both build the same tiny random
Llama from a seed, so the receiver can check what arrived bit for bit against its own copy.
"""
from __future__ import annotations

import json
import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp

BUCKET_MB = 0.05  # ~52 KB: tensors span buckets, many buckets per push
HANG_TIMEOUT_S = 4.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_llama(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def _perturb(model, seed: int):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 1e-3)


def _expected_first_name_of_bucket(model, bucket: int, bucket_bytes: int) -> str:
    """Recomputes the layout by hand: tensors at 64-byte aligned offsets in named_parameters order."""
    pos = 0
    for name, p in model.named_parameters():
        nbytes = p.numel() * p.element_size()
        if pos + nbytes > bucket * bucket_bytes:
            return name
        pos += -(-nbytes // 64) * 64
    raise AssertionError("bucket beyond the stream")


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    import datetime

    import torch.distributed as dist

    from rlengine.weight_sync import WeightBroadcaster, WeightSyncError, iter_gathered_params, new_sync_group

    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
    group = new_sync_group([0, 1], timeout_s=HANG_TIMEOUT_S)
    results: dict = {}
    model = _tiny_llama(seed=7)
    received: dict = {}

    def store(pairs):
        received.clear()
        received.update({n: t.clone() for n, t in pairs})
        return [n for n, _ in pairs]

    def record(key, fn):
        t0 = time.perf_counter()
        try:
            results[key] = {"ok": True, "value": fn()}
        except WeightSyncError as e:
            results[key] = {"ok": False, "error": str(e), "metrics": e.metrics}
        results[key]["seconds"] = time.perf_counter() - t0

    def identical():
        sent = dict((n, p.detach()) for n, p in model.named_parameters())
        return sorted(received) == sorted(sent) and all(torch.equal(received[n], sent[n]) for n in sent)

    if rank == 0:
        bc = WeightBroadcaster(group, src_rank=0, bucket_mb=BUCKET_MB, timeout_s=HANG_TIMEOUT_S)
        record("push1", lambda: bc.push(iter_gathered_params(model)))
        _perturb(model, seed=1)
        record("push2", lambda: bc.push(iter_gathered_params(model)))
        record("names", lambda: bc.push(iter_gathered_params(model)))
        record("corrupt", lambda: bc.push(iter_gathered_params(model)))
        bad_name = "model.layers.1.mlp.up_proj.weight"
        original = model.get_parameter(bad_name)[3, 5].item()
        with torch.no_grad():
            model.get_parameter(bad_name)[3, 5] = float("nan")
        record("nonfinite", lambda: bc.push(iter_gathered_params(model)))
        with torch.no_grad():
            model.get_parameter(bad_name)[3, 5] = original
        record("after_failures", lambda: bc.push(iter_gathered_params(model)))
        record("hang", lambda: bc.push(iter_gathered_params(model)))
        results["expected_corrupt_name"] = _expected_first_name_of_bucket(model, 2, bc.bucket_bytes)
    else:
        # the fault, injected from here: a byte of bucket 2 flips after it arrived, before it is hashed
        import rlengine.weight_sync as ws

        flips = {"on": False, "bucket": 0}
        honest_checksum = ws._checksum

        def corrupting_checksum(buf):
            if flips["on"]:
                if flips["bucket"] == 2:
                    buf[10] ^= 0xFF
                flips["bucket"] += 1
            return honest_checksum(buf)

        ws._checksum = corrupting_checksum
        bc = WeightBroadcaster(group, src_rank=0, bucket_mb=BUCKET_MB, timeout_s=HANG_TIMEOUT_S)
        record("push1", lambda: bc.receive(store))
        results["push1_identical"] = identical()
        _perturb(model, seed=1)
        record("push2", lambda: bc.receive(store))
        results["push2_identical"] = identical()
        record("names", lambda: bc.receive(lambda pairs: [n for n, _ in pairs][1:]))  # "forgets" one tensor
        flips["on"] = True
        calls = {"n": 0}

        def count(pairs):
            calls["n"] += 1
            return store(pairs)

        record("corrupt", lambda: bc.receive(count))
        flips["on"] = False
        record("nonfinite", lambda: bc.receive(count))
        results["apply_calls_on_failures"] = calls["n"]
        record("after_failures", lambda: bc.receive(store))
        results["after_failures_identical"] = identical()
        time.sleep(HANG_TIMEOUT_S + 6)  # never calls receive(): the trainer's push must time out
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f, default=str)
    os._exit(0)  # the hang scenario leaves gloo work pending: skip destroy_process_group


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("wsync")
    mp.start_processes(_worker, args=(_free_port(), str(out)), nprocs=2, join=True, start_method="spawn")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_push_is_bit_identical_and_reports_metrics(runs):
    sender, receiver = runs
    assert sender["push1"]["ok"] and receiver["push1"]["ok"], (sender["push1"], receiver["push1"])
    assert receiver["push1_identical"] and receiver["push2_identical"]
    m = sender["push1"]["value"]
    assert m["sync/buckets_verified"] == m["sync/num_buckets"] > 5 and m["sync/bytes"] > 0
    # the same two float64 divisions as the library's (bytes / seconds / 1e9): one rounding each
    assert m["sync/gbps"] == pytest.approx(m["sync/bytes"] / m["sync/seconds"] / 1e9, rel=2 * torch.finfo(torch.float64).eps)
    assert receiver["push2"]["value"]["sync/buckets_verified"] == m["sync/num_buckets"]


def test_loaded_names_must_equal_sent_names_on_both_sides(runs):
    for side in runs:
        assert not side["names"]["ok"]
        assert "different set of tensors" in side["names"]["error"]


def test_corrupted_bucket_is_caught_naming_the_tensor_on_both_sides(runs):
    sender, receiver = runs
    expected = sender["expected_corrupt_name"]
    for side in (sender, receiver):
        assert not side["corrupt"]["ok"]
        assert "checksum mismatch in bucket 2" in side["corrupt"]["error"]
        assert repr(expected) in side["corrupt"]["error"]
        assert side["corrupt"]["metrics"] == {"sync/buckets_verified": 0.0}


def test_non_finite_tensor_is_refused_and_never_applied(runs):
    sender, receiver = runs
    for side in (sender, receiver):
        assert not side["nonfinite"]["ok"]
        assert "'model.layers.1.mlp.up_proj.weight'" in side["nonfinite"]["error"]
    assert "non-finite" in sender["nonfinite"]["error"]
    assert receiver["apply_calls_on_failures"] == 0  # neither the corrupt nor the refused push was loaded


def test_group_survives_failures(runs):
    sender, receiver = runs
    assert sender["after_failures"]["ok"] and receiver["after_failures"]["ok"]
    assert receiver["after_failures_identical"]


def test_push_to_a_silent_receiver_times_out_with_a_clear_error(runs):
    hang = runs[0]["hang"]
    assert not hang["ok"]
    assert "did not complete within" in hang["error"]
    assert hang["seconds"] < HANG_TIMEOUT_S * 2 + 2, hang


def test_finiteness_check_is_exact_even_when_a_sum_overflows():
    from rlengine.weight_sync import _all_finite

    big = torch.full((64,), 3e38)  # its sum overflows to inf, yet every element is finite
    assert _all_finite(big)
    for dtype in (torch.float32, torch.bfloat16):
        for bad in (float("nan"), float("inf"), float("-inf")):
            t = torch.zeros(1000, dtype=dtype)
            t[417] = bad
            assert not _all_finite(t)


class _RecordingSampler:
    """The smallest thing with a sampler's load_weights: remembers what it got, reports it."""

    def __init__(self):
        self.loaded = None

    def load_weights(self, pairs):
        from rlengine.rollout.base import LoadReport
        from rlengine.weight_sync import weights_digest

        self.loaded = {n: t for n, t in pairs}
        return LoadReport(list(self.loaded), weights_digest(self.loaded.items()))


def test_local_push_copies_and_refuses_non_finite():
    from rlengine.weight_sync import WeightSyncError, local_push, weights_digest

    model = _tiny_llama(seed=2)
    named = [(n, p.detach()) for n, p in model.named_parameters()]
    sampler = _RecordingSampler()
    report, metrics = local_push(sampler, named)
    assert metrics["sync/bytes"] == sum(p.numel() * 4 for _, p in named)
    assert report.digest == weights_digest(named) and report.names == [n for n, _ in named]
    first = named[0][0]
    assert torch.equal(sampler.loaded[first], named[0][1])
    assert sampler.loaded[first].data_ptr() != named[0][1].data_ptr()  # a copy, not the trainer's tensor

    bad = [(n, t.clone()) for n, t in named]
    bad[5][1].view(-1)[0] = float("nan")
    fresh = _RecordingSampler()
    with pytest.raises(WeightSyncError, match=repr(bad[5][0])):
        local_push(fresh, bad)
    assert fresh.loaded is None


def test_probe_gap_is_the_mean_absolute_difference():
    from rlengine.weight_sync import WeightSyncError, probe_gap

    # float64 mean of exact dyadic differences: only the division by 3 rounds, on both sides
    assert probe_gap([-0.5, -1.0, -2.0], torch.tensor([-0.25, -1.0, -2.5])) == pytest.approx(
        (0.25 + 0 + 0.5) / 3, rel=2 * torch.finfo(torch.float64).eps)
    assert probe_gap([], []) == 0.0
    with pytest.raises(WeightSyncError, match="sampler gave 2 log-probs, trainer 3"):
        probe_gap([-1.0, -1.0], [-1.0, -1.0, -1.0])


class _LazySampler:
    """A sampler that consumes weights lazily: it copies each tensor as it arrives and applies
    the whole set only when the stream is exhausted (what the vLLM file transport does)."""

    consumes_weights_lazily = True

    def __init__(self):
        self.applied, self.manifest, self.seen_ptrs = None, None, []

    def load_weights(self, stream):
        self.manifest = getattr(stream, "manifest", None)
        staged = {}
        for name, t in stream:
            self.seen_ptrs.append(t.data_ptr())
            staged[name] = t.clone()
        self.applied = staged
        from rlengine.rollout.base import LoadReport
        from rlengine.weight_sync import weights_digest

        return LoadReport(list(staged), weights_digest(staged.items()))


def test_lazy_local_push_streams_the_trainers_own_tensors_and_refuses_before_applying():
    from rlengine.actor import Actor
    from rlengine.weight_sync import ParamStream, WeightSyncError, local_push

    model = _tiny_llama(seed=3)
    # the actor's stream carries its manifest (a plain generator made pushes collect every tensor)
    stream = Actor.named_parameters_gathered(type("A", (), {"engine": type("E", (), {"module": model})})())
    assert isinstance(stream, ParamStream)
    assert [s.name for s in stream.manifest] == [n for n, _ in model.named_parameters()]

    sampler = _LazySampler()
    _, metrics = local_push(sampler, stream)
    named = list(model.named_parameters())
    assert sampler.manifest == stream.manifest                       # handed on for a streamed header
    assert sampler.seen_ptrs == [p.data_ptr() for _, p in named]     # no copy made by the push
    assert all(torch.equal(sampler.applied[n], p) for n, p in named)
    assert metrics["sync/bytes"] == sum(p.numel() * 4 for _, p in named)

    with torch.no_grad():
        named[4][1].view(-1)[3] = float("inf")
    refused = _LazySampler()
    with pytest.raises(WeightSyncError, match=repr(named[4][0])):
        local_push(refused, [(n, p.detach()) for n, p in named])
    assert refused.applied is None and len(refused.seen_ptrs) == 4   # stopped at the bad tensor


def test_streamed_safetensors_file_loads_back_exactly_and_checks_the_manifest(tmp_path):
    from safetensors.torch import load_file

    from rlengine.weight_sync import WeightSyncError, manifest_of, write_safetensors

    g = torch.Generator().manual_seed(0)
    pairs = [("a.weight", torch.randn(3, 5, generator=g)), ("b.bias", torch.randn(7, generator=g).bfloat16()),
             ("c.weight", torch.randn(4, 2, generator=g).t()),          # not contiguous
             ("d.empty", torch.zeros(0)), ("e.half", torch.randn(2, 2, 2, generator=g).half())]
    manifest = manifest_of(pairs)
    path = str(tmp_path / "w.safetensors")
    nbytes = write_safetensors(path, iter(pairs), manifest)
    assert nbytes == sum(t.numel() * t.element_size() for _, t in pairs)
    back = load_file(path)
    assert set(back) == {n for n, _ in pairs}
    for name, t in pairs:
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name

    wrong = list(pairs)
    wrong[2] = ("c.weight", torch.randn(4, 2))      # the manifest says (2, 4)
    with pytest.raises(WeightSyncError, match=r"'c\.weight' \(4, 2\).*manifest entry 'c\.weight' \(2, 4\)"):
        write_safetensors(path, iter(wrong), manifest)
    with pytest.raises(WeightSyncError, match="ended before 'e.half'"):
        write_safetensors(path, iter(pairs[:4]), manifest)
    with pytest.raises(WeightSyncError, match="'f' is not in the manifest"):
        write_safetensors(path, iter(pairs + [("f", torch.ones(1))]), manifest)
