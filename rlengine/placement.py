"""Where the sampler lives, and the one way every weight push is verified.

A `Placement` has three operations, the same for both kinds:
    generate(prompts, n, sampling) -> Generation   this trainer rank's responses
    push(actor, probe) -> metrics                  the actor's weights into the sampler(s), verified
    close()                                        release the sampler(s)

colocated  (`Colocated`) every trainer rank holds its own sampler in-process; a push is a local
           copy of the gathered ZeRO-3 parameters (`weight_sync.local_push`).
separate   (`Separate`) the last `rollout.num_ranks` ranks are rollout ranks running `serve`;
           prompts and responses travel as object collectives on the world group, weights by the
           bucketed broadcast on the dedicated sync group (`weight_sync.WeightBroadcaster`).
           Every command is a collective over the world group: trainer rank 0 broadcasts it,
           every rank takes part, so no rank can wait on a message nobody sends.

Both kinds only *transfer* (`_transfer` -> `Transfer`); `verify_push` then judges every push the
same way, from what the sampler side reports it loaded (`rollout.base.LoadReport`, computed there):
  1. the sampler took every tensor of the actor (names) and its loader matched every parameter;
  2. the digest of what it loaded equals the digest of what the trainer sent (`sync/checksum_ok`);
  3. its log-probs of a fixed probe sequence equal the actor's (`sync/probe_abs_diff`).
The verdict is agreed over the trainer ranks. A failed push is retried once (`sync/retries`); a
second failure stops the run (`PushFailure`, exit code 3) naming what failed, except a probe gap
under `rollout.on_probe_failure=warn`, which warns and trains on.
"""
from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.distributed as dist

from rlengine.config import Config
from rlengine.rollout.base import Generation, LoadReport, Sampler, SamplingParams


class PushFailure(RuntimeError):
    """A push the sampler did not verifiably take, twice in a row (every trainer rank raises it)."""


class Placement(Protocol):
    def generate(self, prompts: list[list[int]], n: int, sampling: SamplingParams) -> Generation: ...

    def push(self, actor, probe=None, version: int | None = None) -> dict: ...

    def rollout_metrics(self) -> dict: ...

    def close(self) -> None: ...


@dataclass
class SamplerReply:
    """One sampler's side of a push: what it loaded, its log-probs of the probe, or why it failed."""

    report: LoadReport | None
    probe_logprobs: list[float] | None = None
    error: str | None = None


@dataclass
class Transfer:
    """One push as the trainer saw it: what it sent (names, digest) and every sampler's reply."""

    names: list[str]
    digest: int
    replies: list[SamplerReply]
    metrics: dict = field(default_factory=dict)


def build_local_sampler(cfg: Config, model_path: str, tokenizer) -> Sampler:
    """This process's own sampler, with the options its backend takes."""
    from rlengine.rollout import build_sampler

    dtype = cfg.rollout.dtype or cfg.model.dtype
    if cfg.rollout.backend == "vllm":
        from rlengine.rollout.vllm_sampler import in_process_possible

        return build_sampler("vllm", model_path, dtype=dtype, seed=cfg.run.seed,
                             kv_cache_gb=cfg.rollout.vllm_kv_cache_gb,
                             gpu_memory_utilization=cfg.rollout.vllm_gpu_memory_utilization,
                             max_model_len=cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens,
                             in_process=in_process_possible(), num_threads=torch.get_num_threads(),
                             # asynchronous: a trainer computes beside every generate (vllm_sampler "Spinning")
                             spin_while_generating=not cfg.rollout.max_staleness)
    from rlengine.runtime import local_device

    return build_sampler(cfg.rollout.backend, model_path, dtype=dtype, tokenizer=tokenizer, device=local_device())


def sampler_deadline(cfg: Config, sampler: Sampler, call: str, with_gathers: bool = False):
    """Every sampler call is bounded: past rollout.generate_timeout_s, or once the sampler reports
    itself dead (a spawned vLLM engine gone), this rank stops with one line (rlengine/watchdog.py).
    `with_gathers`: the colocated load consumes ZeRO-3 gathers as it goes, so a peer lost in one
    is the collective's to report (run.collective_timeout_s), not the sampler's: the bound is both."""
    from rlengine.watchdog import deadline

    seconds, setting = cfg.rollout.generate_timeout_s, "rollout.generate_timeout_s"
    if with_gathers:
        seconds, setting = seconds + cfg.run.collective_timeout_s, setting + " + run.collective_timeout_s"
    return deadline(f"sampler {call} ({cfg.rollout.backend})", seconds, setting, check=sampler.health)


