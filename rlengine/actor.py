"""The DeepSpeed ZeRO-3 policy (and the frozen reference model for KL).

`Actor` owns the trained model inside a DeepSpeed engine: ZeRO-3 partitioning, AdamW, the
learning-rate schedule, gradient clipping and accumulation, bf16 or fp32. `ReferenceModel` is
the same architecture in a ZeRO-3 engine without optimizer, loaded only when a KL coefficient
is set. Both compute per-token log-probs of response tokens with the memory-lean chunked LM
head (rlengine/logprobs.py), at the sampler's temperature.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from rlengine.config import Config


# --------------------------------------------------------------------------- batches

@dataclass
class SeqBatch:
    """Right-padded prompt+response sequences and where the responses sit."""

    input_ids: torch.Tensor       # [B, S] prompt then response, right-padded
    attention_mask: torch.Tensor  # [B, S] 1 on real tokens
    resp_pos: torch.Tensor        # [B, T] index in S of each response token (0 where padded)
    resp_mask: torch.Tensor       # [B, T] 1 on response tokens
    targets: torch.Tensor         # [B, T] the response token ids (pad where masked)


def make_batch(prompt_ids: list[list[int]], response_ids: list[list[int]], pad_id: int) -> SeqBatch:
    B = len(prompt_ids)
    S = max(len(p) + len(r) for p, r in zip(prompt_ids, response_ids))
    T = max(1, max(len(r) for r in response_ids))
    input_ids = torch.full((B, S), pad_id, dtype=torch.long)
    attn = torch.zeros((B, S), dtype=torch.long)
    resp_pos = torch.zeros((B, T), dtype=torch.long)
    resp_mask = torch.zeros((B, T), dtype=torch.float32)
    targets = torch.full((B, T), pad_id, dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        seq = list(p) + list(r)
        input_ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attn[i, : len(seq)] = 1
        if r:
            resp_pos[i, : len(r)] = torch.arange(len(p), len(p) + len(r))
            resp_mask[i, : len(r)] = 1.0
            targets[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return SeqBatch(input_ids, attn, resp_pos, resp_mask, targets)


def response_logprobs(model, batch: SeqBatch, temperature: float, with_entropy: bool, share_prompt: bool = False):
    """Per-token log-prob (and entropy) of each response token under `model` (an HF causal LM or
    the DeepSpeed engine around it), through the chunked LM head: the full [B, S, V] logits never
    exist. With `share_prompt`, the sequences that share a prompt run as one row with the prompt
    once, and the groups' common prefix once where that is cheaper (rlengine/shared_prompt.py);
    the same numbers up to rounding, fewer tokens.
    Returns ([B, T], [B, T] or None), zero where masked."""
    from rlengine.logprobs import scored_logprobs, token_logprobs

    # The forward runs where the model lives (a GPU under DeepSpeed); the results come back to the
    # batch's device (the CPU), where the loss math and bookkeeping live. `.to()` is differentiable:
    # backward carries the gradient to the model's device.
    device, home = _model_device(model), batch.input_ids.device
    if share_prompt:
        from rlengine.shared_prompt import attention_mask_4d, attention_pair_cost, pack_shared_prompts

        hf = getattr(model, "module", model)
        pack = pack_shared_prompts(batch.input_ids, batch.resp_pos, batch.resp_mask, pad_id=0,
                                   pair_cost=attention_pair_cost(hf.config))
        mask = attention_mask_4d(pack.segments, getattr(hf.config, "_attn_implementation", None), hf.dtype,
                                 pack.parents)
        logp_rows, ent_rows = scored_logprobs(model, pack.input_ids.to(device), mask.to(device),
                                              pack.position_ids.to(device), pack.rows.to(device),
                                              pack.targets.to(device), temperature, with_entropy)
        where = (pack.seq_index, pack.tok_index)
        scatter = (lambda rows_: rows_.to(home).new_zeros(batch.resp_mask.shape).index_put(where, rows_.to(home)))
        return scatter(logp_rows), (scatter(ent_rows) if with_entropy else None)
    B, S = batch.input_ids.shape
    target = torch.zeros((B, S), dtype=torch.bool)                 # [B, S]
    sel = batch.resp_mask.bool()                                   # [B, T]
    rows = torch.arange(B).unsqueeze(1).expand_as(batch.resp_pos)
    target[rows[sel], batch.resp_pos[sel]] = True
    logp_full, ent_full = token_logprobs(model, batch.input_ids.to(device), batch.attention_mask.to(device),
                                         target.to(device), temperature=temperature, with_entropy=with_entropy)
    logp_full = logp_full.to(home)
    ent_full = ent_full.to(home) if ent_full is not None else None
    logp = logp_full.gather(1, batch.resp_pos) * batch.resp_mask   # [B, T]
    ent = ent_full.gather(1, batch.resp_pos) * batch.resp_mask if with_entropy else None
    return logp, ent


def _model_device(model) -> torch.device:
    """Where `model` (an HF model or a DeepSpeed engine around one) computes."""
    device = getattr(model, "device", None)
    if isinstance(device, (torch.device, str)):
        return torch.device(device)
    return next(model.parameters()).device


@torch.no_grad()
def batched_logprobs(model, seqs: SeqBatch, temperature: float, micro: int, share_prompt: bool = False) -> torch.Tensor:
    """Log-probs [B, T] of every response token under `model`, `micro` sequences at a time, no grad."""
    from dataclasses import fields

    out = torch.zeros(seqs.resp_mask.shape)
    for idx in torch.arange(seqs.input_ids.shape[0]).split(micro):
        part = SeqBatch(*(getattr(seqs, f.name)[idx] for f in fields(SeqBatch)))
        out[idx] = response_logprobs(model, part, temperature, with_entropy=False, share_prompt=share_prompt)[0]
    return out


# --------------------------------------------------------------------------- DeepSpeed config

def _deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def deepspeed_config(cfg: Config, dp_world_size: int, grad_accum: int, with_optimizer: bool = True,
                     hidden_size: int | None = None) -> dict:
    """The DeepSpeed config rlengine models; `cfg.deepspeed` is deep-merged over it last.

    With the model's `hidden_size` the ZeRO-3 communication buffers are sized to the model (H^2
    elements per gradient-reduce bucket, 0.9 H^2 per parameter prefetch, as the HF Trainer's "auto"
    does) instead of DeepSpeed's fixed 5e8 / 5e7 elements: less peak memory, the same losses
    (figures in docs/benchmarks.md)."""
    t = cfg.train
    zero: dict = {"stage": 3, "stage3_param_persistence_threshold": 0}
    if hidden_size:
        zero["reduce_bucket_size"] = hidden_size * hidden_size
        zero["stage3_prefetch_bucket_size"] = int(0.9 * hidden_size * hidden_size)
    ds = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": t.micro_batch_size * grad_accum * dp_world_size,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.model.dtype == "bf16"},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if with_optimizer:
        ds["gradient_clipping"] = t.grad_clip
        ds["optimizer"] = {"type": "AdamW", "params": {"lr": t.lr, "betas": list(t.betas), "eps": t.adam_eps,
                                                       "weight_decay": t.weight_decay}}
    return _deep_merge(ds, cfg.deepspeed)


def lr_multiplier(cfg: Config, total_updates: int):
    """Optimizer-step -> lr / base lr: linear warmup, then constant / linear / cosine decay."""
    t = cfg.train

    def f(update: int) -> float:
        if t.warmup_steps and update < t.warmup_steps:
            return (update + 1) / t.warmup_steps
        if t.lr_schedule == "constant":
            return 1.0
        span = max(1, total_updates - t.warmup_steps)
        progress = min(1.0, (update - t.warmup_steps) / span)
        if t.lr_schedule == "linear":
            decay = 1.0 - progress
        else:
            decay = 0.5 * (1.0 + math.cos(math.pi * progress))
        return t.min_lr_ratio + (1.0 - t.min_lr_ratio) * decay

    return f


class _TrainerMPU:
    """Tells DeepSpeed which ranks form the data-parallel (ZeRO) group when some ranks are
    rollout ranks (placement=separate)."""

    def __init__(self, group, ranks: list[int]):
        import torch.distributed as dist

        self.group, self.ranks, self.rank = group, ranks, dist.get_rank()

    def get_data_parallel_group(self):
        return self.group

    def get_data_parallel_world_size(self):
        return len(self.ranks)

    def get_data_parallel_rank(self):
        return self.ranks.index(self.rank)

    def get_model_parallel_group(self):
        return None

    def get_model_parallel_world_size(self):
        return 1

    def get_model_parallel_rank(self):
        return 0


# --------------------------------------------------------------------------- models

def model_hidden_size(path: str) -> int | None:
    """`hidden_size` from the model's config (None when it has none under that name)."""
    from transformers import AutoConfig

    from rlengine.model import resolve_model_path

    config = AutoConfig.from_pretrained(resolve_model_path(path))
    config = getattr(config, "text_config", None) or config
    size = getattr(config, "hidden_size", None)
    return int(size) if size else None


