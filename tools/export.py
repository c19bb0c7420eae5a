#!/usr/bin/env python
"""Export a DeepSpeed ZeRO-3 training checkpoint as a Hugging Face model directory.

    python tools/export.py CHECKPOINT OUT_DIR [--base-model PATH] [--dtype auto|fp32|bf16]
                           [--no-verify] [--prompt TEXT] [--tolerance X]

CHECKPOINT is any of: a run directory (its checkpoints/latest is used), a run's checkpoints/
directory, one checkpoint `checkpoints/step_XXXXXX/` (with `ds/`, `state.json`, `config.yaml`),
or a bare DeepSpeed save directory (with its `latest` tag file; then pass --base-model).

The ZeRO-3 shards are consolidated into one fp32 state dict
(`deepspeed.utils.zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint`), loaded into the base
architecture (config of the checkpoint's `model.path`, resolved with
`rlengine.model.resolve_model_path`), and written with `save_pretrained` as safetensors plus
config, generation config and the base tokenizer with its chat template: a directory that
transformers and vLLM load directly.

Verification (on by default): the exported directory is reloaded with `from_pretrained` and its
per-token log-probs on a fixed chat prompt are compared with those of the consolidated state
dict (rounded to the export dtype) in the base architecture; max |delta| is printed and must be
below --tolerance. The gap to the unrounded fp32 weights is printed as well.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

VERIFY_PROMPT = "What is 12 + 7? Think step by step."
VERIFY_RESPONSE = "<think> 12 + 7 = 19 </think> <answer> 19 </answer>"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class ExportError(RuntimeError):
    """A checkpoint that cannot be exported; the message names the file or key."""


@dataclass
class ExportReport:
    out_dir: str
    checkpoint: str
    ds_dir: str
    tag: str | None
    base_model: str
    dtype: str
    num_tensors: int
    num_params: int
    seconds: float
    verified: bool = False
    max_abs_diff: float | None = None            # exported vs consolidated (rounded to dtype)
    max_abs_diff_fp32: float | None = None       # exported vs consolidated fp32
    num_tokens_compared: int = 0
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- locating

def locate_checkpoint(path: str | Path) -> tuple[Path | None, Path, str | None]:
    """(rlengine checkpoint dir or None, DeepSpeed save dir, tag or None = its `latest` file)."""
    p = Path(path)
    if not p.exists():
        raise ExportError(f"checkpoint path {p} does not exist")
    if (p / "checkpoints").is_dir():           # a run directory
        p = p / "checkpoints"
    if (p / "latest").is_file() and not (p / "ds").is_dir() and not _has_ds_tags(p):
        name = (p / "latest").read_text().strip()   # a checkpoints/ directory
        p = p / name
        if not p.is_dir():
            raise ExportError(f"{p.parent / 'latest'} names {name!r}, which does not exist")
    if (p / "ds").is_dir():
        return p, p / "ds", None
    if _has_ds_tags(p):
        return None, p, None
    raise ExportError(f"{p} is neither a run directory, a checkpoints/ directory, a checkpoint with ds/, "
                      "nor a DeepSpeed save directory")


def _has_ds_tags(p: Path) -> bool:
    return any(q.is_dir() and any(q.glob("*model_states.pt")) for q in p.iterdir()) if p.is_dir() else False


def checkpoint_model_path(ckpt_dir: Path | None) -> tuple[str | None, str | None]:
    """(model.path, model.dtype) from the checkpoint's config.yaml, or (None, None)."""
    import yaml

    if ckpt_dir is None or not (ckpt_dir / "config.yaml").is_file():
        return None, None
    raw = yaml.safe_load((ckpt_dir / "config.yaml").read_text()) or {}
    model = raw.get("model") or {}
    return model.get("path"), model.get("dtype")


