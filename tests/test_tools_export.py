"""tools/export.py on real DeepSpeed ZeRO-3 checkpoints.

The session's real short training run (tests/real_runs.py: the embedded SmolLM2-135M, 2 ranks,
checkpoints of steps 2 and 3, final/ written by the trainer after step 3) is exported from its
run directory and from one checkpoint, reloaded, and compared with final/.

For exact tensor comparisons against an independent truth, a subprocess (1 rank, gloo, DS_ACCELERATOR=cpu) trains a tiny random LlamaForCausalLM with tied
embeddings for two optimizer steps under ZeRO-3 and saves it with rlengine's own
CheckpointManager (the trainer's layout: checkpoints/step_000002/{ds,state.json,config.yaml}).
It also writes the full parameters gathered by DeepSpeed itself (`GatheredParameters`): the
independent truth the exported safetensors are compared with.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import export as E  # noqa: E402

TRAIN_SCRIPT = textwrap.dedent(r'''
    import json, os, sys
    from pathlib import Path
    import torch, torch.distributed as dist
    base, run = Path(sys.argv[1]), Path(sys.argv[2])
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[3])
    dist.init_process_group("gloo", rank=0, world_size=1)
    import deepspeed
    from transformers import AutoModelForCausalLM
    from rlengine.checkpoint import CheckpointManager
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
           "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
           "zero_allow_untested_optimizer": True, "steps_per_print": 1 << 30}
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    for _ in range(2):
        x = torch.randint(0, model.config.vocab_size, (2, 12))
        loss = engine(input_ids=x, labels=x).loss
        engine.backward(loss)
        engine.step()
    full = {}
    for name, p in engine.module.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):
            full[name] = p.detach().clone()
    torch.save(full, run / "gathered.pt")
    config_yaml = f"model:\n  path: {base}\n  dtype: fp32\n"
    mgr = CheckpointManager(run / "checkpoints", keep_last=2, rank=0, barrier=dist.barrier)
    mgr.save(2, engine, {"data_index": 4}, config_yaml)
    dist.destroy_process_group()
    print("OK")
''')


def make_tiny_base(path: Path, hidden: int = 32) -> Path:
    """A tiny random Llama with tied embeddings, a word-level tokenizer and a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["<unk>", "<|im_start|>", "<|im_end|>", "user", "assistant", "system"] + list("0123456789+=?.") + \
        ["What", "is", "Think", "step", "by", "<think>", "</think>", "<answer>", "</answer>"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Digits(individual_digits=True)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", eos_token="<|im_end|>", pad_token="<|im_end|>",
        chat_template="{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> "
                      "{% endfor %}{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")
    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      max_position_embeddings=128, eos_token_id=2, pad_token_id=2, bos_token_id=1)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def zero3_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("export")
    base = make_tiny_base(root / "base")
    run = root / "run"
    run.mkdir()
    script = root / "train_tiny.py"
    script.write_text(TRAIN_SCRIPT)
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(script), str(base), str(run), str(port)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (run / "checkpoints" / "step_000002" / "ds").is_dir()
    return run