def make_placement(cfg: Config, ctx, model_path: str, tokenizer) -> Placement:
    if cfg.rollout.placement == "separate" and cfg.rollout.max_staleness:
        from rlengine.async_rollout import AsyncSeparate

        return AsyncSeparate(cfg, ctx)
    if cfg.rollout.placement == "separate":
        return Separate(cfg, ctx)
    return Colocated(cfg, ctx, build_local_sampler(cfg, model_path, tokenizer))


# --------------------------------------------------------------------------- verification

def probe_threshold(cfg: Config) -> float:
    """The probe gap above which a push is suspicious: `rollout.probe_threshold`, or by precision
    (the measured ranges behind the defaults are in docs/benchmarks.md)."""
    if cfg.rollout.probe_threshold is not None:
        return cfg.rollout.probe_threshold
    sampler_dtype = cfg.rollout.dtype or cfg.model.dtype
    return 0.005 if cfg.model.dtype == "fp32" and sampler_dtype == "fp32" else 0.1


def _trainer_probe_logprobs(actor, probe, temperature: float) -> torch.Tensor:
    from rlengine.actor import make_batch

    prompt, response = probe
    batch = make_batch([prompt], [response], pad_id=0)
    with torch.no_grad():
        logp, _ = actor.logprobs(batch, temperature, with_entropy=False)
    return logp[0, :len(response)]


def _load_problem(transfer: Transfer, reply: SamplerReply) -> tuple[str, str] | None:
    """(which check, why) this sampler did not verifiably load what was sent, or None."""
    if reply.error is not None:
        return "load", f"the sampler failed to load the push: {reply.error}"
    report = reply.report
    sent, loaded = set(transfer.names), set(report.names)
    missing = [n for n in transfer.names if n not in loaded]
    if missing:
        return "names", f"the sampler did not load {missing[0]!r} ({len(missing)} of {len(transfer.names)} tensors missing)"
    extra = [n for n in report.names if n not in sent]
    if extra:
        return "names", f"the sampler loaded {extra[0]!r}, which was not sent"
    if report.unmatched:
        return "names", (f"the sampler's loader matched no pushed tensor to its parameter {report.unmatched[0]!r} "
                         f"({len(report.unmatched)} unmatched)")
    if report.digest != transfer.digest:
        return "digest", ("the digest of what the sampler loaded differs from the digest of what was sent "
                          "(corrupted in transit?)")
    return None


def verify_push(transfer: Transfer, actor, probe, cfg: Config) -> tuple[dict, str | None]:
    """Judge one push on this trainer rank: (metrics, the first problem or None). Metrics:
    `sync/checksum_ok` (1.0 only when every sampler's digest equals the trainer's), `sync/names_ok`,
    `sync/probe_abs_diff` (the largest gap over the samplers; -1 without a probe)."""
    from rlengine.weight_sync import probe_gap

    problems = [_load_problem(transfer, reply) for reply in transfer.replies]
    metrics = dict(transfer.metrics)
    metrics["sync/checksum_ok"] = float(all(r.report is not None and r.report.digest == transfer.digest
                                            for r in transfer.replies))
    metrics["sync/names_ok"] = float(all(p is None or p[0] == "digest" for p in problems))
    gap = -1.0
    if probe is not None:
        t0 = time.perf_counter()
        trainer_lp = _trainer_probe_logprobs(actor, probe, cfg.rollout.temperature)
        metrics["sync/probe_trainer_seconds"] = time.perf_counter() - t0
        for reply in transfer.replies:
            if reply.probe_logprobs is not None:
                gap = max(gap, probe_gap(reply.probe_logprobs[:len(probe[1])], trainer_lp))
    metrics["sync/probe_abs_diff"] = gap
    return metrics, next((p[1] for p in problems if p is not None), None)