def consolidate_state_dict(ds_dir: str | Path, tag: str | None = None) -> dict[str, torch.Tensor]:
    """The full fp32 state dict of a ZeRO (1/2/3) save, HF parameter names."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ds_dir = Path(ds_dir)
    if tag is None and not (ds_dir / "latest").is_file():
        tags = sorted(q.name for q in ds_dir.iterdir() if q.is_dir() and any(q.glob("*model_states.pt")))
        if len(tags) != 1:
            raise ExportError(f"{ds_dir}: no 'latest' tag file and {len(tags)} tag folders {tags}; pass --tag")
        tag = tags[0]
    try:
        state = get_fp32_state_dict_from_zero_checkpoint(str(ds_dir), tag=tag)
    except (FileNotFoundError, ValueError) as e:
        raise ExportError(f"{ds_dir}: cannot consolidate the DeepSpeed checkpoint: {e}") from None
    prefix = "module."
    if state and all(k.startswith(prefix) for k in state):
        state = {k[len(prefix):]: v for k, v in state.items()}
    return dict(state)


# ----------------------------------------------------------------------------- building

def build_model(base_path: str, state: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32):
    """The base architecture (from its config) holding `state`, in `dtype`. Raises on key mismatch."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from accelerate import init_empty_weights

    config = AutoConfig.from_pretrained(base_path)
    with init_empty_weights(include_buffers=False):  # parameters on `meta`, buffers (rotary) real
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    params = dict(model.named_parameters(remove_duplicate=False))
    unique = dict(model.named_parameters())              # tied copies appear once
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
    ties = bool(getattr(text_config, "tie_word_embeddings", False)) and out_emb is not None and in_emb is not None
    if ties:  # one tensor for both; the checkpoint may hold the shared weight under both names or one
        out_names = {n for n, p in params.items() if p is out_emb.weight}
        unique = {k: v for k, v in unique.items() if k not in out_names}
    missing = sorted(set(unique) - set(state))
    unexpected = sorted(set(state) - set(params))
    if missing or unexpected:
        raise ExportError(f"checkpoint does not match the base architecture {config.architectures} of {base_path}: "
                          f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                          f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    for k in unique:
        if tuple(state[k].shape) != tuple(params[k].shape):
            raise ExportError(f"checkpoint tensor {k!r} has shape {tuple(state[k].shape)}, the base architecture "
                              f"expects {tuple(params[k].shape)}")
    model.load_state_dict({k: state[k].to(torch.float32).clone() for k in unique}, strict=False, assign=True)
    if ties:
        out_emb.weight = in_emb.weight
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta:
        raise ExportError(f"parameters left unset after loading the checkpoint: {still_meta[:5]}")
    return model.to(dtype).eval()


# ----------------------------------------------------------------------------- verification

def verification_ids(tokenizer, prompt: str = VERIFY_PROMPT, response: str = VERIFY_RESPONSE) -> torch.Tensor:
    """[1, S] token ids of a fixed chat exchange (chat template when the tokenizer has one)."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True) + response
    else:
        text = prompt + "\n" + response
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    if ids.shape[1] < 2:
        raise ExportError("verification text tokenises to fewer than 2 tokens")
    return ids


@torch.no_grad()
def token_logprobs(model, ids: torch.Tensor) -> torch.Tensor:
    """[S-1] log p(token t | tokens < t), computed in fp32."""
    logits = model(input_ids=ids).logits.float()[0, :-1]                  # [S-1, V]
    return torch.log_softmax(logits, dim=-1).gather(-1, ids[0, 1:, None]).squeeze(-1)


def verify_export(out_dir: str | Path, state: dict[str, torch.Tensor], base_path: str, dtype: torch.dtype,
                  prompt: str = VERIFY_PROMPT) -> tuple[float, float, int]:
    """(max |delta| vs the consolidated weights rounded to dtype, max |delta| vs fp32, tokens compared)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(out_dir))
    ids = verification_ids(tokenizer, prompt)
    exported = AutoModelForCausalLM.from_pretrained(str(out_dir), dtype=torch.float32).eval()
    got = token_logprobs(exported, ids)
    rounded = {k: v.to(dtype).to(torch.float32) for k, v in state.items()}
    ref = token_logprobs(build_model(base_path, rounded, torch.float32), ids)
    ref32 = ref if dtype == torch.float32 else token_logprobs(build_model(base_path, state, torch.float32), ids)
    return float((got - ref).abs().max()), float((got - ref32).abs().max()), int(ids.shape[1] - 1)


# ----------------------------------------------------------------------------- export

