"""Model paths, the embedded model's cached conversion, tokenizer/padding conventions, runtime set-up."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from rlengine import model as rl_model
from rlengine.model import (EMBEDDED, load_causal_lm, load_tokenizer, pad_left, position_ids_from_mask,
                            resolve_model_path, torch_dtype)
from rlengine.patches import deepspeed_arch_list
from rlengine.runtime import configure_process, dist_backend, threads_per_process

REPO = Path(__file__).resolve().parents[1]


def test_embedded_dir_is_a_complete_plain_checkpoint(embedded_model_dir):
    directory = Path(embedded_model_dir)
    assert resolve_model_path(EMBEDDED) == embedded_model_dir  # cached: same directory, no reconversion
    for name in ["config.json", "model.safetensors", "tokenizer.json", "generation_config.json"]:
        assert (directory / name).is_file(), name
    config = json.loads((directory / "config.json").read_text())
    assert "quantization_config" not in config  # the GGUF marker is gone
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"]
    assert config["vocab_size"] == 49152 and config["num_hidden_layers"] == 30

    model = load_causal_lm(embedded_model_dir)
    assert not getattr(model, "is_quantized", False) and model.dtype == torch.float32
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    tokenizer = load_tokenizer(EMBEDDED)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == 2 and tokenizer.padding_side == "left"
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                         add_generation_prompt=True, tokenize=False)
    assert chat.endswith("<|im_start|>assistant\n") and "<|im_start|>user\nWhat is the capital" in chat
    ids = tokenizer(chat, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1]:])  # the weights are the real model's


def test_bf16_load_and_bad_dtype(embedded_model_dir):
    model = load_causal_lm(embedded_model_dir, dtype="bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with pytest.raises(ValueError, match="'fp16'"):
        torch_dtype("fp16")


def test_missing_paths_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does-not-exist.*model\.path=embedded"):
        resolve_model_path(str(tmp_path / "does-not-exist"))
    with pytest.raises(FileNotFoundError, match=r"'nobody-here/no-such-model'.*Hugging Face cache"):
        resolve_model_path("nobody-here/no-such-model")


def test_local_dir_and_cached_hub_name_pass_through(tmp_path, monkeypatch):
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)
    # a hub name present in the local HF cache is returned unchanged
    snapshot = tmp_path / "hub" / "models--org--cached" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (tmp_path / "hub" / "models--org--cached" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--cached" / "refs" / "main").write_text("abc")
    code = ("from rlengine.model import resolve_model_path; print(resolve_model_path('org/cached'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         env=dict(os.environ, HF_HUB_CACHE=str(tmp_path / "hub")))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "org/cached"


CONCURRENT_CHILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from rlengine import model

    log = Path(sys.argv[2])
    def fake_convert(gguf, out_dir):  # stands in for the 20 s dequantisation
        with open(log, "a") as f:
            f.write("convert\\n")
        time.sleep(1.0)
        (out_dir / "config.json").write_text("{}")
        return 1.0
    model._convert_gguf = fake_convert
    print(model.ensure_embedded_model(Path(sys.argv[1])))
""")


def test_conversion_runs_once_when_two_processes_race(tmp_path):
    target = tmp_path / "models" / "SmolLM2-135M-Instruct"
    log = tmp_path / "conversions.log"
    script = tmp_path / "child.py"
    script.write_text(CONCURRENT_CHILD)
    procs = [subprocess.Popen([sys.executable, str(script), str(target), str(log)], cwd=REPO, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outputs = [proc.communicate(timeout=120) for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), outputs
    assert [out.strip() for out, _ in outputs] == [str(target)] * 2
    assert log.read_text().count("convert") == 1
    assert (target / "config.json").is_file() and (target / "rlengine_converted.json").is_file()
    assert sorted(p.name for p in target.parent.iterdir() if "tmp" in p.name) == []  # staging cleaned


def test_incomplete_leftover_is_replaced(tmp_path, monkeypatch):
    target = tmp_path / "m"
    target.mkdir()
    (target / "config.json").write_text("{}")  # no completion marker: a killed conversion
    calls = []

    def fake_convert(gguf, out_dir):
        calls.append(out_dir)
        (out_dir / "config.json").write_text('{"fresh": true}')
        return 0.0

    monkeypatch.setattr(rl_model, "_convert_gguf", fake_convert)
    assert rl_model.ensure_embedded_model(target) == target
    assert len(calls) == 1 and json.loads((target / "config.json").read_text()) == {"fresh": True}
    assert rl_model.ensure_embedded_model(target) == target and len(calls) == 1  # complete now: reused


def test_pad_left_builds_mask_from_lengths():
    pad = 2  # == EOS in SmolLM2: real EOS tokens inside sequences must stay unmasked
    ids, mask = pad_left([[5, 2, 7], [2], [8, 9, 2, 2]], pad)
    assert ids.tolist() == [[2, 5, 2, 7], [2, 2, 2, 2], [8, 9, 2, 2]]
    assert mask.tolist() == [[0, 1, 1, 1], [0, 0, 0, 1], [1, 1, 1, 1]]
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 1, 2], [0, 0, 0, 0], [0, 1, 2, 3]]
    with pytest.raises(ValueError, match="sequence 1 is empty"):
        pad_left([[1], []], pad)


