"""Typed configuration: a tree of dataclasses loaded from YAML, then dotted CLI overrides.

    cfg = load_config("configs/default.yaml", ["loss.name=dgpo", "loss.n=2"])
    cfg = load_config(["configs/default.yaml", "configs/losses/gspo.yaml"])  # overlays merge in order
    python -m rlengine.config --config configs/default.yaml loss.name=dgpo   # prints the result

Rules:
  * defaults live once, in the dataclasses below;
  * an unknown key is an error naming the key and the closest valid one ("did you mean");
  * a value of the wrong type or out of range is an error naming the key;
  * the `loss` section is checked against the chosen loss's own hyperparameters (read from the
    loss registry), so adding a loss needs no edit here; naming another loss (a later file, or
    `loss.name=`) starts its section from that loss's own defaults and aggregation;
  * `--local_rank=N`, appended by the `deepspeed` launcher, is accepted and ignored.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml


class ConfigError(ValueError):
    """A bad configuration: the message names the offending key."""


def _opt(default: Any, help: str = "", *, ge: float | None = None, gt: float | None = None,
         le: float | None = None, lt: float | None = None):
    """A field with an inclusive/exclusive numeric range checked at load time."""
    meta = {"help": help, "ge": ge, "gt": gt, "le": le, "lt": lt}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class RunConfig:
    output_dir: str = _opt("runs/default", "where metrics, checkpoints, token dumps and the final model go")
    total_steps: int = _opt(100, "training steps; one step = one rollout batch with all its optimizer updates", ge=1)
    save_every: int = _opt(10, "checkpoint every K steps (0 = only at the end)", ge=0)
    keep_last: int = _opt(2, "complete checkpoints kept on disk", ge=1)
    resume: str = _opt("auto", "auto (last complete checkpoint if any) | never | a checkpoint path")
    seed: int = _opt(42, "global seed (data order, sampling, init)")
    log_every: int = _opt(1, "log metrics every K steps", ge=1)
    tensorboard: bool = _opt(True, "also write TensorBoard event files")
    wandb_project: Optional[str] = _opt(None, "log to Weights & Biases under this project when set")
    wandb_run_name: Optional[str] = _opt(None, "W&B run name (default: output_dir's name)")
    token_dump_every: int = _opt(5, "write a Parquet sample of per-token records every K steps (0 = never)", ge=0)
    token_dump_max: int = _opt(20000, "tokens per dump at most", ge=1)
    max_bad_steps: int = _opt(5, "stop after this many consecutive non-finite loss/grad steps", ge=1)
    export_final: bool = _opt(True, "save_pretrained the policy into <output_dir>/final at the end")
    socket_ifname: Optional[str] = _opt(None, "network interface of gloo's (and NCCL's) sockets on every node, e.g. "
                                              "eth0; needed where a host name resolves to a loopback address; "
                                              "`rlengine train --hostfile` picks it")
    collective_timeout_s: float = _opt(1800.0, "timeout of every process group (rlengine's and DeepSpeed's): a rank "
                                               "waiting longer for a peer (hung, or behind a dead link) ends the run "
                                               "(exit code 5); must exceed rollout.generate_timeout_s", gt=0)


@dataclass
class ModelConfig:
    path: str = _opt("embedded", "a Hugging Face causal-LM directory/name, or 'embedded' (SmolLM2-135M-Instruct)")
    dtype: Literal["auto", "fp32", "bf16"] = _opt("fp32", "training precision (bf16 = bf16 weights + fp32 master; "
                                                          "auto = bf16 where it is native, else fp32)")
    gradient_checkpointing: bool = _opt(False, "recompute activations in backward")
    ref_path: Optional[str] = _opt(None, "reference model for KL (default: model.path)")


@dataclass
class DataSource:
    preset: str = _opt("arithmetic", "arithmetic | gsm8k | math | deepmath | dapo | aime | custom")
    path: Optional[str] = _opt(None, "JSONL / Parquet file, a `datasets` directory or hub name; None = bundled set")
    subset: Optional[str] = _opt(None, "hub configuration name (GSM8K: main); for a local snapshot, the folder of that name")
    split: str = _opt("train", "split to read (bundled set: train | test)")
    weight: float = _opt(1.0, "mixture weight", gt=0)
    prompt_field: Optional[str] = _opt(None, "question field (custom mapping / override)")
    answer_field: Optional[str] = _opt(None, "ground-truth field (custom mapping / override)")


@dataclass
class DataConfig:
    preset: str = _opt("arithmetic", "single-source shorthand, see DataSource")
    path: Optional[str] = _opt(None, "single-source shorthand, see DataSource")
    subset: Optional[str] = _opt(None, "single-source shorthand, see DataSource")
    split: str = _opt("train", "single-source shorthand, see DataSource")
    prompt_field: Optional[str] = _opt(None, "single-source shorthand, see DataSource")
    answer_field: Optional[str] = _opt(None, "single-source shorthand, see DataSource")
    mixture: list[DataSource] = _opt([], "several weighted sources; replaces the single source when non-empty")
    system_prompt: str = _opt("think_answer", "think_answer | boxed | none | any literal text")
    max_prompt_tokens: int = _opt(512, "longer prompts are dropped and counted", ge=1)
    skip_bad_rows: bool = _opt(False, "skip (and count) malformed rows instead of failing")
    shuffle: bool = _opt(True, "seeded shuffle each epoch")
    seed: int = _opt(42, "data order seed")


@dataclass
class RolloutConfig:
    backend: Literal["hf", "vllm"] = _opt("hf", "sampler backend")
    placement: Literal["colocated", "separate"] = _opt("colocated", "sampler in every trainer rank, or on dedicated rollout ranks")
    num_ranks: int = _opt(0, "rollout ranks when placement=separate (taken from the end of the world)", ge=0)
    prompts_per_step: int = _opt(4, "prompts per rollout batch (global)", ge=1)
    group_size: int = _opt(4, "responses per prompt (the GRPO group)", ge=1)
    max_new_tokens: int = _opt(64, "response length cap", ge=1)
    temperature: float = _opt(1.0, "sampling temperature; the trainer's log-probs use the same", gt=0)
    top_p: float = _opt(1.0, "nucleus sampling", gt=0, le=1)
    stop: list[str] = _opt([], "stop strings (kept in the response)")
    dtype: Optional[Literal["auto", "fp32", "bf16"]] = _opt(None, "sampler precision (default: model.dtype)")
    bucket_mb: int = _opt(16, "weight-broadcast bucket size (16 MB measured fastest on CPU gloo)", ge=1)
    sync_timeout_s: float = _opt(300.0, "a weight push (broadcast + the sampler loading it) that takes longer is an error", gt=0)
    generate_timeout_s: float = _opt(1200.0, "a sampler call (a step's generation, a weight load, a probe) that takes "
                                             "longer, or a spawned vLLM engine that dies, ends the run (exit code 5)", gt=0)
    max_staleness: int = _opt(0, "0: generate, then train, in turn; k >= 1 (placement=separate): rollout ranks "
                                 "generate the next steps while the trainers update, never more than k weight "
                                 "versions behind", ge=0)
    probe_threshold: Optional[float] = _opt(None, "a sampler/trainer log-prob gap above this after a push means the "
                                                  "sampler does not hold the trainer's weights (None: 0.005 in fp32, "
                                                  "0.1 when either side is bf16)", ge=0)
    on_probe_failure: Literal["stop", "warn"] = _opt("stop", "a gap still above rollout.probe_threshold after one "
                                                     "retried push: stop the run (exit code 3), or only warn")
    probe_tokens: int = _opt(64, "probe sequence length: the last half of it from the first prompt, the rest "
                                 "from its response (both sides score the same tokens; short is cheap)", ge=2)
    vllm_kv_cache_gb: float = _opt(1.0, "vLLM KV-cache size", gt=0)
    vllm_gpu_memory_utilization: float = _opt(0.5, "vLLM GPU memory share (GPU only)", gt=0, le=1)


@dataclass
class RewardConfig:
    name: str = _opt("answer_format", "a registered reward (format | answer | boxed | answer_format) or module:function")
    num_workers: int = _opt(2, "reward worker processes", ge=1)
    timeout_s: float = _opt(5.0, "an item that takes longer scores 0 and is counted", gt=0)


@dataclass
class TrainConfig:
    num_iterations: int = _opt(2, "passes over each rollout batch (the gate paper: 2)", ge=1)
    mini_batch_prompts: Optional[int] = _opt(None, "prompts per optimizer step (None = the whole rollout batch)", ge=1)
    micro_batch_size: int = _opt(4, "sequences per forward/backward per rank (gradient accumulation is derived)", ge=1)
    share_prompt_forward: bool = _opt(False, "run each prompt once per micro-batch for all its responses, and the "
                                      "groups' common prefix once per row where cheaper (a tree attention mask, "
                                      "rlengine/shared_prompt.py): same numbers, fewer tokens; sdpa/eager "
                                      "attention, dense [L, L] mask per row")
    lr: float = _opt(1e-6, "AdamW learning rate", gt=0)
    betas: list[float] = _opt([0.9, 0.999], "AdamW betas")
    adam_eps: float = _opt(1e-8, "AdamW eps", gt=0)
    weight_decay: float = _opt(0.0, "AdamW weight decay", ge=0)
    lr_schedule: Literal["constant", "linear", "cosine"] = _opt("constant", "decay after warmup")
    warmup_steps: int = _opt(0, "optimizer steps of linear warmup", ge=0)
    min_lr_ratio: float = _opt(0.0, "final lr / lr for linear and cosine", ge=0, le=1)
    grad_clip: float = _opt(1.0, "global grad-norm clip (0 = off)", ge=0)
    kl_coef: float = _opt(0.0, "KL-to-reference coefficient (0 = no reference model loaded)", ge=0)
    kl_estimator: Literal["k1", "k2", "k3"] = _opt("k3", "KL estimator")
    kl_in_reward: bool = _opt(False, "subtract kl_coef * KL from the reward instead of adding it to the loss")
    entropy_coef: float = _opt(0.0, "entropy bonus coefficient", ge=0)
    adv_norm_std: bool = _opt(True, "divide by the group std (False = Dr. GRPO)")
    adv_batch_norm: bool = _opt(False, "normalise advantages over the whole batch afterwards")
    dynamic_filter: bool = _opt(False, "DAPO: drop groups whose rewards are all equal")
    correction: Literal["none", "tis", "mis"] = _opt("none", "off-policy correction of the sampler/trainer gap "
                                                     "(rlengine/correction.py): none, truncated IS, masked IS")
    correction_level: Literal["token", "sequence", "geometric"] = _opt("token", "IS ratio per token, per response "
                                                                        "(product), or per response (geometric mean)")
    correction_high: float = _opt(2.0, "tis: the cap of the IS weight; mis: the upper bound kept", gt=0)
    correction_low: Optional[float] = _opt(None, "mis: the lower bound kept (None: 1 / correction_high)", ge=0)
    tis_cap: Optional[float] = _opt(None, "shorthand for correction=tis, correction_level=token, correction_high=<cap>",
                                    gt=0)


@dataclass
class LossConfig:
    """`name`, `agg`, `max_len`, plus the chosen loss's own hyperparameters (kept in `params`).

    In YAML the hyperparameters sit beside `name` (`loss: {name: dgpo, n: 2}`)."""

    name: str = "grpo"                    # a registered loss or a plug-in package.module:function
    agg: Optional[str] = None             # None: the loss's own (token-mean; seq-mean-token-mean for gspo, gmpo)
    max_len: Optional[int] = None
    params: dict = field(default_factory=dict)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    deepspeed: dict = field(default_factory=dict)  # passed through into the DeepSpeed config


# --------------------------------------------------------------------------- building

def _did_you_mean(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else f" (valid: {', '.join(sorted(valid))})"


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp` (coercing int -> float only); raise naming `key`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"config key '{key}': {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping, got {type(value).__name__}")
        return _build(tp, value, key)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}.{i}") for i, v in enumerate(value)] if args else list(value)
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected true/false, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `1e-5` (no dot) as a string: accept it as a number
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
        return value
    raise ConfigError(f"config key '{key}': unsupported type {_type_name(tp)}")


def _check_range(value: Any, meta: dict, key: str) -> None:
    if value is None or not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    for bound, ok, word in (("ge", lambda v, b: v >= b, ">="), ("gt", lambda v, b: v > b, ">"),
                            ("le", lambda v, b: v <= b, "<="), ("lt", lambda v, b: v < b, "<")):
        b = meta.get(bound)
        if b is not None and not ok(value, b):
            raise ConfigError(f"config key '{key}': {value!r} is out of range (must be {word} {b})")


def _build(cls: type, raw: dict, prefix: str) -> Any:
    if cls is LossConfig:
        return _build_loss(raw, prefix)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise ConfigError(f"unknown config key '{full}'" + _did_you_mean(str(key), names))
        f = next(f for f in dataclasses.fields(cls) if f.name == key)
        kwargs[key] = _coerce(value, hints[key], full)
        _check_range(kwargs[key], dict(f.metadata), full)
    return cls(**kwargs)


def _build_loss(raw: dict, prefix: str) -> LossConfig:
    from rlengine import losses  # the registry knows each loss's hyperparameters

    raw = dict(raw)
    name = raw.pop("name", LossConfig.name)
    agg = raw.pop("agg", None)
    max_len = raw.pop("max_len", None)
    if raw.pop("params", None):
        raise ConfigError(f"config key '{prefix}.params': write hyperparameters directly under '{prefix}'")
    try:
        entry = losses.LOSSES.resolve(name)                  # a registry name or a module:function plug-in
    except ValueError as e:
        hint = "" if ":" in str(name) else _did_you_mean(str(name), list(losses.LOSSES))
        raise ConfigError(f"config key '{prefix}.name': {e}{hint}") from None
    agg = entry.agg if agg is None else agg                  # the loss's own aggregation unless set
    if agg not in losses.AGG_MODES:
        raise ConfigError(f"config key '{prefix}.agg': {agg!r} is not one of {list(losses.AGG_MODES)}")
    if max_len is not None and (isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1):
        raise ConfigError(f"config key '{prefix}.max_len': expected a positive integer, got {max_len!r}")
    valid = list(entry.defaults)
    for key in raw:
        if key not in valid:
            raise ConfigError(f"unknown config key '{prefix}.{key}' for loss '{name}'"
                              + _did_you_mean(str(key), valid + ["name", "agg", "max_len"]))
    try:
        params = losses.LOSSES.build(name, **raw).params    # validated, and the elementwise promise checked
    except ValueError as e:
        raise ConfigError(f"config section '{prefix}': {e}") from None
    return LossConfig(name=name, agg=agg, max_len=max_len, params=params)


def _check_cross_fields(cfg: Config) -> None:
    """Constraints that span sections."""
    r = cfg.rollout
    if r.placement == "separate" and r.num_ranks < 1:
        raise ConfigError("config key 'rollout.num_ranks': placement=separate needs at least 1 rollout rank")
    if r.placement == "colocated" and r.num_ranks != 0:
        raise ConfigError("config key 'rollout.num_ranks': only used with rollout.placement=separate (set it to 0)")
    if cfg.run.collective_timeout_s <= max(r.generate_timeout_s, r.sync_timeout_s):
        # the other ranks wait in a collective while one rank generates or loads weights
        raise ConfigError(f"config key 'run.collective_timeout_s': {cfg.run.collective_timeout_s:g} must exceed "
                          f"rollout.generate_timeout_s ({r.generate_timeout_s:g}) and rollout.sync_timeout_s "
                          f"({r.sync_timeout_s:g}): ranks wait in a collective while a sampler works")
    if r.max_staleness and r.placement != "separate":
        raise ConfigError(f"config key 'rollout.max_staleness': {r.max_staleness} needs rollout.placement=separate: a "
                          "colocated sampler shares the trainer's process and device, so it cannot generate while "
                          "the trainer updates (use 0)")
    from rlengine.correction import correction_of

    try:
        correction_of(cfg.train)
    except ValueError as e:
        raise ConfigError(f"config section 'train': {e}") from None
    mb = cfg.train.mini_batch_prompts
    if mb is not None and r.prompts_per_step % mb != 0:
        raise ConfigError(f"config key 'train.mini_batch_prompts': {mb} must divide rollout.prompts_per_step "
                          f"({r.prompts_per_step})")
    if len(cfg.train.betas) != 2 or not all(0 <= b < 1 for b in cfg.train.betas):
        raise ConfigError(f"config key 'train.betas': expected two numbers in [0, 1), got {cfg.train.betas}")
    from rlengine.data import PRESETS
    from rlengine.rewards import get_reward

    try:
        get_reward(cfg.reward.name)
    except (ValueError, ImportError, AttributeError) as e:
        raise ConfigError(f"config key 'reward.name': {e}") from None
    sources = [("data", cfg.data)] + [(f"data.mixture.{i}", m) for i, m in enumerate(cfg.data.mixture)]
    for key, src in sources:
        if src.preset not in PRESETS:
            raise ConfigError(f"config key '{key}.preset': unknown preset {src.preset!r}"
                              + _did_you_mean(src.preset, list(PRESETS)))
    if cfg.run.resume not in ("auto", "never") and not Path(cfg.run.resume).exists():
        raise ConfigError(f"config key 'run.resume': checkpoint {cfg.run.resume!r} does not exist "
                          "(use auto, never, or an existing checkpoint directory)")


# --------------------------------------------------------------------------- overrides

def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key.sub=value")
    key, text = item.split("=", 1)
    try:
        value = yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        value = text
    return key.strip().split("."), value


def _set_dotted(raw: dict, path: list[str], value: Any) -> None:
    node: Any = raw
    for i, part in enumerate(path[:-1]):
        if isinstance(node, list):
            node = node[int(part)]
            continue
        nxt = node.get(part)
        if nxt is None:
            nxt = [] if path[i + 1].isdigit() else {}
            node[part] = nxt
        node = nxt
    last = path[-1]
    if isinstance(node, list):
        idx = int(last)
        while len(node) <= idx:
            node.append({})
        node[idx] = value
    else:
        node[last] = value


def to_dict(cfg: Config) -> dict:
    """The resolved config as plain data (loss hyperparameters flattened back beside `name`)."""
    out = dataclasses.asdict(cfg)
    loss = out.pop("loss")
    params = loss.pop("params")
    out["loss"] = {**loss, **params}
    return out


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def _read_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {p}: top level must be a mapping")
    return raw


def _merge(base: dict, overlay: dict) -> dict:
    """`overlay` deep-merged into `base` (mappings merge key by key, anything else replaces). A
    loss section naming another loss replaces the base's loss section whole: the new loss starts
    from its own defaults, not from the hyperparameters of the loss it replaces."""
    out = dict(base)
    for key, value in overlay.items():
        if (key == "loss" and isinstance(value, dict) and isinstance(out.get("loss"), dict)
                and value.get("name", out["loss"].get("name")) != out["loss"].get("name")):
            out[key] = _loss_section_for(value["name"], out["loss"]) | value
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _loss_section_for(name: Any, previous: dict) -> dict:
    """What a loss section keeps when it switches to loss `name`: only the keys that are not a
    loss's own (max_len, which belongs to the run's lengths)."""
    return {"name": name, **({"max_len": previous["max_len"]} if "max_len" in previous else {})}


def load_config(path: str | Path | list | tuple | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """YAML file(s) + dotted overrides -> a validated `Config`.

    Several files are deep-merged in order (`default.yaml` then an overlay such as
    `losses/gspo.yaml`); the overrides apply last, `loss.name=...` first among them. A file or
    override that names another loss starts the loss section afresh from that loss's defaults."""
    paths = [] if path is None else [path] if isinstance(path, (str, Path)) else list(path)
    raw: dict = {}
    for p in paths:
        raw = _merge(raw, _read_yaml(p))
    parsed = [_parse_override(item) for item in overrides]
    for keys, value in sorted(parsed, key=lambda kv: kv[0] != ["loss", "name"]):   # stable: loss.name first
        if keys == ["loss", "name"]:
            raw = _merge(raw, {"loss": {"name": value}})
        else:
            _set_dotted(raw, keys, value)
    cfg = _build(Config, raw, "")
    _check_cross_fields(cfg)
    _resolve_auto(cfg)
    return cfg


def _resolve_auto(cfg: Config) -> None:
    """`dtype: auto` becomes what this machine runs natively (`runtime.resolve_dtype`), so the
    resolved config (printed, saved beside the run) says which precision was used."""
    from rlengine.runtime import resolve_dtype

    cfg.model.dtype = resolve_dtype(cfg.model.dtype)
    cfg.rollout.dtype = resolve_dtype(cfg.rollout.dtype)


def parse_cli(argv: list[str] | None = None, description: str = "rlengine") -> tuple[Config, argparse.Namespace]:
    """`--config X.yaml key=value ...` (plus the launcher's `--local_rank=N`) -> (Config, args)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--config", action="append", help="YAML config file (defaults are used for anything it "
                    "omits); repeat it to merge overlays in order, e.g. --config configs/default.yaml "
                    "--config configs/losses/gspo.yaml")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. loss.name=dgpo loss.n=2")
    args = ap.parse_args(argv)
    return load_config(args.config, args.overrides), args


def main(argv: list[str] | None = None) -> int:
    try:
        cfg, _ = parse_cli(argv, "Print the resolved rlengine config")
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    print(to_yaml(cfg), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