def verified_push(placement, actor, probe, cfg: Config, ctx) -> dict:
    """`placement._transfer`, then `verify_push`, agreed over the trainer ranks; one retry; a second
    failure closes the placement and raises PushFailure (or warns, for a probe gap under
    `rollout.on_probe_failure=warn`)."""
    from rlengine.distributed import all_reduce

    threshold = probe_threshold(cfg)
    first = None
    for attempt in (0, 1):
        if attempt:
            actor.release_params()                        # the probe's forward left gathers in flight
        metrics, problem = verify_push(placement._transfer(actor, probe), actor, probe, cfg)
        failed, gap, checksum_ok = all_reduce([float(problem is not None), metrics["sync/probe_abs_diff"],
                                               -metrics["sync/checksum_ok"]], op="max", group=ctx.trainer_group)
        metrics.update({"sync/probe_abs_diff": gap, "sync/checksum_ok": -checksum_ok, "sync/retries": float(attempt)})
        if failed:
            problem = _first_problem(problem, ctx)
        elif gap > threshold:
            problem = f"sampler/trainer log-prob gap {gap:.4g} > rollout.probe_threshold {threshold}"
        else:
            return metrics
        first = first or problem
    if not failed and cfg.rollout.on_probe_failure == "warn":
        if ctx.is_main:
            warnings.warn(f"{problem} after a retried push; rollout.on_probe_failure=warn: training on")
        return metrics
    placement.close()    # rollout ranks leave their command loop instead of waiting for the next command
    hint = (" (the sampler does not hold the trainer's weights, or rollout.dtype differs from model.dtype)"
            if not failed else "")
    raise PushFailure(f"weight push not verified: {problem} after a retried push (first attempt: {first}){hint}")


def _first_problem(problem: str | None, ctx) -> str:
    """The problem as the lowest trainer rank that saw one states it (every rank raises the same)."""
    seen: list = [None] * ctx.num_trainers
    dist.all_gather_object(seen, problem, group=ctx.trainer_group)
    index = next(i for i, p in enumerate(seen) if p is not None)
    return f"{seen[index]} (trainer rank {ctx.trainer_ranks[index]})"


# --------------------------------------------------------------------------- colocated

class Colocated:
    """Every trainer rank pushes into, and generates with, its own in-process sampler."""

    def __init__(self, cfg: Config, ctx, sampler: Sampler):
        self.cfg, self.ctx, self.sampler = cfg, ctx, sampler

    def generate(self, prompts: list[list[int]], n: int, sampling: SamplingParams) -> Generation:
        with sampler_deadline(self.cfg, self.sampler, "generate"):
            return self.sampler.generate(prompts, n, sampling)

    def push(self, actor, probe=None, version: int | None = None) -> dict:
        return verified_push(self, actor, probe, self.cfg, self.ctx)

    def rollout_metrics(self) -> dict:
        return {}

    def _transfer(self, actor, probe) -> Transfer:
        from rlengine.weight_sync import WeightSyncError, digesting, local_push

        stream, digest = digesting(actor.named_parameters_gathered())
        names = [spec.name for spec in stream.manifest]
        try:
            with sampler_deadline(self.cfg, self.sampler, "weight load", with_gathers=True):
                report, metrics = local_push(self.sampler, stream)
        except (WeightSyncError, ValueError) as e:
            return Transfer(names, digest.value, [SamplerReply(None, error=str(e))])
        t0 = time.perf_counter()
        with sampler_deadline(self.cfg, self.sampler, "probe score"):
            logprobs = _score_probe(self.sampler, probe, self.cfg.rollout.temperature)
        metrics["sync/probe_sampler_seconds"] = time.perf_counter() - t0
        return Transfer(names, digest.value, [SamplerReply(report, logprobs)], metrics)

    def close(self) -> None:
        self.sampler.close()


# --------------------------------------------------------------------------- separate

def _split(n: int, parts: int, index: int) -> tuple[int, int]:
    base, extra = divmod(n, parts)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


def _broadcaster(cfg: Config, ctx):
    from rlengine.weight_sync import WeightBroadcaster

    return WeightBroadcaster(ctx.sync_group, src_rank=0, bucket_mb=cfg.rollout.bucket_mb,
                             timeout_s=cfg.rollout.sync_timeout_s)


_GENERATION_FIELDS = ("prompt_index", "prompt_ids", "response_ids", "response_logprobs", "texts", "finish_reasons")


@dataclass
class RolloutPiece:
    """One rollout rank's answer to a generation: its responses, the weights version they were
    generated with, its busy seconds and clock (cumulative, its own clock, for the idle fraction),
    and the weight loads it made since its previous piece, verified by the trainers (async mode)."""

    gen: Generation
    version: int | None = None
    busy_s: float = 0.0
    clock_s: float = 0.0
    loads: list = field(default_factory=list)      # [(version, SamplerReply)]