def test_runtime_thread_share_and_backend(monkeypatch):
    assert threads_per_process(2, cpu_count=2) == 1
    assert threads_per_process(1, cpu_count=16) == 16 and threads_per_process(3, cpu_count=16) == 5
    assert threads_per_process(8, cpu_count=2) == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert threads_per_process(cpu_count=4) == 2
    with pytest.raises(ValueError, match="local_world_size"):
        threads_per_process(0)
    assert dist_backend("cuda") == "nccl" and dist_backend("cpu") == "gloo"


def test_configure_process_sets_threads_and_ds_accelerator():
    code = ("import os, torch; from rlengine.runtime import configure_process, detect_accelerator; "
            "n = configure_process(local_world_size=2); "
            "print(n, torch.get_num_threads(), os.environ['OMP_NUM_THREADS'], os.environ.get('DS_ACCELERATOR'), "
            "detect_accelerator())")
    env = {k: v for k, v in os.environ.items() if k not in ("DS_ACCELERATOR", "OMP_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    n, torch_threads, omp, ds_accel, accel = out.stdout.split()
    expected = max(1, len(os.sched_getaffinity(0)) // 2)
    assert int(n) == int(torch_threads) == int(omp) == expected
    if accel == "cpu":
        assert ds_accel == "cpu"


def test_memory_gb_sees_an_allocation():
    import torch

    from rlengine.runtime import memory_gb

    before = memory_gb()
    block = torch.ones(256 << 20, dtype=torch.uint8)   # 0.25 GiB, touched
    after = memory_gb()
    assert after["mem/rss_gb"] - before["mem/rss_gb"] > 0.2
    assert after["mem/peak_rss_gb"] >= after["mem/rss_gb"] - 0.01
    del block


def test_deepspeed_arch_list_drops_arch_specific_suffixes():
    # an H100 image sets TORCH_CUDA_ARCH_LIST=9.0a; DeepSpeed 0.19.8's JIT builder then failed
    # fused AdamW's build with "invalid literal for int() with base 10: '0a'"
    assert deepspeed_arch_list("9.0a") == "9.0"
    assert deepspeed_arch_list("8.0;9.0a") == "8.0;9.0"
    assert deepspeed_arch_list("8.0 8.6 9.0+PTX") == "8.0;8.6;9.0+PTX"
    assert deepspeed_arch_list("9.0a;9.0") == "9.0"
    assert deepspeed_arch_list("9.0a;9.0+PTX") == "9.0+PTX"  # a twin asking for PTX keeps it
    assert deepspeed_arch_list("10.0f;12.0a+PTX") == "10.0;12.0+PTX"
    for entry in deepspeed_arch_list("7.5;8.0;9.0a;10.0f+PTX").split(";"):  # what DeepSpeed parses
        assert all(part.isdigit() for part in entry.removesuffix("+PTX").split("."))


def test_auto_dtype_is_bf16_only_where_bf16_matmuls_are_native():
    """`dtype: auto` follows the CPU's own flags (read here from /proc/cpuinfo, independently of
    torch's probes): bf16 with AVX512-BF16 or AMX, fp32 otherwise (e.g. this project's AVX2 box,
    where bf16 matmuls are emulated, 26x slower than fp32)."""
    from rlengine.config import load_config
    from rlengine.runtime import cpu_flags, native_bf16, resolve_dtype

    if torch.cuda.is_available():
        pytest.skip("the CPU rule; on CUDA auto follows torch.cuda.is_bf16_supported()")
    flags = cpu_flags()
    assert flags, "no CPU flags in /proc/cpuinfo"
    native = bool({"avx512_bf16", "amx_bf16"} & flags)
    assert native_bf16() is native
    expected = "bf16" if native else "fp32"
    assert resolve_dtype("auto") == expected
    assert resolve_dtype("bf16") == "bf16" and resolve_dtype("fp32") == "fp32" and resolve_dtype(None) is None
    cfg = load_config(None, ["model.dtype=auto", "rollout.dtype=auto"])
    assert (cfg.model.dtype, cfg.rollout.dtype) == (expected, expected)   # resolved once, at load
    assert load_config(REPO / "configs" / "default.yaml").model.dtype == expected


def test_explicit_bf16_on_a_cpu_without_native_bf16_warns_naming_the_key(capsys):
    from rlengine.config import load_config
    from rlengine.runtime import native_bf16
    from rlengine.train import warn_emulated_bf16

    message = warn_emulated_bf16(load_config(None, ["model.dtype=bf16"]), is_main=True)
    if native_bf16():
        assert message is None
        return
    assert message is not None and "model.dtype=bf16" in message and "dtype=auto" in message
    assert message in capsys.readouterr().err
    assert warn_emulated_bf16(load_config(None, ["model.dtype=fp32"]), is_main=True) is None
    assert "rollout.dtype" in warn_emulated_bf16(load_config(None, ["model.dtype=fp32", "rollout.dtype=bf16"]),
                                                 is_main=False)
