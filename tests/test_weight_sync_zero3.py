"""iter_gathered_params on a real DeepSpeed ZeRO-3 engine (2 spawned gloo ranks, 1 thread each).

Both ranks build the same seeded tiny Llama, DeepSpeed partitions it (stage 3, no optimizer), and
every rank drains the stream (gathering is collective). Checked: the full tensors equal the
unpartitioned originals bit for bit, names are HF names (the engine's `module.` prefix stripped)
in named_parameters order, the manifest carries full shapes before anything is gathered, and the
gathering happened one layer at a time (one GatheredParameters context per layer).
"""
from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    import deepspeed
    from transformers import LlamaConfig, LlamaForCausalLM

    import rlengine.weight_sync as ws

    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(3)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    originals = {n: p.detach().clone() for n, p in model.named_parameters()}
    ds_cfg = {"train_micro_batch_size_per_gpu": 1, "train_batch_size": 2,
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    engine, *_ = deepspeed.initialize(model=model, config=ds_cfg)

    contexts = []
    real = deepspeed.zero.GatheredParameters

    def counting(params, *args, **kwargs):  # the real context; only records what it was asked to gather
        contexts.append(len(list(params)))
        return real(params, *args, **kwargs)

    deepspeed.zero.GatheredParameters = counting
    partitioned = all(p.numel() < originals[n.removeprefix("module.")].numel() or p.numel() == 0
                      for n, p in engine.named_parameters())
    stream = ws.iter_gathered_params(engine)
    manifest = [(s.name, list(s.shape)) for s in stream.manifest]
    names, identical = [], True
    for name, t in stream:
        names.append(name)
        identical &= torch.equal(t, originals[name])
    out = {"partitioned": partitioned, "names": names, "identical": identical, "contexts": contexts,
           "manifest_ok": manifest == [(n, list(t.shape)) for n, t in originals.items()],
           "expected_names": list(originals)}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    torch.distributed.destroy_process_group()


def test_zero3_params_are_gathered_layer_by_layer_and_exact(tmp_path):
    pytest.importorskip("deepspeed")
    mp.start_processes(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    for r in (0, 1):
        out = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert out["partitioned"], "DeepSpeed did not partition the parameters"
        assert out["names"] == out["expected_names"] and not any(n.startswith("module.") for n in out["names"])
        assert out["identical"] and out["manifest_ok"]
        # embed_tokens | 3 layers x 9 params (q k v o, gate up down, 2 norms) | final norm
        assert out["contexts"] == [1, 9, 9, 9, 1]