class IdleMeter:
    """The rollout ranks' idle fraction between consecutive pieces: 1 - d(busy) / d(clock), averaged
    over the rollout ranks (each on its own clock)."""

    def __init__(self):
        self._last: dict[int, tuple[float, float]] = {}
        self._fracs: list[float] = []

    def add(self, pieces: list) -> None:
        self._fracs = []
        for k, piece in enumerate(pieces):
            busy0, clock0 = self._last.get(k, (0.0, 0.0))
            window = piece.clock_s - clock0
            if window > 0:
                self._fracs.append(min(1.0, max(0.0, 1.0 - (piece.busy_s - busy0) / window)))
            self._last[k] = (piece.busy_s, piece.clock_s)

    def metrics(self) -> dict:
        return {"rollout/idle_frac": sum(self._fracs) / len(self._fracs)} if self._fracs else {}


class BusyClock:
    """A rollout rank's side of `IdleMeter`: seconds spent generating or loading weights since start."""

    def __init__(self):
        self.start, self.busy_s = time.monotonic(), 0.0

    @contextlib.contextmanager
    def busy(self):
        t0 = time.monotonic()
        try:
            yield
        finally:
            self.busy_s += time.monotonic() - t0

    def piece(self, gen: Generation, version: int | None = None, loads: list | None = None) -> RolloutPiece:
        return RolloutPiece(gen, version, self.busy_s, time.monotonic() - self.start, loads or [])


class Separate:
    """The trainer ranks' handle on the rollout ranks (placement=separate)."""

    def __init__(self, cfg: Config, ctx):
        self.cfg, self.ctx = cfg, ctx
        self._bcast = None
        self._closed = False
        self.idle = IdleMeter()

    def _command(self, cmd: dict) -> None:
        box = [cmd if self.ctx.is_main else None]
        dist.broadcast_object_list(box, src=0)

    def generate(self, prompts: list[list[int]], n: int, sampling: SamplingParams) -> Generation:
        ctx = self.ctx
        self._command({"op": "generate", "n": n, "sampling": sampling})
        everyone: list = [None] * ctx.world_size
        dist.all_gather_object(everyone, prompts)            # trainers' prompts, in trainer order
        pieces: list = [None] * ctx.world_size
        dist.all_gather_object(pieces, None)                 # rollout ranks answer
        gen, _ = self._share(everyone, [pieces[r] for r in ctx.rollout_ranks])
        return gen

    def _share(self, everyone: list, pieces: list) -> tuple[Generation, list[int]]:
        """This trainer's slice of the rollout ranks' pieces (renumbered from 0), and which piece each
        of its samples came from. `everyone`: every rank's prompts as gathered (rollout ranks: None)."""
        ctx = self.ctx
        merged, origin = Generation([], [], [], [], [], []), []
        for k, piece in enumerate(pieces):                   # each numbered its prompts globally (serve)
            for f in _GENERATION_FIELDS:
                getattr(merged, f).extend(getattr(piece.gen, f))
            origin += [k] * len(piece.gen)
        self.idle.add(pieces)
        counts = [len(everyone[r]) for r in ctx.trainer_ranks]
        first = sum(counts[:ctx.trainer_index])
        mine = [i for i, p in enumerate(merged.prompt_index) if first <= p < first + counts[ctx.trainer_index]]
        return (Generation([merged.prompt_index[i] - first for i in mine],
                           *([getattr(merged, f)[i] for i in mine] for f in _GENERATION_FIELDS[1:])),
                [origin[i] for i in mine])

    def rollout_metrics(self) -> dict:
        """What the last generation measured on the rollout ranks (`rollout/idle_frac`)."""
        return self.idle.metrics()

    def push(self, actor, probe=None, version: int | None = None) -> dict:
        return verified_push(self, actor, probe, self.cfg, self.ctx)

    def _sync_command(self, probe) -> dict:
        return {"op": "sync", "probe": probe}

    def _transfer(self, actor, probe) -> Transfer:
        from rlengine.weight_sync import WeightSyncError, digesting

        ctx = self.ctx
        self._command(self._sync_command(probe))
        self._bcast = self._bcast or _broadcaster(self.cfg, ctx)
        t0 = time.perf_counter()
        # every trainer rank iterates (the ZeRO-3 gathers are collective) and digests what it sees
        stream, digest = digesting(actor.named_parameters_gathered())
        metrics: dict = {}
        try:
            if ctx.is_main:
                metrics = self._bcast.push(stream)
            else:
                for _ in stream:
                    pass
        except WeightSyncError as e:   # the receivers learnt the same verdict; their replies say more
            metrics = dict(e.metrics)
        metrics.setdefault("sync/seconds", time.perf_counter() - t0)
        answers: list = [None] * ctx.world_size
        dist.all_gather_object(answers, None)
        box = [{k: float(v) for k, v in metrics.items()}]     # rank 0's transfer figures for every trainer
        dist.broadcast_object_list(box, src=0, group=ctx.trainer_group)
        return Transfer([spec.name for spec in stream.manifest], digest.value,
                        [answers[r] for r in ctx.rollout_ranks], box[0])

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._command({"op": "stop"})


