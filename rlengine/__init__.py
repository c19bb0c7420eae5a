"""rlengine: a standalone reinforcement-learning engine for LLM reasoning.

Package map (one job per module):
  config.py        typed dataclass config from YAML + dotted overrides
  losses/          the policy-loss zoo, gates, KL and entropy terms (pure functions)
  rewards/         format / math rewards and the fault-tolerant reward process pool
  data.py          prompt datasets, presets, mixtures, resumable shuffling
  advantages.py    group-normalised advantages
  metrics.py       Pass@k / Avg@k
  model.py         loading the policy (any HF path or the embedded SmolLM2 default)
  logprobs.py      chunked, memory-lean log-probs and entropy
  rollout/         the sampler interface and its HF / vLLM backends
  weight_sync.py   bucketed trainer -> sampler weight broadcast with checksums
  actor.py         the DeepSpeed ZeRO-3 policy (and frozen reference)
  checkpoint.py    atomic checkpoints and resume
  train.py         the training loop
"""

__version__ = "0.1.0"