def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, base_model: str | None = None,
                      dtype: str = "auto", tag: str | None = None, verify: bool = True,
                      prompt: str = VERIFY_PROMPT, tolerance: float = 1e-4) -> ExportReport:
    """Consolidate, write the HF directory, optionally verify. Returns what was done."""
    from transformers import AutoTokenizer, GenerationConfig

    from rlengine.model import resolve_model_path

    start = time.time()
    ckpt_dir, ds_dir, found_tag = locate_checkpoint(checkpoint)
    tag = tag or found_tag
    cfg_path, cfg_dtype = checkpoint_model_path(ckpt_dir)
    base = base_model or cfg_path
    if base is None:
        raise ExportError(f"{checkpoint}: no config.yaml with model.path next to the DeepSpeed directory; "
                          "pass --base-model (the model the run started from)")
    base_path = resolve_model_path(base)
    if dtype == "auto":
        dtype = cfg_dtype if cfg_dtype in DTYPES else "fp32"
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r}: valid choices auto, {', '.join(DTYPES)}")
    torch_dtype = DTYPES[dtype]

    state = consolidate_state_dict(ds_dir, tag)
    model = build_model(base_path, state, torch_dtype)
    try:
        model.generation_config = GenerationConfig.from_pretrained(base_path)
    except OSError:
        pass
    tokenizer = AutoTokenizer.from_pretrained(base_path)

    out = Path(out_dir)
    tmp = out.with_name(f".tmp-{out.name}")
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    meta = {"exported_from": str(Path(checkpoint).resolve()), "ds_dir": str(ds_dir), "tag": tag,
            "base_model": base, "dtype": dtype}
    if ckpt_dir is not None and (ckpt_dir / "state.json").is_file():
        meta["state"] = json.loads((ckpt_dir / "state.json").read_text())
    (tmp / "rlengine_export.json").write_text(json.dumps(meta, indent=1))
    if out.exists():
        shutil.rmtree(out)
    os.rename(tmp, out)

    report = ExportReport(out_dir=str(out), checkpoint=str(checkpoint), ds_dir=str(ds_dir), tag=tag,
                          base_model=base, dtype=dtype, num_tensors=len(state),
                          num_params=sum(p.numel() for p in model.parameters()), seconds=0.0)
    if verify:
        diff, diff32, n = verify_export(out, state, base_path, torch_dtype, prompt)
        report.max_abs_diff, report.max_abs_diff_fp32, report.num_tokens_compared = diff, diff32, n
        report.verified = diff <= tolerance
        if not report.verified:
            raise ExportError(f"verification failed: exported log-probs differ from the checkpoint's by "
                              f"{diff:.3g} > tolerance {tolerance:g} (on {n} tokens)")
    report.seconds = time.time() - start
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="DeepSpeed ZeRO-3 checkpoint -> Hugging Face directory (verified).")
    ap.add_argument("checkpoint", help="run dir, checkpoints/ dir, checkpoints/step_XXXXXX/, or a DeepSpeed save dir")
    ap.add_argument("out_dir", help="the Hugging Face directory to write (replaced if it exists)")
    ap.add_argument("--base-model", default=None,
                    help="model the run started from (default: model.path in the checkpoint's config.yaml)")
    ap.add_argument("--dtype", default="auto", help="auto (the run's model.dtype) | fp32 | bf16")
    ap.add_argument("--tag", default=None, help="DeepSpeed tag (default: its 'latest' file)")
    ap.add_argument("--no-verify", action="store_true", help="skip the reload + log-prob comparison")
    ap.add_argument("--prompt", default=VERIFY_PROMPT, help="user prompt of the verification exchange")
    ap.add_argument("--tolerance", type=float, default=1e-4, help="max |delta log-prob| accepted (default 1e-4)")
    args = ap.parse_args(argv)
    try:
        report = export_checkpoint(args.checkpoint, args.out_dir, args.base_model, args.dtype, args.tag,
                                   not args.no_verify, args.prompt, args.tolerance)
    except (ExportError, FileNotFoundError) as e:
        print(f"export: error: {e}", file=sys.stderr)
        return 2
    print(f"exported {report.num_params:,} parameters ({report.num_tensors} tensors, {report.dtype}) "
          f"from {report.ds_dir} to {report.out_dir} in {report.seconds:.1f} s")
    if report.verified:
        print(f"verified: max |delta log-prob| = {report.max_abs_diff:.3g} on {report.num_tokens_compared} tokens "
              f"(vs fp32 weights: {report.max_abs_diff_fp32:.3g})")
    print(json.dumps(report.__dict__))
    return 0


if __name__ == "__main__":
    sys.exit(main())