def fp32_recompute_bound(model_dir: Path, ids: torch.Tensor | None = None) -> float:
    """Bound on |delta log-prob| between two fp32 forwards of the same weights by the same code: they
    agree bit for bit in practice (measured 0), and a BLAS that blocks the head's dot products
    differently (another buffer alignment) moves a log-prob by at most 2 eps32 S + 4 eps32
    (|logp| + max|z|), S = max_v sum_i |h_i w_vi| (tests/test_logprobs_model.py); the largest
    over the tokens `ids` (default: tools/export.py's verification sequence)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if ids is None:
        ids = E.verification_ids(AutoTokenizer.from_pretrained(model_dir))
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0, :-1].double()   # after the final norm
        w = model.lm_head.weight.double()
        S = (hidden.abs() @ w.abs().t()).amax(-1)
        z = hidden @ w.t()
        logp = torch.log_softmax(z, -1).gather(-1, ids[0, 1:, None]).squeeze(-1)
        return float((torch.finfo(torch.float32).eps * (2 * S + 4 * (logp.abs() + z.abs().amax(-1)))).max())


def _load_safetensors(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state = {}
    for f in sorted(out.glob("*.safetensors")):
        state.update(load_file(f))
    return state


def test_export_fp32_matches_deepspeed_gathered_weights(zero3_run, tmp_path):
    out = tmp_path / "hf"
    report = E.export_checkpoint(zero3_run, out)  # a run dir: resolves checkpoints/latest
    assert report.tag is None and report.dtype == "fp32" and report.verified
    assert report.max_abs_diff <= fp32_recompute_bound(out) and report.num_tokens_compared > 10
    for name in ("config.json", "tokenizer.json", "chat_template.jinja", "generation_config.json",
                 "rlengine_export.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "rlengine_export.json").read_text())["state"]["step"] == 2
    gathered = torch.load(zero3_run / "gathered.pt")
    saved = _load_safetensors(out)
    base = _load_safetensors(zero3_run.parent / "base")
    assert "lm_head.weight" not in saved  # tied to the embeddings: stored once, as save_pretrained does
    assert report.num_params == sum(t.numel() for t in saved.values())
    for name, want in gathered.items():
        if name == "lm_head.weight":
            want_tied = gathered["model.embed_tokens.weight"]
            assert torch.equal(want, want_tied)
            continue
        assert torch.equal(saved[name], want), name
    moved = [n for n in gathered if n in base and not torch.equal(base[n], gathered[n])]
    assert len(moved) >= len(gathered) - 1  # training changed the weights, so the test can tell them apart

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.tie_word_embeddings
    assert torch.equal(model.lm_head.weight, gathered["model.embed_tokens.weight"])
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template and tok.eos_token == "<|im_end|>"


def test_export_bf16_from_step_dir(zero3_run, tmp_path):
    out = tmp_path / "hf_bf16"
    step_dir = zero3_run / "checkpoints" / "step_000002"
    report = E.export_checkpoint(step_dir, out, dtype="bf16")
    saved = _load_safetensors(out)
    assert all(t.dtype == torch.bfloat16 for t in saved.values())
    gathered = torch.load(zero3_run / "gathered.pt")
    assert torch.equal(saved["model.norm.weight"], gathered["model.norm.weight"].to(torch.bfloat16))
    assert report.max_abs_diff <= fp32_recompute_bound(out)     # identical to the weights rounded to bf16
    assert report.max_abs_diff_fp32 > 0         # but not to the fp32 master weights


def test_verification_detects_a_corrupted_export(zero3_run, tmp_path):
    from safetensors.torch import save_file

    out = tmp_path / "hf_bad"
    E.export_checkpoint(zero3_run, out, verify=False)
    state = E.consolidate_state_dict(zero3_run / "checkpoints" / "step_000002" / "ds")
    files = sorted(out.glob("*.safetensors"))
    saved = _load_safetensors(out)
    saved["model.layers.0.mlp.up_proj.weight"] += 0.05
    save_file(saved, files[0], metadata={"format": "pt"})
    diff, _, _ = E.verify_export(out, state, str(zero3_run.parent / "base"), torch.float32)
    # a detection threshold, not a rounding bound: 10x tools/export.py's default tolerance (1e-4), and
    # far above two fp32 forwards' rounding of the same weights (fp32_recompute_bound, ~1e-6 here)
    assert diff > 1e-3


def test_cli_and_clear_errors(zero3_run, tmp_path):
    rc = E.main([str(zero3_run / "checkpoints"), str(tmp_path / "cli_out")])
    assert rc == 0 and (tmp_path / "cli_out" / "config.json").is_file()
    wrong = make_tiny_base(tmp_path / "wrong_base", hidden=48)
    with pytest.raises(E.ExportError, match="shape"):
        E.export_checkpoint(zero3_run, tmp_path / "x", base_model=str(wrong))
    with pytest.raises(E.ExportError, match="does not exist"):
        E.locate_checkpoint(tmp_path / "nowhere")
    bare = zero3_run / "checkpoints" / "step_000002" / "ds"
    with pytest.raises(E.ExportError, match="--base-model"):
        E.export_checkpoint(bare, tmp_path / "y")


# ----------------------------------------------------------------------------- a real run

def _logprobs_of(model_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    return E.token_logprobs(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval(), ids)


def test_cli_exports_a_real_run_like_its_final_model(run_dir, tmp_path, capsys):
    """Run directory -> checkpoints/latest (step 3) -> HF directory: the same tensors and log-probs
    as final/, which the trainer gathered itself after step 3."""
    from transformers import AutoTokenizer

    out = tmp_path / "hf"
    assert E.main([str(run_dir), str(out)]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["verified"] and report["max_abs_diff"] <= fp32_recompute_bound(out) and report["dtype"] == "fp32"
    assert report["num_params"] == 134_515_008
    meta = json.loads((out / "rlengine_export.json").read_text())
    assert meta["state"]["step"] == 3 and meta["base_model"] == "embedded"
    saved, final = _load_safetensors(out), _load_safetensors(run_dir / "final")
    assert set(saved) == set(final)
    # both are copies of the same fp32 master weights (consolidated from the checkpoint, gathered by
    # the trainer): bit for bit equal, no arithmetic in between (measured: 0)
    unequal = [k for k in saved if not torch.equal(saved[k], final[k])]
    assert not unequal, unequal[:5]
    ids = E.verification_ids(AutoTokenizer.from_pretrained(out), "What is 3 + 4?", "<answer> 7 </answer>")
    assert float((_logprobs_of(out, ids) - _logprobs_of(run_dir / "final", ids)).abs().max()) <= fp32_recompute_bound(out, ids)


def test_export_of_an_earlier_real_checkpoint_in_bf16(run_dir, tmp_path):
    """checkpoints/step_000002 (not the latest) in bf16: verified against its own rounded weights,
    and holding the step-2 weights, which step 3 then changed."""
    out = tmp_path / "hf_bf16"
    report = E.export_checkpoint(run_dir / "checkpoints" / "step_000002", out, dtype="bf16")
    # the same fp32 forward of the same bf16-rounded weights; rounding the weights to bf16 moves the
    # log-probs far beyond that bound (eps_bf16 = 2^16 eps32)
    bound = fp32_recompute_bound(out)
    assert report.verified and report.max_abs_diff <= bound < report.max_abs_diff_fp32
    assert json.loads((out / "rlengine_export.json").read_text())["state"]["step"] == 2
    saved, final = _load_safetensors(out), _load_safetensors(run_dir / "final")
    assert all(t.dtype == torch.bfloat16 for t in saved.values())
    moved = [k for k in saved if not torch.equal(saved[k], final[k].to(torch.bfloat16))]
    assert moved                                                          # step 3 trained on top of it