def _load_zero3_model(cfg: Config, path: str, ds_cfg: dict, dp_group):
    """Load an HF causal LM for ZeRO-3. With the whole world as the data-parallel group the
    weights are partitioned while loading (HfDeepSpeedConfig); with a sub-group (rollout ranks
    elsewhere) the model is loaded whole and DeepSpeed partitions it at initialize()."""
    from transformers.integrations import HfDeepSpeedConfig

    from rlengine.logprobs import install_chunked_head
    from rlengine.model import load_causal_lm

    keep_alive = HfDeepSpeedConfig(ds_cfg) if dp_group is None else None
    model = load_causal_lm(path, dtype=cfg.model.dtype)
    install_chunked_head(model)
    return model, keep_alive


class Actor:
    """The trained policy in a DeepSpeed ZeRO-3 engine."""

    def __init__(self, cfg: Config, model_path: str, grad_accum: int, total_updates: int,
                 dp_group=None, dp_ranks: list[int] | None = None):
        import deepspeed
        import torch.distributed as dist

        self.cfg = cfg
        world = len(dp_ranks) if dp_ranks else dist.get_world_size()
        self.ds_config = deepspeed_config(cfg, world, grad_accum, hidden_size=model_hidden_size(model_path))
        model, self._hf_ds = _load_zero3_model(cfg, model_path, self.ds_config, dp_group)
        if cfg.model.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        mpu = _TrainerMPU(dp_group, dp_ranks) if dp_group is not None else None
        schedule = lr_multiplier(cfg, total_updates)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
            config=self.ds_config, mpu=mpu,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule))
        self._hf_ds = None  # loading is done: later from_pretrained calls (the sampler) must not partition
        self.engine.train()
        self.grad_accum, self.dp_group = grad_accum, dp_group
        self.dp_world = world
        self.share_prompt = cfg.train.share_prompt_forward

    @property
    def module(self):
        return self.engine.module

    def logprobs(self, batch: SeqBatch, temperature: float, with_entropy: bool = True):
        return response_logprobs(self.engine, batch, temperature, with_entropy, share_prompt=self.share_prompt)

    def batch_logprobs(self, seqs: SeqBatch, temperature: float, micro: int) -> torch.Tensor:
        """pi_old: the log-probs [B, T] before this step's updates, micro-batch by micro-batch."""
        return batched_logprobs(self.engine, seqs, temperature, micro, self.share_prompt)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def update(self, batch, idx: torch.Tensor, loss_fn, cfg: Config, metrics, recorder=None) -> float:
        """One optimizer step on the sequences `idx` of `batch` (this rank's share of a mini-batch;
        a `RolloutBatch`): the
        micro-batch loop with gradient accumulation, each micro-batch's loss weighted by its share
        of the global mini-batch's units (rlengine/objective.py). Adds the loss's metrics, entropy
        and KL to `metrics` (token-weighted), and every token to `recorder` when given. Returns the
        global gradient norm (inf / nan when DeepSpeed discarded a non-finite step).
        Collective over the trainer ranks."""
        from rlengine.correction import correction_metrics, mismatch_kl
        from rlengine.distributed import all_reduce
        from rlengine.losses import kl_k3
        from rlengine.objective import backward_scale, regularised_loss, unit_count

        agg, max_len = cfg.loss.agg, cfg.loss.max_len or cfg.rollout.max_new_tokens
        global_units = all_reduce([unit_count(batch.loss_mask[idx], agg)], group=self.dp_group)[0]
        grad_norm, loss_total = float("nan"), 0.0
        for micro in idx.split(cfg.train.micro_batch_size):
            mb = batch.select(micro)
            mask = mb.loss_mask                                                         # [b, T]
            logp, entropy = self.logprobs(mb.seqs, cfg.rollout.temperature, with_entropy=True)   # [b, T]
            old = logp.detach() if mb.old_logp is None else mb.old_logp    # None: on-policy single update
            if mb.old_logp is None:    # pi_old is this forward: the sampler gap is measured here (correction off)
                tokens = float(mb.resp_mask.sum())
                metrics.mean("mismatch/kl", mismatch_kl(old, mb.sampler_logp, mb.resp_mask), tokens)
                metrics.means(correction_metrics(mask, mask, mask), tokens)
            out = loss_fn(logp, old, mb.advantages, mask, agg=agg, max_len=max_len, entropy=entropy.detach())
            loss = regularised_loss(out.loss, logp, entropy, mb.ref_logp, mask, cfg.train, agg, max_len)
            units = unit_count(mask, agg)
            self.backward(loss * backward_scale(units, global_units, self.grad_accum, self.dp_world))
            stepped, norm = self.step()
            grad_norm = norm if stepped else grad_norm
            loss_total += float(loss.detach()) * units / max(global_units, 1.0)
            _add_token_metrics(metrics, out, logp.detach(), entropy.detach(), mb.ref_logp, mask, kl_k3)
            if recorder is not None:
                recorder.add(micro, mb, logp.detach(), old, out, entropy.detach())
        metrics.total("loss_sum", loss_total)          # this rank's share of the mini-batch loss
        return grad_norm

    def step(self) -> tuple[bool, float | None]:
        """engine.step() after every micro-batch; at an accumulation boundary returns
        (True, grad_norm) — grad_norm is inf/nan when DeepSpeed discarded a non-finite step."""
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.step()
        if not boundary:
            return False, None
        norm = self.engine.get_global_grad_norm()
        return True, float(norm) if norm is not None else float("nan")

    def release_params(self) -> None:
        """Wait for and release every gathered ZeRO-3 parameter: a no-grad forward (the probe) can
        leave prefetched ones in flight, and the next gather (a retried push) then fails with
        'Cannot partition a param in flight'."""
        self.engine.empty_partition_cache()

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def named_parameters_gathered(self):
        """Full parameters, one layer gathered at a time (collective over the ZeRO group): a
        `weight_sync.ParamStream`, whose manifest lets a push stream the tensors as they are
        gathered (a plain generator made the broadcaster hold every gathered tensor at once)."""
        from rlengine.weight_sync import iter_gathered_params

        return iter_gathered_params(self.engine.module)

    def save_pretrained(self, out_dir: str, tokenizer, is_writer: bool) -> None:
        """Consolidate the ZeRO-3 weights and write an HF directory (collective; rank 0 writes)."""
        state = {}
        for name, t in self.named_parameters_gathered():
            if is_writer:
                state[name] = t.detach().to("cpu", copy=True)
        if is_writer:
            save_hf_dir(self.engine.module, state, tokenizer, out_dir)