def serve(cfg: Config, ctx) -> int:
    """The loop of a rollout rank: serve generate / sync commands until told to stop (with
    rollout.max_staleness >= 1: `async_rollout.serve_async`)."""
    from rlengine.model import load_tokenizer, resolve_model_path

    if cfg.rollout.max_staleness:
        from rlengine.async_rollout import serve_async

        return serve_async(cfg, ctx)
    model_path = resolve_model_path(cfg.model.path)
    sampler = build_local_sampler(cfg, model_path, load_tokenizer(model_path))
    bcast = _broadcaster(cfg, ctx)
    clock = BusyClock()
    try:
        while True:
            cmd = next_command()
            if cmd["op"] == "stop":
                break
            if cmd["op"] == "generate":
                prompts, lo = my_prompts(ctx)
                with clock.busy(), sampler_deadline(cfg, sampler, "generate"):
                    gen = sampler.generate(prompts, cmd["n"], cmd["sampling"])
                gen.prompt_index = [i + lo for i in gen.prompt_index]
                dist.all_gather_object([None] * ctx.world_size, clock.piece(gen))
            elif cmd["op"] == "sync":
                with clock.busy(), sampler_deadline(cfg, sampler, "weight load"):
                    reply = _receive_push(bcast, sampler, cmd.get("probe"), cfg.rollout.temperature)
                dist.all_gather_object([None] * ctx.world_size, reply)
    finally:
        sampler.close()
    return 0


def next_command() -> dict:
    """A rollout rank's next command from trainer rank 0 (a collective over the world group)."""
    box = [None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def my_prompts(ctx) -> tuple[list, int]:
    """A rollout rank's share of every trainer's prompts of one command (gathered over the world
    group), and the index of its first prompt among them all."""
    everyone: list = [None] * ctx.world_size
    dist.all_gather_object(everyone, None)
    prompts = [p for r in ctx.trainer_ranks for p in everyone[r]]
    lo, hi = _split(len(prompts), len(ctx.rollout_ranks), ctx.rollout_ranks.index(ctx.rank))
    return prompts[lo:hi], lo


def _receive_push(bcast, sampler: Sampler, probe, temperature: float) -> SamplerReply:
    """A rollout rank's side of one push: receive, load, score the probe; failures are reported to
    the trainers (who decide to retry or stop), not raised here."""
    from rlengine.weight_sync import WeightSyncError

    reports: list[LoadReport] = []

    def load(named):
        reports.append(sampler.load_weights(named))
        return reports[-1]

    try:
        bcast.receive(load)
    except WeightSyncError as e:
        return SamplerReply(reports[-1] if reports else None, error=str(e))
    return SamplerReply(reports[-1], _score_probe(sampler, probe, temperature))


def _score_probe(sampler: Sampler, probe, temperature: float) -> list[float] | None:
    return sampler.score(probe[0], probe[1], temperature=temperature) if probe is not None else None


def _load_into(sampler: Sampler, named: list, probe, temperature: float) -> SamplerReply:
    """Load staged weights into this process's sampler and score the probe (async rollout ranks);
    a refused load is reported to the trainers, not raised."""
    from rlengine.weight_sync import WeightSyncError

    try:
        report = sampler.load_weights(named)
    except (WeightSyncError, ValueError) as e:
        return SamplerReply(None, error=str(e))
    return SamplerReply(report, _score_probe(sampler, probe, temperature))
