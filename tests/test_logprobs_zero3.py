"""The chunked head under real DeepSpeed ZeRO-3 (world size 1, gloo, CPU), in a subprocess because
`init_distributed` leaves a global process group behind.

The child builds a tiny random Llama with tied embeddings twice from the same weights: one wrapped by
`deepspeed.initialize` (stage 3, every parameter partitioned: the head weight is empty outside its
module's forward) and one plain. It runs `sequence_logprobs` on the engine, `engine.backward` on a loss
of log-probs and entropies, and reports the gathered gradients; the parent compares them with the plain
model's full-logits gradients. DeepSpeed JIT-compiles its shm comm op on first use (~25 s once per
machine, cached in ~/.cache/torch_extensions).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

CHILD = textwrap.dedent("""
    import json, os, sys
    import torch
    import deepspeed
    from deepspeed.utils import safe_get_full_grad
    from transformers import LlamaConfig, LlamaForCausalLM
    from rlengine.logprobs import sequence_logprobs
    from rlengine.model import position_ids_from_mask

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True, pad_token_id=2)
    plain = LlamaForCausalLM(config)
    state = {k: v.clone() for k, v in plain.state_dict().items()}
    deepspeed.init_distributed(dist_backend="gloo")
    model = LlamaForCausalLM(config)
    model.load_state_dict(state)
    ds_config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
                 "zero_allow_untested_optimizer": True,
                 "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
                                      config=ds_config)
    head = engine.module.lm_head.weight
    result = {"partitioned_numel": head.numel(), "tied": head is engine.module.model.embed_tokens.weight}

    # [left-padded prompt | right-padded response]; pad == 2
    input_ids = torch.tensor([[1, 5, 6, 7, 10, 11, 12, 2], [2, 2, 1, 9, 13, 2, 2, 2]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 0, 0]])
    start, temperature = 4, 0.8
    weights = torch.tensor([[0.5, -1.0, 2.0, 0.3], [1.5, -0.7, 0.0, 0.0]])

    logp, entropy = sequence_logprobs(engine, input_ids, mask, start, temperature=temperature, chunk_size=3)
    loss = -(logp * weights).sum() - 0.1 * (entropy * weights).sum()
    engine.backward(loss)
    grads = {name: safe_get_full_grad(p) for name, p in engine.module.named_parameters()}

    logits = plain(input_ids=input_ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    logp_all = torch.log_softmax(logits[:, start - 1:-1] / temperature, -1)
    ref_logp = logp_all.gather(2, input_ids[:, start:, None]).squeeze(-1) * mask[:, start:]
    ref_entropy = -(logp_all.exp() * logp_all).sum(-1) * mask[:, start:]
    (-(ref_logp * weights).sum() - 0.1 * (ref_entropy * weights).sum()).backward()

    # magnitudes the fp32 rounding scales with (the parent's bounds): S = max_v sum_i |h_i w_vi| / T over
    # the response positions, the largest |logit|, |logp| and entropy
    with torch.no_grad():
        h = plain.model(input_ids=input_ids, attention_mask=mask,
                        position_ids=position_ids_from_mask(mask)).last_hidden_state[:, start - 1:-1].double()
        w = plain.lm_head.weight.double()
        result["S_max"] = ((h.abs() @ w.abs().t()).amax() / temperature).item()
        result["z_max"] = ((h @ w.t()).abs().amax() / temperature).item()
        result["logp_max"] = logp_all.detach().abs().amax().item()
        result["entropy_max"] = ref_entropy.detach().abs().amax().item()
    result["logp_diff"] = (logp.detach() - ref_logp.detach()).abs().max().item()
    result["entropy_diff"] = (entropy.detach() - ref_entropy.detach()).abs().max().item()
    result["grad_diff"] = {}
    result["grad_norm"] = {}
    for name, p in plain.named_parameters():
        got = grads[name]
        result["grad_diff"][name] = None if got is None else (got - p.grad).abs().max().item()
        result["grad_norm"][name] = p.grad.abs().max().item()
    print("RESULT " + json.dumps(result))
""")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_chunked_head_gradients_under_zero3(tmp_path):
    script = tmp_path / "zero3_child.py"
    script.write_text(CHILD)
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
               RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=f"{repo}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600,
                          cwd=repo)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"child failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    result = json.loads(lines[-1][len("RESULT "):])
    assert result["partitioned_numel"] == 0, "the head weight should be partitioned outside its forward"
    assert result["tied"]
    # fp32, the same weights through two forwards (ZeRO-3 engine + chunked head vs the plain model
    # with full logits): the head bound 2 eps S + 4 eps (|logp| + max|z|) (tests/test_logprobs_model.py)
    # plus 2 L eps S for the L = 2 layers before it (tests/engine_helpers.py, fp32_logprob_tol);
    # the entropy carries it with weights summing to 1, hence 2x plus a few ulps of itself
    eps = torch.finfo(torch.float32).eps
    S, layers = result["S_max"], 2
    bound = eps * (2 * layers * S + 2 * S + 4 * (result["logp_max"] + result["z_max"]))
    assert result["logp_diff"] <= bound and result["entropy_diff"] <= 2 * bound + 4 * eps * result["entropy_max"]
    # each gradient sums over <= N = 16 positions and V = 96 or I = 64 terms per layer: 2 (N + V + I)
    # eps of the largest |grad| of that parameter each way (as in test_logprobs_model.py's float64 check)
    n_acc = 16 + 96 + 64
    for name, diff in result["grad_diff"].items():
        assert diff is not None, f"no gradient for {name}"
        assert diff <= 4 * n_acc * eps * result["grad_norm"][name], f"{name}: |grad diff| {diff}"
    assert result["grad_norm"]["model.embed_tokens.weight"] > 0