def _add_token_metrics(metrics, out, logp, entropy, ref_logp, mask, kl_k3) -> None:
    """The loss's metrics, the entropy and the KL to the reference, weighted by response tokens."""
    tokens = float(mask.sum())
    for key, value in out.metrics.items():
        if key == "ratio_min":
            metrics.min(key, value)
        elif key == "ratio_max":
            metrics.max(key, value)
        else:
            metrics.mean(key, value, tokens)
    denominator = mask.sum().clamp_min(1)
    metrics.mean("entropy", float((entropy * mask).sum() / denominator), tokens)
    if ref_logp is not None:
        metrics.mean("kl_ref", float((kl_k3(logp, ref_logp) * mask).sum() / denominator), tokens)


def save_hf_dir(model, state: dict[str, torch.Tensor], tokenizer, out_dir: str) -> None:
    """Write `state` (full tensors, HF names) as a Hugging Face directory that transformers and
    vLLM load: safetensors + config + generation config + tokenizer with its chat template.
    Written to a temporary sibling and renamed, so a kill never leaves a half-written model."""
    import os
    import shutil
    from pathlib import Path

    out = Path(out_dir)
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), state_dict=state, safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    if out.exists():
        shutil.rmtree(out)
    os.rename(tmp, out)


class ReferenceModel:
    """Frozen copy of the initial policy for KL, ZeRO-3 partitioned, no optimizer."""

    def __init__(self, cfg: Config, model_path: str, dp_group=None, dp_ranks: list[int] | None = None):
        import deepspeed
        import torch.distributed as dist

        world = len(dp_ranks) if dp_ranks else dist.get_world_size()
        ds_cfg = deepspeed_config(cfg, world, grad_accum=1, with_optimizer=False,
                                  hidden_size=model_hidden_size(model_path))
        model, self._hf_ds = _load_zero3_model(cfg, model_path, ds_cfg, dp_group)
        model.config.use_cache = False
        for p in model.parameters():
            p.requires_grad_(False)
        mpu = _TrainerMPU(dp_group, dp_ranks) if dp_group is not None else None
        self.engine, *_ = deepspeed.initialize(model=model, config=ds_cfg, mpu=mpu)
        self._hf_ds = None
        self.engine.eval()
        self.share_prompt = cfg.train.share_prompt_forward

    def batch_logprobs(self, seqs: SeqBatch, temperature: float, micro: int) -> torch.Tensor:
        return batched_logprobs(self.engine, seqs, temperature, micro, self.share_prompt)
