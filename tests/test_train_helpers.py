"""Pure helpers of the training loop (rlengine/train.py), without a model."""
from __future__ import annotations

import torch

from rlengine.batch import RolloutBatch
from rlengine.rollout.base import Generation


def probe_sequence(gen: Generation, probe_tokens: int):
    return RolloutBatch.from_generation(gen, pad_id=0, group_size=1).probe(probe_tokens)


def _gen(prompt_len: int, response_len: int) -> Generation:
    prompt = list(range(1000, 1000 + prompt_len))
    response = list(range(5000, 5000 + response_len))
    return Generation([0], [prompt], [response] if response_len else [[]], [[-1.0] * response_len], ["x"], ["stop"])


def test_probe_is_the_prompt_tail_and_the_response_head():
    prompt, response = probe_sequence(_gen(203, 64), 64)
    assert response == list(range(5000, 5032))            # first 32 response tokens
    assert prompt == list(range(1000 + 203 - 32, 1203))   # last 32 prompt tokens, contiguous with them
    prompt, response = probe_sequence(_gen(203, 5), 64)   # short response: the prompt fills the rest
    assert response == list(range(5000, 5005)) and len(prompt) == 59 and prompt[-1] == 1202
    prompt, response = probe_sequence(_gen(10, 40), 64)   # short prompt: all of it
    assert prompt == list(range(1000, 1010)) and len(response) == 32
    assert probe_sequence(_gen(10, 0), 64) is None


def test_mini_batches_keep_groups_whole_and_cover_every_sequence_once():
    g = torch.Generator().manual_seed(0)
    gen = Generation([i // 4 for i in range(24)], [[1, 2]] * 24, [[3]] * 24, [[-1.0]] * 24, ["x"] * 24, ["stop"] * 24)
    batches = list(RolloutBatch.from_generation(gen, pad_id=0, group_size=4).minibatches(3, g))
    assert len(batches) == 3 and all(len(b) == 8 for b in batches)
    assert sorted(torch.cat(batches).tolist()) == list(range(24))
    for b in batches:   # each mini-batch is two whole groups of 4 consecutive sequences
        groups = sorted({int(i) // 4 for i in b})
        assert sorted(b.tolist()) == [gi * 4 + j for gi in groups for j in range(4)]


def test_probe_threshold_follows_the_precision_unless_set():
    from rlengine.config import load_config
    from rlengine.placement import probe_threshold

    assert probe_threshold(load_config(None, ["model.dtype=fp32"])) == 0.005
    assert probe_threshold(load_config(None, ["model.dtype=bf16"])) == 0.1
    assert probe_threshold(load_config(None, ["model.dtype=fp32", "rollout.dtype=bf16"])) == 0.1
    assert probe_threshold(load_config(None, ["rollout.probe_threshold=0.3"])) == 0.3


def test_deepspeed_buffers_are_sized_to_the_model_and_user_keys_win(embedded_model_dir):
    from rlengine.actor import deepspeed_config, model_hidden_size
    from rlengine.config import load_config

    assert model_hidden_size(embedded_model_dir) == 576  # SmolLM2-135M
    cfg = load_config(None)
    zero = deepspeed_config(cfg, dp_world_size=2, grad_accum=3, hidden_size=576)["zero_optimization"]
    assert zero["reduce_bucket_size"] == 576 * 576 == 331776
    assert zero["stage3_prefetch_bucket_size"] == 298598  # int(0.9 * 576^2)
    assert zero["stage"] == 3
    assert "reduce_bucket_size" not in deepspeed_config(cfg, 2, 3)["zero_optimization"]  # DeepSpeed's default
    cfg.deepspeed = {"zero_optimization": {"reduce_bucket_size": 12345}}
    zero = deepspeed_config(cfg, 2, 3, hidden_size=576)["zero_optimization"]
    assert zero["reduce_bucket_size"] == 12345 and zero["stage3_prefetch_bucket_size"] == 298598


def test_low_disk_warning_names_the_free_space_and_the_need(tmp_path):
    import shutil

    from tests.conftest import low_disk_warning

    free_gb = shutil.disk_usage(tmp_path).free / 1e9
    assert low_disk_warning(str(tmp_path), need_gb=0) is None
    warning = low_disk_warning(str(tmp_path), need_gb=free_gb * 2 + 1)
    assert warning is not None and f"{free_gb:.1f} GB free under {tmp_path}" in warning
