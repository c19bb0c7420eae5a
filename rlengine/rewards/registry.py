"""Named rewards: the registry, the built-ins and user rewards.

A reward is a function `(text: str, ground_truth: str) -> float | dict[str, float]`. A dict holds
the total under "reward" plus named parts (logged separately by the trainer). Add one with

    @register_reward("my_reward", parts=("a", "b"))
    def my_reward(text, ground_truth): ...

or name it as `module:function` in the config (imported on first use). Built-ins:
  format         the gate paper's format tiers (1 / 0.5 / 0.25 / 0)
  answer         1 if the last <answer> block equals the ground truth (math-verify)
  boxed          1 if the last \\boxed{} equals the ground truth (DGPO's binary reward)
  answer_format  answer + format (the gate paper's r), parts "answer" and "format"
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from rlengine.plugins import import_ref
from rlengine.rewards.format import format_reward
from rlengine.rewards.math_answer import math_reward

RewardFn = Callable[[str, str], "float | dict[str, float]"]


@dataclass(frozen=True)
class RewardSpec:
    """A resolved reward: the function, its declared parts and how a worker process re-finds it."""

    name: str
    fn: RewardFn
    parts: tuple[str, ...] = ()
    ref: str = ""  # "module:qualname" (importable in a fresh process)

    def __call__(self, text: str, ground_truth: str) -> dict[str, float]:
        return as_detailed(self.fn(text, ground_truth))

    def zero(self) -> dict[str, float]:
        """The detailed score of an item that failed (timeout, error): 0 for the total and parts."""
        return {"reward": 0.0, **{part: 0.0 for part in self.parts}}


REWARDS: dict[str, RewardSpec] = {}


class RewardError(RuntimeError):
    """A reward function returned something the trainer must not train on (a NaN, an inf)."""


def check_finite(scored: list[dict[str, float]], reward: str, describe: Callable[[int], str]) -> None:
    """RewardError naming the reward, the part and the first sample whose score is not finite
    (`describe(i)` says which sample i is): a NaN would otherwise flow into the advantages and
    every update of the step would be skipped with no hint why."""
    for i, item in enumerate(scored):
        for part, value in item.items():
            if not math.isfinite(value):
                what = "its total" if part == "reward" else f"part {part!r}"
                raise RewardError(f"reward {reward!r} returned {value} ({what}) for {describe(i)}")


def as_detailed(value) -> dict[str, float]:
    """Normalise a reward function's return value to `{"reward": total, part: value, ...}`."""
    if isinstance(value, dict):
        if "reward" not in value:
            raise ValueError(f"a reward returning a dict must include 'reward'; got keys {sorted(value)}")
        return {key: float(v) for key, v in value.items()}
    return {"reward": float(value)}


def _ref_of(fn: Callable) -> str:
    return f"{fn.__module__}:{fn.__qualname__}"


def register_reward(name: str, parts: tuple[str, ...] = ()) -> Callable[[RewardFn], RewardFn]:
    """Decorator adding `fn` to REWARDS under `name` (re-registering the same function is allowed)."""

    def decorator(fn: RewardFn) -> RewardFn:
        existing = REWARDS.get(name)
        if existing is not None and existing.ref != _ref_of(fn):
            raise ValueError(f"reward {name!r} is already registered by {existing.ref}")
        REWARDS[name] = RewardSpec(name=name, fn=fn, parts=tuple(parts), ref=_ref_of(fn))
        return fn

    return decorator


def get_reward(name: str) -> RewardSpec:
    """Resolve a registry name or a `module:function` reference; ValueError lists valid names."""
    if name in REWARDS:
        return REWARDS[name]
    if ":" in name:
        fn = import_ref(name, "reward")
        for spec in REWARDS.values():  # a decorated function named by its module path
            if spec.fn is fn:
                return spec
        return RewardSpec(name=name, fn=fn, parts=(), ref=name)
    raise ValueError(f"unknown reward {name!r}; valid: {sorted(REWARDS)} or 'module:function'")


@register_reward("format")
def format_only(text: str, ground_truth: str) -> float:
    return format_reward(text)


@register_reward("answer")
def answer_only(text: str, ground_truth: str) -> float:
    return math_reward(text, ground_truth, extract="answer")


@register_reward("boxed")
def boxed_only(text: str, ground_truth: str) -> float:
    return math_reward(text, ground_truth, extract="boxed")


@register_reward("answer_format", parts=("answer", "format"))
def answer_plus_format(text: str, ground_truth: str) -> dict[str, float]:
    answer = math_reward(text, ground_truth, extract="answer")
    fmt = format_reward(text)
    return {"reward": answer + fmt, "answer": answer, "format": fmt}
