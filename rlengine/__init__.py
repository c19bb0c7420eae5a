"""rlengine: a standalone reinforcement-learning engine for LLM reasoning.

Package map (one job per module):
  config.py        typed dataclass config from YAML + dotted overrides
  losses/          the policy-loss zoo, gates, KL and entropy terms (pure functions)
  rewards/         format / math rewards and the fault-tolerant reward process pool
  data.py          prompt datasets, presets, mixtures, resumable shuffling
  advantages.py    group-normalised advantages and shape_advantages (the step's one written order)
  batch.py         RolloutBatch: one rank's step, from the responses to the advantages
  objective.py     a micro-batch's objective (KL, entropy bonus) and its global-unit share
  step_metrics.py  a step's metrics, reduced over the trainer ranks in one collective
  metrics.py       Pass@k / Avg@k
  model.py         loading the policy (any HF path or the embedded SmolLM2 default)
  logprobs.py      chunked, memory-lean log-probs and entropy
  rollout/         the sampler interface and its HF / vLLM backends
  weight_sync.py   bucketed trainer -> sampler weight broadcast with checksums, push digests
  placement.py     Colocated / Separate samplers behind generate / push / close; verify_push
  actor.py         the DeepSpeed ZeRO-3 policy (Actor.update: one optimizer step) and reference
  patches.py       every patch of a third-party library (DeepSpeed; vLLM's live in its module)
  runtime.py       threads, devices, bf16 support, stale build locks
  distributed.py   process groups, trainer / rollout ranks
  checkpoint.py    atomic checkpoints and resume
  logger.py        metrics.jsonl, TensorBoard, W&B, the per-token dump
  train.py         the training loop (docs/architecture.md draws it)
"""

__version__ = "0.1.0"
