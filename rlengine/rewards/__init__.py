"""Rewards: pure reward functions, the named-reward registry and the fault-tolerant process pool.

  extract.py      last <answer> block / last \\boxed{} (nested braces)
  format.py       the gate paper's format tiers 1 / 0.5 / 0.25 / 0
  math_answer.py  math-verify equality of an extracted answer and a ground truth
  registry.py     REWARDS, register_reward, get_reward (built-ins: format, answer, boxed, answer_format)
  pool.py         RewardPool: worker processes with a hard per-item timeout
  _worker.py      the worker process entry point

Importing this package must stay light (no torch): reward workers import it.
"""
from rlengine.rewards.extract import extract_answer_tag, extract_boxed
from rlengine.rewards.format import format_reward
from rlengine.rewards.math_answer import answers_match, math_reward
from rlengine.rewards.pool import RewardPool
from rlengine.rewards.registry import REWARDS, RewardError, RewardSpec, check_finite, get_reward, register_reward

__all__ = ["REWARDS", "RewardError", "RewardPool", "RewardSpec", "check_finite", "answers_match", "extract_answer_tag", "extract_boxed",
           "format_reward", "get_reward", "math_reward", "register_reward"]
