"""Shared pytest fixtures.

`embedded_model_dir`: the converted SmolLM2-135M-Instruct directory (converted once per machine,
~20 s the very first time, then cached under `$RLENGINE_CACHE` / `~/.cache/rlengine`).
`tiny_llama_config`: a random 2-layer Llama config with tied embeddings, for tests that need a real
transformers model but not real weights (instant to build).
`real_run`, `second_real_run`, `run_dir`, `second_run_dir`: real short training runs of the embedded
default, made once per session (tests/real_runs.py).
"""
from __future__ import annotations

import pytest

from tests.real_runs import real_run, run_dir, second_real_run, second_run_dir  # noqa: F401  (fixtures)


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
